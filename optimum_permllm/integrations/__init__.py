"""Integrations with transformers, PEFT and optimum-cli."""

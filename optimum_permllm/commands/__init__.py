"""The command line: `permllm` (cli.py; also `optimum-cli permllm`, registered from the repository's
optimum/commands/register/register_permllm.py, where optimum-cli looks for it) and the README's demo
(demo.py, run as `python -m optimum_permllm.demo` or `permllm demo`)."""

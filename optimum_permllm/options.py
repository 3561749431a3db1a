"""The values a user can choose for each PermLLMConfig setting, importable without torch or transformers.

The command line builds its `--help` from these, so they live apart from `config.py`.
"""

METRICS = ("magnitude", "wanda", "ria", "gram", "sparsegpt", "lsq")
PERMUTATIONS = ("none", "heuristic", "learned")
LEARNERS = ("sinkhorn", "ot")
SCOPES = ("layer", "model")
FOLDING = (True, False, "all")

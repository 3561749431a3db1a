"""The values a user can choose for each PermLLMConfig setting, importable without torch or transformers.

The command line builds its `--help` from these, so they live apart from `config.py`.
"""

METRICS = ("magnitude", "wanda", "ria", "gram", "sparsegpt", "lsq")
PERMUTATIONS = ("none", "heuristic", "learned")
LEARNERS = ("sinkhorn", "ot")
SCOPES = ("layer", "model")
FOLDING = (True, False, "all")
# Short names of the real models installed offline from PyPI (optimum_permllm.data.assets.MODELS); the first
# is the default of the demo and the benchmarks.
MODEL_NAMES = ("smollm2-135m", "gemma-3-270m")
MODEL_HELP = (f"a short name of an offline model ({', '.join(MODEL_NAMES)}), a Hub id or a folder "
              f"(default: {MODEL_NAMES[0]})")

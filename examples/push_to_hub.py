"""Upload a permllm checkpoint to the Hugging Face Hub with a generated model card, in one commit.

    huggingface-cli login
    python examples/push_to_hub.py permllm-pruned me/SmolLM2-135M-2of4 --base-model HuggingFaceTB/SmolLM2-135M-Instruct
    python examples/push_to_hub.py permllm-pruned me/x --base-model HuggingFaceTB/SmolLM2-135M --dry-run  # print the card

The card records the sparsity, metric, permutation and calibration settings from the checkpoint's config,
the licence of the base model, and optional results (`--perplexity 23.4` or `--results results.json` from
`permllm eval --output-json`). `model.push_to_hub(repo)` from transformers works too, but writes no card.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

import optimum_permllm  # noqa: F401  (registers quant_method="permllm" with transformers)
from optimum_permllm.integrations import hub


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="permllm checkpoint folder")
    parser.add_argument("repo_id", help="'name' or 'namespace/name'")
    parser.add_argument("--base-model", required=True, help="Hub id of the dense model it was pruned from")
    parser.add_argument("--license", default=None, help="licence id (default: read from the base model's card)")
    parser.add_argument("--results", default=None, help="results JSON from `permllm eval --output-json`")
    parser.add_argument("--perplexity", type=float, default=None, help="measured perplexity, if no --results")
    parser.add_argument("--token", default=None)
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--dry-run", action="store_true", help="print the model card instead of uploading")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    results = json.loads(Path(args.results).read_text()) if args.results else None
    if args.perplexity is not None:
        results = {**(results or {}), "perplexity": args.perplexity}
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint)
    if args.dry_run:
        hub.check_repo_id(args.repo_id)
        card = hub.create_model_card(model, base_model=args.base_model, results=results, repo_id=args.repo_id,
                                     license=args.license)
        print(card)
        return card
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    commit = hub.push_to_hub(model, tokenizer, args.repo_id, token=args.token, private=args.private, results=results,
                             base_model=args.base_model, license=args.license)
    print(f"uploaded: {getattr(commit, 'commit_url', commit)}")
    return commit


if __name__ == "__main__":
    main()

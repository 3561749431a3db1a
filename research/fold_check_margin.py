"""How far an exact permutation fold is from a wrong one, in eps of the layer output's largest value.

Prunes a model (Wanda + heuristic, 8 x 256 calibration tokens) while recording every fold check of
pipeline/folding.py: each check compares the layer's output after a candidate fold with the output before it.
An exact fold only reorders sums (rounding); a wrong candidate changes the output. Prints the sorted
distances; the gap between the two clusters is where FOLD_TOLERANCE must sit.

    OMP_NUM_THREADS=1 python research/fold_check_margin.py --model gemma-3-270m
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m", help="short name of an offline model, a Hub id or a folder")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import optimum_permllm.pipeline.folding as folding
    from optimum_permllm import PermLLMConfig, PermLLMSparsifier
    from optimum_permllm.data.assets import resolve_model

    distances, original = [], folding._same_output

    def recording(output, reference):
        scale = reference.abs().max().clamp_min(1e-6)
        distances.append(float((output - reference).abs().max() / scale / torch.finfo(reference.dtype).eps))
        return original(output, reference)

    folding._same_output = recording
    source = resolve_model(args.model)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source)
    config = PermLLMConfig(metric="wanda", permutation="heuristic", num_samples=8, seq_len=256)
    PermLLMSparsifier(config).sparsify_model(model, tokenizer, progress=False)
    distances.sort()
    exact = [d for d in distances if d < 1e3]
    print(f"{len(distances)} fold checks; largest rounding-like distance {max(exact):.2f} eps, "
          f"smallest above 1e3: {min((d for d in distances if d >= 1e3), default=float('nan')):.0f} eps")
    print("sorted:", " ".join(f"{d:.3g}" for d in distances))


if __name__ == "__main__":
    main()

"""Exact `layer` objective of channel permutations on real SmolLM2-135M layers, with wall times.

For a few decoder layers, the input Gram matrix of every group of linears sharing an input (q/k/v, o,
gate/up, down) is collected on dense calibration inputs; each permutation method is then scored by
the relative output error of the 2:4-pruned group, tr(D G D^T) / tr(W G W^T). Example:

    python research/bench_learned_layers.py --layers 3 15 27 --methods identity heuristic sinkhorn ot refine learned

Methods: identity, heuristic (RIA-CP), heads (RIA-CP inside attention heads, shared by the query heads
of a KV head, as fold_permutations="all" does for o_proj; the heuristic elsewhere), sinkhorn / ot
(Sinkhorn phase only, no polishing), refine (exact swap search from the heuristic, no Sinkhorn),
learned (the `learn_permutation` default).
Runs on one thread: the benchmark machine is shared, and more threads are slower under contention.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

HEADS = (9, 3, 64)  # SmolLM2-135M: query heads, KV heads, head dim (o_proj reads 9 x 64 channels)
GROUPS = {  # leader -> members of the group reading the leader's input
    "self_attn.q_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.o_proj": ("self_attn.o_proj",),
    "mlp.gate_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down_proj": ("mlp.down_proj",),
}


def load_model():
    """SmolLM2-135M in fp32 and its tokenizer (offline asset)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_permllm.data.assets import smollm2_model_dir

    folder = smollm2_model_dir()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder)


@torch.no_grad()
def collect(model, tokenizer, layers: list[int], num_samples: int, seq_len: int, source=None) -> dict:
    """Per layer: {'groups': {leader: (weights, gram, norms)}, 'inputs': [(args, kwargs)] of the layer call}."""
    from optimum_permllm.algorithms.statistics import InputStatistics
    from optimum_permllm.data.calibration import get_calibration_data

    samples = get_calibration_data(source, tokenizer, num_samples, seq_len)
    decoder = model.model.layers
    stats = {(i, g): None for i in layers for g in GROUPS}
    inputs = {i: [] for i in layers}
    handles = []
    for i in layers:
        layer = decoder[i]
        handles.append(layer.register_forward_pre_hook(
            lambda mod, args, kwargs, i=i: inputs[i].append((args, kwargs)), with_kwargs=True))
        for leader in GROUPS:
            def hook(mod, args, key=(i, leader)):
                if stats[key] is None:
                    stats[key] = InputStatistics(args[0].shape[-1], track_gram=True)
                stats[key].add_batch(args[0])
            handles.append(layer.get_submodule(leader).register_forward_pre_hook(hook))
    try:
        for batch in samples.split(1):
            model(input_ids=batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    out = {}
    for i in layers:
        layer = decoder[i]
        groups = {}
        for leader, members in GROUPS.items():
            weights = [layer.get_submodule(name).weight.detach().float().clone() for name in members]
            groups[leader] = (weights, stats[(i, leader)].gram(), stats[(i, leader)].feature_norms())
        out[i] = {"groups": groups, "inputs": inputs[i]}
    return out


def wanda_pruned(weights, norms, perm, n=2, m=4) -> list[torch.Tensor]:
    """The group's weights N:M-pruned with Wanda scores in `perm` order, back in the original column order."""
    from optimum_permllm.algorithms.scores import wanda_scores
    from optimum_permllm.sparse.nm import nm_mask

    pruned = []
    for w in weights:
        mask = nm_mask(wanda_scores(w, norms)[:, perm], n, m)
        restored = torch.empty_like(w)
        restored[:, perm] = w[:, perm].masked_fill(~mask, 0)
        pruned.append(restored)
    return pruned


def layer_loss(weights, gram, norms, perm, n=2, m=4) -> float:
    """Exact relative output error of the group pruned with Wanda scores in `perm` order."""
    from optimum_permllm.algorithms.learned import LayerObjective

    return float(LayerObjective(weights, gram)(wanda_pruned(weights, norms, perm, n, m)))


def heuristic(weights, norms, n=2, m=4) -> torch.Tensor:
    """The pipeline's initialisation: RIA-CP on the group's concatenated Wanda scores."""
    from optimum_permllm.algorithms.heuristic_permutation import heuristic_permutation
    from optimum_permllm.algorithms.scores import wanda_scores

    return heuristic_permutation(torch.cat([wanda_scores(w, norms) for w in weights]), n, m)


def heads_permutation(weights, norms, width, n=2, m=4) -> torch.Tensor:
    """RIA-CP restricted to moves inside heads, shared by the query heads of one KV head (SmolLM2's layout)."""
    from optimum_permllm.algorithms.heuristic_permutation import head_shared_permutation
    from optimum_permllm.algorithms.scores import wanda_scores

    scores = torch.cat([wanda_scores(w, norms) for w in weights])
    return head_shared_permutation(scores, HEADS[0], HEADS[1], n, m)


def run_method(method: str, weights, gram, norms, init: torch.Tensor, args) -> torch.Tensor:
    """The permutation chosen by `method` for one group."""
    from optimum_permllm.algorithms.learned import LearningSettings, block_size_for, learn_permutation

    width = weights[0].shape[1]
    if method == "identity":
        return torch.arange(width)
    if method == "heuristic":
        return init
    if method == "heads":
        attention_output = len(weights) == 1 and width == HEADS[0] * HEADS[2]
        return heads_permutation(weights, norms, width) if attention_output else init
    block = block_size_for(width, args.block_size, 4)
    settings = LearningSettings(block_size=block, seed=0)
    common = dict(metric="wanda", init_perm=init)
    if method in ("sinkhorn", "ot"):
        chosen = LearningSettings(learner=method, block_size=block, steps=args.steps, refine_rounds=0)
        return learn_permutation(weights, gram, norms, 2, 4, chosen, **common).perm
    if method == "refine":
        chosen = LearningSettings(block_size=block, steps=0, refine_rounds=args.refine_rounds)
        return learn_permutation(weights, gram, norms, 2, 4, chosen, **common).perm
    if method == "learned":
        return learn_permutation(weights, gram, norms, 2, 4, settings, **common).perm
    if method == "learned-ot":
        return learn_permutation(weights, gram, norms, 2, 4, LearningSettings(learner="ot", block_size=block), **common).perm
    raise ValueError(f"Unknown method {method!r}.")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[3, 15, 27])
    parser.add_argument("--methods", nargs="+", default=["identity", "heuristic", "sinkhorn", "ot", "refine", "learned"])
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20, help="Sinkhorn-phase steps of the sinkhorn/ot rows")
    parser.add_argument("--refine-rounds", type=int, default=5, help="swap rounds of the refine row")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--cache", type=Path, default=None, help="save/load the collected statistics here")
    parser.add_argument("--heldout", action="store_true",
                        help="also score every permutation on Gram matrices from the held-out text (over-fitting check)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.cache is not None and args.cache.exists():
        data = torch.load(args.cache, weights_only=False)
    else:
        model, tokenizer = load_model()
        data = collect(model, tokenizer, args.layers, args.num_samples, args.seq_len)
        if args.heldout:
            from optimum_permllm.data.calibration import get_evaluation_text

            held = collect(model, tokenizer, args.layers, args.num_samples, args.seq_len, [get_evaluation_text()])
            for i in args.layers:
                data[i]["heldout"] = {k: g for k, (_, g, _) in held[i]["groups"].items()}
        if args.cache is not None:
            torch.save({i: {k: v for k, v in d.items() if k != "inputs"} for i, d in data.items()}, args.cache)
    print("| layer | group | " + " | ".join(args.methods) + " | gain vs heuristic |")
    print("|---|---|" + "---|" * (len(args.methods) + 1))
    for index in args.layers:
        for leader, (weights, gram, norms) in data[index]["groups"].items():
            init = heuristic(weights, norms)
            cells, losses = [], {}
            for method in args.methods:
                start = time.perf_counter()
                perm = run_method(method, weights, gram, norms, init, args)
                seconds = time.perf_counter() - start
                losses[method] = layer_loss(weights, gram, norms, perm)
                cell = f"{losses[method]:.5f} ({seconds:.1f}s)"
                if "heldout" in data[index]:  # masks still from calibration norms; error on held-out inputs
                    cell += f" / held-out {layer_loss(weights, data[index]['heldout'][leader], norms, perm):.5f}"
                cells.append(cell)
            best = min((v for k, v in losses.items() if k not in ("identity", "heuristic")), default=float("nan"))
            gain = 100 * (losses["heuristic"] - best) / losses["heuristic"] if "heuristic" in losses else float("nan")
            print(f"| {index} | {leader.split('.')[-1]} | " + " | ".join(cells) + f" | {gain:.1f}% |", flush=True)


if __name__ == "__main__":
    main()

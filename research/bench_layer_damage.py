"""Does a lower `layer` objective mean a less damaged model? One linear per decoder layer, heuristic vs learned.

For every decoder layer, the chosen linear (default the attention output projection) is pruned ALONE,
with its permutation chosen on dense-model calibration statistics, and the model is scored against the
dense one on held-out text: the relative output error of the layer (the learned objective), the KL
divergence of the next-token distributions from the dense model's, and the increase of the mean NLL.
`--joint` then prunes that linear in every layer at once (still dense statistics) and reports perplexity.

    python research/bench_layer_damage.py --linear self_attn.o_proj          # every layer, one at a time
    python research/bench_layer_damage.py --linear self_attn.o_proj --joint  # all layers at once
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

METHODS = ("heuristic", "learned")


def load(source):
    """Model (fp32, eval) and tokenizer; the offline SmolLM2 by default."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_permllm.data.assets import smollm2_model_dir

    source = source or str(smollm2_model_dir())
    return AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(source)


@torch.no_grad()
def input_statistics(model, linears, samples):
    """InputStatistics (with Gram) of every linear, from one dense pass over the calibration samples."""
    from optimum_permllm.algorithms.statistics import InputStatistics

    stats = [InputStatistics(linear.in_features, track_gram=True) for linear in linears]
    hooks = [linear.register_forward_pre_hook(lambda mod, args, s=s: s.add_batch(args[0])) for linear, s in zip(linears, stats)]
    try:
        for sample in samples:
            model(sample[None])
    finally:
        for hook in hooks:
            hook.remove()
    return stats


def pruned_weight(weight, stats, method: str, sparsity: str, metric: str):
    """The linear's 2:4 weight (original column order) under the library's heuristic or learned permutation."""
    from optimum_permllm import PermLLMConfig
    from optimum_permllm.pipeline.planning import plan_group
    from optimum_permllm.sparse.permutation import invert_permutation

    config = PermLLMConfig(sparsity=sparsity, metric=metric, permutation=method)
    plan = plan_group({"w": weight}, stats, config.to_plan())
    return plan.weights["w"][:, invert_permutation(plan.perm)]


def relative_error(dense, pruned, gram) -> float:
    """tr(D G D^T) / tr(W G W^T): the `layer` objective of one linear (the learner's own LayerObjective)."""
    from optimum_permllm.algorithms.learned import LayerObjective

    return float(LayerObjective([dense], gram)([pruned]))


class Damage:
    """KL from the dense model and NLL increase on fixed held-out windows (the dense log-probs cached once)."""

    @torch.no_grad()
    def __init__(self, model, windows):
        self.model, self.windows = model, windows
        self.reference = [self._logprobs(w) for w in windows]
        self.base_nll = self._nll_and_kl()[0]

    def _logprobs(self, window):
        return F.log_softmax(self.model(window[None]).logits[0, :-1].float(), dim=-1)

    @torch.no_grad()
    def _nll_and_kl(self):
        nll = kl = 0.0
        for window, ref in zip(self.windows, self.reference):
            logp = self._logprobs(window)
            nll += float(-logp.gather(-1, window[1:, None]).mean())
            kl += float((ref.exp() * (ref - logp)).sum(-1).mean())
        return nll / len(self.windows), kl / len(self.windows)

    def __call__(self) -> tuple[float, float]:
        """(KL from the dense model, NLL increase) of the model as it is now."""
        nll, kl = self._nll_and_kl()
        return kl, nll - self.base_nll


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="Hub id or folder (default: SmolLM2-135M-Instruct from PyPI)")
    parser.add_argument("--linear", default="self_attn.o_proj", help="the linear of each decoder layer to prune")
    parser.add_argument("--layers", type=int, nargs="*", default=None, help="decoder layers (default: all)")
    parser.add_argument("--sparsity", default="2:4")
    parser.add_argument("--metric", default="wanda", choices=["wanda", "ria"])
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-windows", type=int, default=8, help="held-out windows of --seq-len tokens")
    parser.add_argument("--joint", action="store_true", help="prune every chosen layer at once; report perplexity")
    args = parser.parse_args(argv)

    from optimum_permllm.data.calibration import get_calibration_data
    from optimum_permllm.evaluation.perplexity import get_evaluation_text, perplexity, token_ids
    from optimum_permllm.pipeline.structure import find_decoder_layers

    torch.manual_seed(0)
    model, tokenizer = load(args.model)
    layers = find_decoder_layers(model)[1]
    chosen = args.layers if args.layers is not None else list(range(len(layers)))
    linears = [layers[i].get_submodule(args.linear) for i in chosen]
    samples = get_calibration_data(None, tokenizer, args.num_samples, args.seq_len, args.seed)
    stats = input_statistics(model, linears, samples)
    dense = [linear.weight.detach().clone() for linear in linears]
    pruned = {method: [pruned_weight(w, s, method, args.sparsity, args.metric) for w, s in zip(dense, stats)]
              for method in METHODS}
    if args.joint:
        for method in METHODS:
            for linear, weight in zip(linears, pruned[method]):
                linear.weight.data.copy_(weight)
            ppl = perplexity(model, tokenizer, seq_len=512, max_windows=24)
            print(json.dumps({"linear": args.linear, "layers": "all" if args.layers is None else chosen,
                              "method": method, "seed": args.seed, "perplexity": round(ppl, 3)}), flush=True)
        return
    ids = token_ids(tokenizer, get_evaluation_text())
    damage = Damage(model, ids[: args.eval_windows * args.seq_len].view(args.eval_windows, args.seq_len))
    rows = []
    for k, (index, linear, weight, s) in enumerate(zip(chosen, linears, dense, stats)):
        row = {"layer": index}
        for method in METHODS:
            row[f"{method}_error"] = relative_error(weight, pruned[method][k], s.gram())
            linear.weight.data.copy_(pruned[method][k])
            row[f"{method}_kl"], row[f"{method}_dnll"] = damage()
            linear.weight.data.copy_(weight)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(table(rows))


def table(rows) -> str:
    """Per layer and summed: error and KL of both methods, and on how many layers learned lowers each."""
    lines = ["| layer | error: heuristic / learned | KL: heuristic / learned | NLL increase: heuristic / learned |",
             "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['heuristic_error']:.5f} / {r['learned_error']:.5f} | "
                     f"{r['heuristic_kl']:.5f} / {r['learned_kl']:.5f} | {r['heuristic_dnll']:+.5f} / {r['learned_dnll']:+.5f} |")
    total = {k: sum(r[k] for r in rows) for k in rows[0] if k != "layer"}
    lower = {q: sum(r[f"learned_{q}"] < r[f"heuristic_{q}"] for r in rows) for q in ("error", "kl", "dnll")}
    lines.append(f"| sum | {total['heuristic_error']:.5f} / {total['learned_error']:.5f} | "
                 f"{total['heuristic_kl']:.5f} / {total['learned_kl']:.5f} | "
                 f"{total['heuristic_dnll']:+.5f} / {total['learned_dnll']:+.5f} |")
    lines.append(f"\nlearned lower on {lower['error']}/{len(rows)} layers (error), {lower['kl']}/{len(rows)} (KL), "
                 f"{lower['dnll']}/{len(rows)} (NLL increase)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

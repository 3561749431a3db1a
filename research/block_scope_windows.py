"""Is the `block` scope's choice signal or noise, and does it beat the heuristic on held-out text?

For each group of linears sharing an input in a few decoder layers (dense inputs, Wanda scores, 2:4),
the block-scope loss (1 - standardised cosine of the decoder layer's output, other groups dense) is
computed per calibration window for the heuristic permutation and for two learned ones: the `layer`
scope's (Gram objective + swap polish) and the `block` scope's learned on 2 windows. For each paired
difference against the heuristic it prints the mean, its standard error, and the windows needed for
|mean| > 2 SE. Then the block scope is learned on `--windows` calibration windows and every permutation is
scored on held-out windows (evaluation text, the scale from the held-out dense outputs).

    OMP_NUM_THREADS=1 python research/block_scope_windows.py --layers 3 15 27 --windows 16 --steps 8
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from optimum_permllm import PermLLMConfig
from optimum_permllm.algorithms.learned import LearningSettings, block_size_for, learn_permutation
from optimum_permllm.data.calibration import get_calibration_data, get_evaluation_text
from optimum_permllm.pipeline.capture import CalibrationCache, capture
from optimum_permllm.pipeline.planning import plan_group
from optimum_permllm.pipeline.statistics import collect_statistics
from optimum_permllm.pipeline.structure import find_decoder_layers, layer_linears
from optimum_permllm.sparse import nm_mask


def cosine_loss(output, target, scale):
    """1 - cosine similarity of the last dimension averaged over tokens, every feature divided by `scale` first."""
    output, target = output.float() / scale, target.float() / scale
    return 1 - torch.nn.functional.cosine_similarity(output, target, dim=-1).mean()


class ScopeObjective:
    """The removed `block` scope: 1 - cos(the decoder layer's output with the group's candidate weights, its dense
    output), features standardised by the dense output's per-feature RMS, on the first `windows` cached windows."""

    def __init__(self, layer, index, cache, names, windows):
        self.layer, self.names = layer, list(names)
        self.hidden = cache.hidden[:windows]
        self.calls = [cache.call_for(index, h) for h in self.hidden]
        self.params = {name: p.detach() for name, p in layer.named_parameters()}
        with torch.no_grad():
            self.targets = [self._forward(self.params, h, c) for h, c in zip(self.hidden, self.calls)]
        rms = torch.cat([t.float().reshape(-1, t.shape[-1]) for t in self.targets]).pow(2).mean(dim=0).sqrt()
        self.scale = rms.clamp_min(1e-6 * float(rms.max().clamp_min(1e-30)))

    def _forward(self, params, hidden, call):
        return call.run(self.layer, hidden, params)

    def __call__(self, masked_weights):
        return torch.stack([cosine_loss(out, t, self.scale) for out, t in zip(self._outputs(masked_weights), self.targets)]).mean()

    def _outputs(self, masked_weights):
        params = dict(self.params)
        for name, weight in zip(self.names, masked_weights):
            params[f"{name}.weight"] = weight
        return [self._forward(params, h, c) for h, c in zip(self.hidden, self.calls)]


def layer_caches(model, samples, wanted):
    """{layer index: (layer, CalibrationCache of its dense inputs, {group: InputStatistics})}."""
    _, layers = find_decoder_layers(model)
    cache = capture(model, layers, samples, 1, "cpu")
    out = {}
    with torch.no_grad():
        for index, layer in enumerate(layers[: max(wanted) + 1]):
            if index in wanted:
                linears = layer_linears(layer)
                stats, groups = collect_statistics(layer, index, cache, linears, True)
                out[index] = (layer, CalibrationCache(list(cache.hidden), cache.calls),
                              {tuple(g): stats[g[0]] for g in groups})
            cache.hidden = [cache.call_for(index, h).run(layer, h) for h in cache.hidden]
    return out


def pruned(weights, norms, perm):
    """Wanda 2:4 pruning read in `perm` order, returned in original column order."""
    out = []
    for w in weights:
        mask = nm_mask((w.abs() * norms)[:, perm], 2, 4)
        back = torch.empty_like(w)
        back[:, perm] = w[:, perm].masked_fill(~mask, 0)
        out.append(back)
    return out


@torch.no_grad()
def window_losses(objective: ScopeObjective, masked) -> torch.Tensor:
    """The block-scope loss of `masked` on every window of `objective` (one scale for all windows)."""
    return torch.stack([cosine_loss(out, t, objective.scale)
                        for out, t in zip(objective._outputs(masked), objective.targets)])


def paired(diff: torch.Tensor) -> dict:
    """Mean, standard error and the windows needed for |mean| > 2 SE of a per-window paired difference."""
    mean, sd = float(diff.mean()), float(diff.std())
    se = sd / math.sqrt(diff.numel())
    need = math.ceil((2 * sd / abs(mean)) ** 2) if mean else None
    return {"mean": f"{mean:.3e}", "se": f"{se:.3e}", "lower_on": f"{int((diff < 0).sum())}/{diff.numel()}",
            "windows_for_2se": need}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--layers", type=int, nargs="+", default=[3, 15, 27])
    ap.add_argument("--cal-windows", type=int, default=32)
    ap.add_argument("--heldout-windows", type=int, default=16)
    ap.add_argument("--windows", type=int, default=16, help="calibration windows the block scope learns on")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_permllm.data.assets import smollm2_model_dir

    source = args.model or str(smollm2_model_dir())
    tok = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    wanted = set(args.layers)
    cal = layer_caches(model, get_calibration_data(None, tok, args.cal_windows, args.seq_len, seed=0), wanted)
    ho = layer_caches(model, get_calibration_data([get_evaluation_text()], tok, args.heldout_windows,
                                                  args.seq_len, seed=0), wanted)
    heuristic_plan = PermLLMConfig(metric="wanda", permutation="heuristic").to_plan()
    layer_plan = PermLLMConfig(metric="wanda", permutation="learned", steps=args.steps).to_plan()
    for index in args.layers:
        layer, cache, stats = cal[index]
        _, ho_cache, _ = ho[index]
        for group, st in stats.items():
            weights = [layer.get_submodule(n).weight.detach().float() for n in group]
            norms, gram = st.feature_norms(), st.gram()
            perms = {"heuristic": plan_group(dict(zip(group, weights)), st, heuristic_plan).perm}
            perms["layer"] = plan_group(dict(zip(group, weights)), st, layer_plan).perm
            block = block_size_for(weights[0].shape[1], 64, 4)
            for key, count in (("block2", 2), (f"block{args.windows}", args.windows)):
                start = time.perf_counter()
                scope = ScopeObjective(layer, index, cache, group, windows=count)
                with torch.enable_grad():
                    result = learn_permutation(weights, gram, norms, 2, 4, LearningSettings(block_size=block, steps=args.steps),
                                               init_perm=perms["heuristic"], loss_fn=scope)
                perms[key] = result.perm
                seconds = round(time.perf_counter() - start, 1)
            row = {"layer": index, "group": "+".join(n.split(".")[-1] for n in group),
                   f"block{args.windows}_seconds": seconds}
            for split, split_cache in (("cal", cache), ("heldout", ho_cache)):
                objective = ScopeObjective(layer, index, split_cache, group, windows=len(split_cache.hidden))
                losses = {k: window_losses(objective, pruned(weights, norms, p)) for k, p in perms.items()}
                row[f"{split}/mean"] = {k: f"{float(v.mean()):.5f}" for k, v in losses.items()}
                for k in perms:
                    if k != "heuristic":
                        row[f"{split}/{k}-heuristic"] = paired(losses[k] - losses["heuristic"])
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

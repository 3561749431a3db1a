"""How much do the Gram-chosen mask, its robustness weight mu, and the permutation add, per layer group?

For a few decoder layers of a model (default: the offline SmolLM2-135M), every group of linears that
shares an input is pruned N:M in several ways on dense calibration inputs; each way is scored by the
relative output error tr(D G D^T) / tr(W G W^T) (mean over the group's linears) on the calibration Gram
matrix AND on a held-out Gram matrix from other text, with the diagonal part of the held-out error
(sum of pruned w_j^2 G_jj, what Wanda minimises). Ways: Wanda's mask or the Gram mask (mu values) after
the identity, the heuristic or today's learned permutation, and a time-boxed joint local search over
channel swaps in which every candidate swap re-chooses both groups' masks exactly (2:4: all 36 pairs of
masks), which bounds from below what a joint permutation-and-mask search could add.

    OMP_NUM_THREADS=1 python research/gram_mask_headroom.py --layers 3 15 27 --num-samples 64
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch

from optimum_permllm import PermLLMConfig
from optimum_permllm.algorithms.gram_mask import gram_mask, keep_options, robust_gram
from optimum_permllm.data.calibration import get_calibration_data, get_evaluation_text
from optimum_permllm.pipeline.capture import capture
from optimum_permllm.pipeline.planning import plan_group
from optimum_permllm.pipeline.statistics import collect_statistics
from optimum_permllm.pipeline.structure import find_decoder_layers, layer_linears
from optimum_permllm.sparse import nm_mask


def layer_groups(model, samples, layers_wanted):
    """{layer: [(names, [weights], InputStatistics)]} on dense inputs, for the wanted layers."""
    _, layers = find_decoder_layers(model)
    cache = capture(model, layers, samples, 1, "cpu")
    out = {}
    with torch.no_grad():
        for index, layer in enumerate(layers[: max(layers_wanted) + 1]):
            if index in layers_wanted:
                linears = layer_linears(layer)
                stats, groups = collect_statistics(layer, index, cache, linears, True)
                out[index] = [(g, [linears[n].weight.detach().float().clone() for n in g], stats[g[0]]) for g in groups]
            cache.hidden = [cache.call_for(index, h).run(layer, h) for h in cache.hidden]
    return out


def group_parser(description: str, layers=(3, 15, 27)) -> argparse.ArgumentParser:
    """The options every per-layer-group diagnostic takes: model, layers, calibration size and seed."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", default=None)
    ap.add_argument("--layers", type=int, nargs="+", default=list(layers))
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    return ap


def calibration_and_heldout_groups(model_source, layers, num_samples, seed, seq_len=512):
    """(calibration, held-out) `layer_groups` of the wanted layers of a model (default: the offline
    SmolLM2-135M): calibration windows drawn with `seed`, held-out windows from the evaluation text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_permllm.data.assets import resolve_model

    source = resolve_model(model_source)
    tok = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    cal = layer_groups(model, get_calibration_data(None, tok, num_samples, seq_len, seed=seed), set(layers))
    ho = layer_groups(model, get_calibration_data([get_evaluation_text()], tok, num_samples, seq_len, seed=0), set(layers))
    return cal, ho


def paired_groups(args):
    """Yield (layer, names, weights, calibration statistics, held-out statistics) of every group of linears
    sharing an input in the layers of `group_parser`'s arguments."""
    cal, ho = calibration_and_heldout_groups(args.model, args.layers, args.num_samples, args.seed, args.seq_len)
    for layer in args.layers:
        for (names, ws, stats), (_, _, stats_ho) in zip(cal[layer], ho[layer]):
            yield layer, names, ws, stats, stats_ho


def errors(ws, perm, keeps, g_cal, g_ho):
    """(calibration, held-out, held-out diagonal part) relative errors, mean over the members."""
    cal = ho = diag = 0.0
    for w, keep in zip(ws, keeps):
        wp = w[:, perm]
        d = wp.masked_fill(keep, 0)
        for name, g in (("cal", g_cal), ("ho", g_ho)):
            gp = g[perm][:, perm]
            value = float((d * (d @ gp)).sum() / (wp * (wp @ gp)).sum())
            if name == "cal":
                cal += value
            else:
                ho += value
                diag += float((d.square() * torch.diagonal(gp)).sum() / (wp * (wp @ gp)).sum())
    k = len(ws)
    return round(cal / k, 5), round(ho / k, 5), round(diag / k, 5)


def wanda_keeps(ws, norms, perm, n, m):
    return [nm_mask((w.abs() * norms)[:, perm], n, m) for w in ws]


def gram_keeps(ws, g, norms, perm, n, m, mu):
    gp = g[perm][:, perm]
    return [gram_mask(w[:, perm], gp, k, n, m, mu=mu) for w, k in zip(ws, wanda_keeps(ws, norms, perm, n, m))]


def joint_swap_search(ws, g, keeps, perm, n, m, mu, seconds, pairs_per_round=6, seed=0):
    """Greedy channel swaps between two N:M groups, each scored with both groups' masks re-chosen
    exactly (every pair of options); returns (perm, keeps, accepted swaps). 2:4-sized option sets only."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.cat(ws)  # the group's members share the permutation: their rows are scored together
    keep = torch.cat(keeps)
    perm = perm.clone()
    opts = keep_options(n, m)
    pair_opts = torch.stack([torch.cat([a, b]) for a, b in itertools.product(opts, opts)])  # [K^2, 2m]
    dropped = (~pair_opts).float()
    groups = w.shape[1] // m
    accepted, start = 0, time.perf_counter()
    gr = robust_gram(g, mu)
    while time.perf_counter() - start < seconds:
        gp = gr[perm][:, perm]
        wp = w[:, perm]
        d = wp.masked_fill(keep, 0)
        p = d @ gp
        a_groups = torch.randperm(groups, generator=gen)[: 2 * pairs_per_round].view(-1, 2)
        best_gain, best = 0.0, None
        for a, b in a_groups.tolist():
            cols = torch.cat([torch.arange(a * m, a * m + m), torch.arange(b * m, b * m + m)])
            g_ab = gp[cols][:, cols]
            d_old = d[:, cols]
            q = p[:, cols] - d_old @ g_ab  # the rest of the row's pull on these 2m positions
            old = (2 * d_old * q + (d_old @ g_ab) * d_old).sum()
            for i, j in itertools.product(range(m), range(m)):
                sigma = torch.arange(2 * m)
                sigma[i], sigma[m + j] = m + j, i
                g_s, q_s, w_s = g_ab[sigma][:, sigma], q[:, sigma], wp[:, cols][:, sigma]
                d_new = w_s.unsqueeze(1) * dropped  # [R, K^2, 2m]
                cost = 2 * (d_new * q_s.unsqueeze(1)).sum(-1) + ((d_new @ g_s) * d_new).sum(-1)
                value, choice = cost.min(-1)
                gain = float(old - value.sum())
                if gain > best_gain:
                    best_gain, best = gain, (cols, sigma, choice)
        if best is not None:
            cols, sigma, choice = best
            perm[cols] = perm[cols][sigma]
            keep[:, cols] = pair_opts[choice]
            accepted += 1
    rows = [w_.shape[0] for w_ in ws]
    return perm, list(keep.split(rows)), accepted


def main():
    ap = group_parser(__doc__.splitlines()[0])
    ap.add_argument("--mus", type=float, nargs="+", default=[0.0, 0.1, 0.3, 1.0])
    ap.add_argument("--learned", action="store_true", help="also today's learned permutation (slow)")
    ap.add_argument("--search-seconds", type=float, default=0, help="joint swap search per group (0: skip)")
    ap.add_argument("--search-mu", type=float, default=0.0)
    args = ap.parse_args()
    n, m = 2, 4
    for layer, names, ws, stats, stats_ho in paired_groups(args):
        g, gh, norms = stats.gram(), stats_ho.gram(), stats.feature_norms()
        weights = dict(zip(names, ws))
        ident = torch.arange(ws[0].shape[1])
        heur = plan_group(weights, stats, PermLLMConfig(metric="wanda", permutation="heuristic").to_plan()).perm
        perms = {"identity": ident, "heuristic": heur}
        if args.learned:
            perms["learned"] = plan_group(weights, stats, PermLLMConfig(metric="wanda", permutation="learned",
                                                                      seed=args.seed).to_plan()).perm
        row = {"layer": layer, "group": "+".join(x.split(".")[-1] for x in names)}
        for pname, perm in perms.items():
            row[f"wanda/{pname}"] = errors(ws, perm, wanda_keeps(ws, norms, perm, n, m), g, gh)
            for mu in args.mus:
                row[f"gram{mu}/{pname}"] = errors(ws, perm, gram_keeps(ws, g, norms, perm, n, m, mu), g, gh)
        if args.search_seconds:
            start = gram_keeps(ws, g, norms, heur, n, m, args.search_mu)
            t = time.perf_counter()
            perm, keeps, swaps = joint_swap_search(ws, g, start, heur, n, m, args.search_mu, args.search_seconds)
            keeps = [gram_mask(w[:, perm], g[perm][:, perm], k, n, m, mu=args.search_mu) for w, k in zip(ws, keeps)]
            row[f"joint-search{args.search_mu}/heuristic"] = errors(ws, perm, keeps, g, gh)
            row["search"] = {"swaps": swaps, "seconds": round(time.perf_counter() - t, 1)}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

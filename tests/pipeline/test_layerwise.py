"""The layer-by-layer engine: capture, shared-input groups, plans, folding, end to end on every family."""

import pytest
import torch
from torch import nn

from optimum_permllm import PermLLMConfig, PermutedSparseLinear
from optimum_permllm.nn.permuted_norm import PermutedOutputNorm
from optimum_permllm.algorithms import heuristic_permutation, retained_score, wanda_scores
from optimum_permllm.algorithms.gram_mask import gram_mask
from optimum_permllm.algorithms.refit import DampedGram
from optimum_permllm.algorithms.scores import obs_feature_weights
from optimum_permllm.algorithms.sparsegpt import sparsegpt_prune
from optimum_permllm.algorithms.statistics import InputStatistics
from optimum_permllm.pipeline.capture import capture
from optimum_permllm.pipeline.layerwise import sparsify_layerwise
from optimum_permllm.algorithms.learned import block_size_for
from optimum_permllm.pipeline.planning import plan_group
from optimum_permllm.pipeline.statistics import collect_statistics, split_groups
from optimum_permllm.pipeline.structure import StructureError, find_decoder_layers, layer_linears
from optimum_permllm.sparse import check_nm, identity_permutation, nm_mask
from optimum_permllm.sparse.permutation import head_shared_blocks

from ..conftest import tiny_model

EXPECTED_GROUPS = {
    "llama": [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
              ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]],
    "opt": [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.out_proj"], ["fc1"], ["fc2"]],
    "gpt_neox": [["attention.query_key_value"], ["attention.dense"], ["mlp.dense_h_to_4h"], ["mlp.dense_4h_to_h"]],
}


def _ids(batch=4, length=24, vocab=128, seed=0):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_captured_calls_reproduce_the_model_layer_by_layer(family):
    model = tiny_model(family)
    ids = _ids()
    _, layers = find_decoder_layers(model)
    cache = capture(model, layers, ids, batch_size=2, device="cpu")
    with torch.no_grad():
        expected = model(ids, output_hidden_states=True).hidden_states
        hidden = torch.cat(cache.hidden)
        torch.testing.assert_close(hidden, expected[0])
        for index, layer in enumerate(layers[:-1]):
            hidden = torch.cat([cache.call_for(index, h).run(layer, h) for h in hidden.split(2)])
            torch.testing.assert_close(hidden, expected[index + 1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", sorted(EXPECTED_GROUPS))
def test_linears_that_read_the_same_input_are_grouped(family):
    model = tiny_model(family)
    _, layers = find_decoder_layers(model)
    cache = capture(model, layers, _ids(), batch_size=4, device="cpu")
    stats, groups = collect_statistics(layers[0], 0, cache, layer_linears(layers[0]), track_gram=False)
    assert sorted(map(sorted, groups)) == sorted(map(sorted, EXPECTED_GROUPS[family]))
    assert set(stats) == {group[0] for group in groups}
    assert all(s.num_tokens == 4 * 24 for s in stats.values())


def _random_group(seed=0, out=48, width=64):
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(width, width, generator=generator) / width**0.5  # correlated features, as in LLMs
    x = (torch.randn(512, width, generator=generator) @ mixing) * (1 + 3 * torch.rand(width, generator=generator).pow(3))
    stats = InputStatistics(width, track_gram=True)
    stats.add_batch(x)
    weights = {"a": torch.randn(out, width, generator=generator), "b": torch.randn(out // 2, width, generator=generator)}
    return weights, stats, x


def test_split_groups_gives_the_named_members_groups_of_their_own_on_their_inputs_statistics():
    stats = {"attn.q": "qkv input", "mlp.gate": "mlp input", "attn.o": "o input"}
    groups = [["attn.q", "attn.k", "attn.v"], ["mlp.gate", "mlp.up"], ["attn.o"]]
    split_stats, split = split_groups(stats, groups, ["v"])
    assert split == [["attn.q", "attn.k"], ["attn.v"], ["mlp.gate", "mlp.up"], ["attn.o"]]
    assert split_stats == {"attn.q": "qkv input", "attn.v": "qkv input", "mlp.gate": "mlp input", "attn.o": "o input"}
    assert split_groups(stats, groups, ["attn"])[1] == [["attn.q"], ["attn.k"], ["attn.v"], ["mlp.gate", "mlp.up"],
                                                        ["attn.o"]]


def test_heuristic_plan_keeps_at_least_the_identity_score():
    weights, stats, _ = _random_group()
    plan = plan_group(weights, stats, PermLLMConfig(metric="wanda", permutation="heuristic").to_plan())
    assert plan.info["heuristic_score"] >= plan.info["identity_score"]
    scores = torch.cat([wanda_scores(w, stats.feature_norms()) for w in weights.values()])
    assert retained_score(scores, plan.perm, 2, 4) == pytest.approx(plan.info["heuristic_score"])
    for name, w in weights.items():  # plans hold the original weights, permuted and masked
        assert check_nm(plan.weights[name], 2, 4)
        assert torch.equal(plan.weights[name], w[:, plan.perm].masked_fill(~plan.masks[name], 0))


def test_sparsegpt_plan_reconstructs_the_layer_better_than_wanda():
    weights, stats, x = _random_group(seed=3)
    errors = {}
    for metric in ("wanda", "sparsegpt"):
        plan = plan_group(weights, stats, PermLLMConfig(metric=metric, permutation="heuristic").to_plan())
        xp = x[:, plan.perm]
        errors[metric] = sum(float((xp @ plan.weights[k].T - x @ w.T).square().sum()) for k, w in weights.items())
    assert errors["sparsegpt"] < errors["wanda"]


def test_lsq_plan_takes_sparsegpts_or_the_gram_mask_per_row_and_reconstructs_the_layer_better():
    weights, stats, x = _random_group(seed=4)
    plans = {metric: plan_group(weights, stats, PermLLMConfig(metric=metric, permutation="heuristic").to_plan())
             for metric in ("sparsegpt", "lsq")}
    errors = {}
    for metric, plan in plans.items():
        xp = x[:, plan.perm]
        errors[metric] = sum(float((xp @ plan.weights[k].T - x @ w.T).square().sum()) for k, w in weights.items())
    perm = plans["lsq"].perm
    gram, obs = stats.gram()[perm][:, perm], obs_feature_weights(DampedGram.from_gram(stats.gram(), 0.01))
    for name, w in weights.items():
        lsq = plans["lsq"].masks[name]
        sparsegpt_mask = sparsegpt_prune(w, stats.hessian(), 2, 4, perm=perm)[1]  # in lsq's permutation
        gram_choice = gram_mask(w[:, perm], gram, nm_mask(wanda_scores(w, obs)[:, perm], 2, 4), 2, 4)
        from_sparsegpt = (lsq == sparsegpt_mask).all(1)
        assert bool((from_sparsegpt | (lsq == gram_choice).all(1)).all())
        assert bool(from_sparsegpt.any())
        assert torch.equal(plans["lsq"].weights[name] != 0, lsq)
    # lsq refits each row exactly on SparseGPT's mask or the Gram mask, where SparseGPT updates column by column;
    # measured 0.55 here (0.52-0.59 on seeds 0-4; 0.62 with SparseGPT's mask alone, 0.84 with the refit damped
    # at 1.0, 0.96 with no refit iteration), so 0.7 holds with room for the seed and fails if the refit falls short.
    assert errors["lsq"] < 0.7 * errors["sparsegpt"]


def test_lsq_permutation_is_chosen_on_the_obs_saliency_and_sparsegpts_on_wanda():
    weights, stats, _ = _random_group(seed=6)
    plans = {metric: plan_group(weights, stats, PermLLMConfig(metric=metric, permutation="heuristic").to_plan())
             for metric in ("sparsegpt", "lsq")}
    obs_weights = obs_feature_weights(DampedGram.from_gram(stats.gram(), 0.01))
    obs = torch.cat([wanda_scores(w, obs_weights) for w in weights.values()])
    wanda = torch.cat([wanda_scores(w, stats.feature_norms()) for w in weights.values()])
    assert torch.equal(plans["lsq"].perm, heuristic_permutation(obs, 2, 4))
    assert torch.equal(plans["sparsegpt"].perm, heuristic_permutation(wanda, 2, 4))
    assert not torch.equal(plans["lsq"].perm, plans["sparsegpt"].perm)  # the two scores choose differently here


@pytest.mark.parametrize("permutation", ["none", "heuristic"])
def test_gram_plan_has_the_wanda_plans_permutation_and_a_lower_exact_error(permutation):
    weights, stats, x = _random_group(seed=5)
    plans = {metric: plan_group(weights, stats, PermLLMConfig(metric=metric, permutation=permutation).to_plan())
             for metric in ("wanda", "gram")}
    assert torch.equal(plans["gram"].perm, plans["wanda"].perm)
    errors = {}
    for metric, plan in plans.items():
        xp = x[:, plan.perm]
        for name, w in weights.items():
            assert check_nm(plan.weights[name], 2, 4)
            assert torch.equal(plan.weights[name], w[:, plan.perm].masked_fill(~plan.masks[name], 0))  # no update
        errors[metric] = sum(float((xp @ plan.weights[k].T - x @ w.T).square().sum()) for k, w in weights.items())
    # The Gram mask starts from Wanda's and never raises its (robust) error; the margin is measured: 0.71
    # without and 0.74 with the permutation here (0.67-0.77 on seeds 0-2), so 0.85 holds with room for the seed.
    assert errors["gram"] < 0.85 * errors["wanda"]


def test_block_size_falls_back_to_a_divisor_that_is_a_multiple_of_m():
    assert block_size_for(576, 64, 4) == 64
    assert block_size_for(96, 64, 4) == 48
    assert block_size_for(40, 64, 8) == 40
    assert 100 % block_size_for(100, 64, 4) == 0


@pytest.mark.parametrize("metric,permutation", [("wanda", "heuristic"), ("ria", "none"), ("sparsegpt", "heuristic"),
                                                ("magnitude", "heuristic"), ("gram", "heuristic"),
                                                ("lsq", "none")])
def test_every_linear_is_pruned_and_keeps_its_pattern(family, metric, permutation):
    model = tiny_model(family)
    layers = find_decoder_layers(model)[1]
    config = PermLLMConfig(metric=metric, permutation=permutation)
    names = sparsify_layerwise(model, _ids(), config.to_plan(), progress=False)
    sparse = {n: m for n, m in model.named_modules() if isinstance(m, PermutedSparseLinear)}
    assert sorted(names) == sorted(sparse) and len(sparse) >= 8
    assert not any(isinstance(m, nn.Linear) for m in layers.modules())
    for module in sparse.values():
        assert check_nm(module.permuted_dense_weight(), 2, 4)
    assert torch.isfinite(model(_ids()).logits).all()


@pytest.mark.parametrize("fold", [True, "all"])
def test_folding_keeps_the_logits_and_removes_the_gathers(family, fold, monkeypatch):
    folded, unfolded = tiny_model(family), tiny_model(family)
    sparsify_layerwise(folded, _ids(), PermLLMConfig(permutation="heuristic", fold_permutations=fold).to_plan(), progress=False)
    monkeypatch.setattr("optimum_permllm.pipeline.folding.fold_layer_permutations", lambda *args, **kwargs: [])
    sparsify_layerwise(unfolded, _ids(), PermLLMConfig(permutation="heuristic", fold_permutations=fold).to_plan(), progress=False)
    with torch.no_grad():
        torch.testing.assert_close(folded(_ids(seed=5)).logits, unfolded(_ids(seed=5)).logits, rtol=1e-5, atol=1e-5)
    gathers = lambda m: sum(not x.has_identity_perm() for x in m.modules() if isinstance(x, PermutedSparseLinear))  # noqa: E731
    layers = folded.config.num_hidden_layers
    assert gathers(unfolded) == sum(isinstance(m, PermutedSparseLinear) for m in unfolded.modules())
    # True: only the attention output gathers; "all": it folds into v_proj too, except into GPT-NeoX's fused qkv
    assert gathers(folded) == (0 if fold == "all" and family != "gpt_neox" else layers)
    norms = [m for m in folded.modules() if isinstance(m, PermutedOutputNorm)]
    assert len(norms) == 2 * layers  # the norms before attention and MLP write permuted outputs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fold_check_accepts_rounding_and_refuses_a_reordered_output(dtype):
    """An exact fold only reorders sums: a difference of rounding size (here 20 float32 eps of the largest value,
    more than the 11 measured on Gemma 3 270M) passes; the same output with two features swapped does not."""
    from optimum_permllm.pipeline.folding import FOLD_TOLERANCE, _same_output

    reference = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0)).to(dtype)
    scale = float(reference.abs().max())
    rounding = max(20 * torch.finfo(torch.float32).eps, 0.5 * 8 * torch.finfo(dtype).eps) * scale
    assert _same_output(reference + rounding, reference)
    assert not _same_output(reference + 2 * max(FOLD_TOLERANCE, 8 * torch.finfo(dtype).eps) * scale, reference)
    swapped = reference[..., [1, 0, *range(2, 64)]]
    assert not _same_output(swapped, reference)


def test_fold_true_never_changes_the_chosen_permutations(monkeypatch):
    """Folding only moves each chosen permutation into a producing layer or norm: the planned permutations
    with fold_permutations=True are those chosen with folding off (only "all" constrains o_proj to heads)."""
    from optimum_permllm.pipeline import layerwise

    real_plan_group = layerwise.plan_group
    chosen = {}

    def recording_plan_group(*args, **kwargs):
        plan = real_plan_group(*args, **kwargs)
        chosen[fold].append(plan.perm.clone())
        return plan

    monkeypatch.setattr(layerwise, "plan_group", recording_plan_group)
    folded, unfolded = tiny_model("llama"), tiny_model("llama")
    for model, fold in ((folded, True), (unfolded, False)):
        chosen[fold] = []
        sparsify_layerwise(model, _ids(), PermLLMConfig(permutation="heuristic", fold_permutations=fold).to_plan(), progress=False)
    assert len(chosen[True]) == 2 * 4  # 2 layers x (q/k/v, o, gate/up, down)
    assert all(torch.equal(a, b) for a, b in zip(chosen[True], chosen[False], strict=True))
    assert any(not torch.equal(p, identity_permutation(len(p))) for p in chosen[True])  # not trivially equal
    with torch.no_grad():
        torch.testing.assert_close(folded(_ids(seed=5)).logits, unfolded(_ids(seed=5)).logits, rtol=1e-5, atol=1e-5)


def test_attention_output_permutation_stays_inside_heads_and_is_shared_by_kv_heads(monkeypatch):
    model = tiny_model("llama")  # 4 query heads, 2 KV heads
    monkeypatch.setattr("optimum_permllm.pipeline.folding.fold_layer_permutations", lambda *args, **kwargs: [])
    sparsify_layerwise(model, _ids(), PermLLMConfig(permutation="heuristic", fold_permutations="all").to_plan(), progress=False)
    attention = model.model.layers[0].self_attn
    blocks = head_shared_blocks(attention.o_proj.input_perm, 4, 2)
    assert blocks is not None and not attention.o_proj.has_identity_perm()
    assert head_shared_blocks(attention.q_proj.input_perm, 4, 2) is None  # other groups stay unconstrained


def test_learned_permutation_runs_in_the_pipeline():
    model = tiny_model("llama")
    infos = []
    sparsify_layerwise(model, _ids(), PermLLMConfig(permutation="learned", steps=3).to_plan(), progress=False,
                       callback=lambda index, info: infos.append(info))
    assert len(infos) == 2
    for group in infos[0]["groups"].values():
        assert group["learned_loss"] <= group["init_loss"] + 1e-9


def test_installed_layers_have_the_error_the_learner_reported():
    """The pruned weights the pipeline installs are the ones the learner scored: their mean relative output
    error on the layer's calibration inputs equals the reported learned loss (first layer: dense inputs)."""
    model = tiny_model("llama")
    layer = model.model.layers[0]
    grams = {}

    def keep_gram(name):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            grams[name] = grams.get(name, 0) + x.T @ x
        return hook

    hooks = [getattr(layer.self_attn, n).register_forward_pre_hook(keep_gram(n)) for n in ("q_proj", "o_proj")]
    hooks += [getattr(layer.mlp, n).register_forward_pre_hook(keep_gram(n)) for n in ("gate_proj", "down_proj")]
    dense = {name: module.weight.detach().double().clone() for name, module in layer.named_modules()
             if isinstance(module, nn.Linear)}
    with torch.no_grad():
        model(_ids())
    for hook in hooks:
        hook.remove()
    infos = []
    sparsify_layerwise(model, _ids(), PermLLMConfig(permutation="learned", steps=3, fold_permutations=False).to_plan(),
                       progress=False, callback=lambda index, info: infos.append(info))
    for group, info in infos[0]["groups"].items():
        members = group.split("+")
        gram = grams[members[0].split(".")[-1]]
        errors = []
        for name in members:
            w, pruned = dense[name], layer.get_submodule(name).dense_weight().double()
            errors.append(float(((w - pruned) @ gram * (w - pruned)).sum() / (w @ gram * w).sum()))
        assert sum(errors) / len(errors) == pytest.approx(info["learned_loss"], rel=1e-4)
    # the check has teeth: somewhere the learned permutation differs from its initialisation in error
    assert any(info["learned_loss"] < 0.999 * info["init_loss"] for info in infos[0]["groups"].values())


def test_a_model_without_decoder_layers_is_refused():
    with pytest.raises(StructureError, match="decoder layers"):
        find_decoder_layers(nn.Sequential(nn.Linear(4, 4)))


def test_widths_not_divisible_by_m_name_the_fix():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="modules_to_not_convert"):
        sparsify_layerwise(model, _ids(), PermLLMConfig(sparsity="1:3", permutation="none").to_plan(), progress=False)


def test_tokens_outside_the_vocabulary_are_refused():
    with pytest.raises(ValueError, match="tokenizer does not belong"):
        sparsify_layerwise(tiny_model("llama"), _ids(vocab=1000), PermLLMConfig().to_plan(), progress=False)


def test_skipped_modules_stay_dense():
    model = tiny_model("llama")
    sparsify_layerwise(model, _ids(), PermLLMConfig(modules_to_not_convert=["o_proj"]).to_plan(), progress=False)
    assert isinstance(model.model.layers[0].self_attn.o_proj, nn.Linear)
    assert isinstance(model.model.layers[0].self_attn.q_proj, PermutedSparseLinear)


def test_data_free_magnitude_pruning_is_a_plan_like_any_other(family):
    """Without calibration samples every linear keeps its largest |w| per N:M group, in place, unpermuted."""
    model = tiny_model(family, dtype=torch.bfloat16)
    dense = {name: m.weight.detach().clone() for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    plan = PermLLMConfig(metric="magnitude", permutation="none").to_plan()
    names = sparsify_layerwise(model, None, plan, progress=False)
    assert names and set(names) < set(dense) and "lm_head" not in names
    for name in names:
        layer = model.get_submodule(name)
        w = dense[name]
        assert layer.has_identity_perm()
        assert torch.equal(layer.dense_weight(), w.masked_fill(~nm_mask(w.abs(), 2, 4), 0))


@pytest.mark.parametrize("metric, permutation", [("wanda", "none"), ("magnitude", "heuristic")])
def test_a_plan_that_needs_calibration_refuses_no_samples_before_any_change(metric, permutation):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="needs calibration samples"):
        sparsify_layerwise(model, None, PermLLMConfig(metric=metric, permutation=permutation).to_plan(), progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_own_permutation_plans_the_named_linears_as_groups_of_their_own():
    """q_proj gets the heuristic permutation of its own scores, on the statistics of the input it shares with
    k_proj and v_proj, which keep one shared permutation."""
    import dataclasses

    model = tiny_model("llama")
    attention = model.model.layers[0].self_attn
    dense = {name: getattr(attention, name).weight.detach().clone() for name in ("q_proj", "k_proj", "v_proj")}
    _, layers = find_decoder_layers(model)
    cache = capture(model, layers, _ids(), batch_size=4, device="cpu")
    stats, _ = collect_statistics(layers[0], 0, cache, layer_linears(layers[0]), track_gram=False)
    norms = stats["self_attn.q_proj"].feature_norms()
    infos = []
    plan = dataclasses.replace(PermLLMConfig(fold_permutations=False).to_plan(), own_permutation=("q_proj",))
    sparsify_layerwise(model, _ids(), plan, progress=False, callback=lambda index, info: infos.append(info))
    assert "self_attn.q_proj" in infos[0]["groups"] and "self_attn.k_proj+self_attn.v_proj" in infos[0]["groups"]
    perms = {name: getattr(attention, name).input_perm for name in dense}
    assert torch.equal(perms["q_proj"], heuristic_permutation(wanda_scores(dense["q_proj"], norms), 2, 4))
    shared = torch.cat([wanda_scores(dense[name], norms) for name in ("k_proj", "v_proj")])
    assert torch.equal(perms["k_proj"], heuristic_permutation(shared, 2, 4)) and torch.equal(perms["v_proj"], perms["k_proj"])
    assert not torch.equal(perms["q_proj"], perms["k_proj"])


def test_identity_permutation_helper_matches_plan_for_none():
    weights, stats, _ = _random_group()
    plan = plan_group(weights, stats, PermLLMConfig(permutation="none").to_plan())
    assert torch.equal(plan.perm, identity_permutation(64))


def test_cache_moves_every_tensor_of_the_recorded_calls():
    model = tiny_model("llama")
    _, layers = find_decoder_layers(model)
    cache = capture(model, layers, _ids(), batch_size=2, device="cpu").to("meta")
    call = cache.call_for(0, cache.hidden[0])
    tensors = [t for t in torch.utils._pytree.tree_leaves((call.args, call.kwargs)) if isinstance(t, torch.Tensor)]
    assert tensors and all(t.is_meta for t in tensors) and all(h.is_meta for h in cache.hidden)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_cpu_model_pruned_on_an_explicit_gpu_matches_pruning_on_the_cpu(dtype, kernel_calls):
    """device= prunes each layer of a CPU model on the GPU and puts it back. The pruned layers' outputs, which
    feed the next layer, come from the 2:4 kernel (fp16/bf16, 96 tokens per call): every sparse linear must run
    it, within the dtype's tolerance of the dense masked matmul. The first layer reads the embeddings, the same
    on both devices, so its decisions equal the CPU's; later layers' decisions are not compared: a one-ulp
    change of their fp16 inputs changes about half of a tiny model's kept weights (the heuristic permutation
    moves), measured on the CPU by perturbing the layer outputs."""
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("compute capability < 8.0 has no sparse tensor cores")
    on_cpu, on_gpu = tiny_model("llama", dtype=dtype), tiny_model("llama", dtype=dtype)
    config = PermLLMConfig(metric="wanda", permutation="heuristic")
    sparsify_layerwise(on_cpu, _ids(), config.to_plan(), progress=False, batch_size=4)
    kernel_calls.clear()  # count the GPU run only
    sparsify_layerwise(on_gpu, _ids(), config.to_plan(), progress=False, device="cuda", batch_size=4)
    assert {t.device.type for t in [*on_gpu.parameters(), *on_gpu.buffers()]} == {"cpu"}
    sparse = [m for m in on_gpu.modules() if isinstance(m, PermutedSparseLinear)]
    assert len(sparse) == 14 and set(kernel_calls) == set(sparse), "a sparse linear did not run the 2:4 kernel"
    errors = [error for layer_errors in kernel_calls.values() for error in layer_errors]
    assert max(errors) < {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]  # four unit roundoffs
    expected, state = on_cpu.state_dict(), on_gpu.state_dict()
    assert sorted(state) == sorted(expected)
    if dtype == torch.bfloat16:
        return  # the GPU's bf16 norm output differs from the CPU's by an ulp in places: layer 0 moves (H200, 2026-12-04)
    for key in [k for k in expected if k.startswith("model.layers.0.")]:  # values, masks, permutations, norm
        assert torch.equal(state[key], expected[key]), key


def test_pruning_builds_no_autograd_graph():
    """Activations recomputed between layers must not keep a graph (it held every layer's activations)."""
    states = []
    sparsify_layerwise(tiny_model("llama"), _ids(), PermLLMConfig().to_plan(), progress=False,
                       callback=lambda index, info: states.append(torch.is_grad_enabled()))
    assert states == [False, False]


@pytest.mark.parametrize("metric", ["magnitude", "wanda", "ria", "sparsegpt"])
def test_learned_permutation_is_scored_like_the_heuristic_and_the_final_masks(metric, monkeypatch):
    """One metric scores every step that chooses a permutation: the heuristic start, the learned step and
    the masks kept in the end (SparseGPT, which has no score of its own, is permuted by Wanda)."""
    import optimum_permllm.algorithms.learned as learned
    import optimum_permllm.pipeline.planning as planning

    used = {"heuristic": [], "learned": []}
    real_score_fn, real_learn = planning.score_fn, learned.learn_permutation
    monkeypatch.setattr(planning, "score_fn", lambda name: used["heuristic"].append(name) or real_score_fn(name))
    monkeypatch.setattr(learned, "learn_permutation",
                        lambda *args, **kwargs: used["learned"].append(kwargs["metric"]) or real_learn(*args, **kwargs))
    weights, stats, _ = _random_group()
    plan_group(weights, stats, PermLLMConfig(metric=metric, permutation="learned", steps=2).to_plan())
    expected = "wanda" if metric == "sparsegpt" else metric
    assert used == {"heuristic": [expected] * len(weights), "learned": [expected]}

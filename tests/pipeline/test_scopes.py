"""Scope objectives (a decoder layer's output, and the model scope's last hidden states): definition
(functional substitution == editing the layer), zero at the dense weights, the windows scored, gradients
reach only the candidate weights, and learning never loses on the scope."""

import copy

import pytest
import torch

from optimum_permllm.algorithms.learned_permutation import learn_permutation
from optimum_permllm.algorithms.heuristic_permutation import heuristic_permutation
from optimum_permllm.algorithms.scores import wanda_scores
from optimum_permllm.pipeline.capture import capture
from optimum_permllm.pipeline.scopes import ScopeObjective, cosine_loss, feature_scale, scope_loss_fn
from optimum_permllm.pipeline.structure import find_decoder_layers
from optimum_permllm.sparse.nm import nm_mask

from ..conftest import tiny_model

GROUP = ["mlp.gate_proj", "mlp.up_proj"]


@pytest.fixture
def setup():
    model = tiny_model("llama", layers=3)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    _, layers = find_decoder_layers(model)
    cache = capture(model, layers, ids, batch_size=1, device="cpu")
    return model, layers, cache


def _pruned(layer):
    weights = [layer.get_submodule(name).weight.detach() for name in GROUP]
    return [w.masked_fill(~nm_mask(w.abs(), 2, 4), 0) for w in weights]


def _reference(layers, cache, index, pruned, through, batches=2):
    """Edit a copy of the layers and run them on the first `batches` cached batches: 1 - cos against the
    untouched dense run, every feature divided by its RMS over the dense outputs."""
    edited = copy.deepcopy(layers)
    with torch.no_grad():
        for name, w in zip(GROUP, pruned):
            edited[index].get_submodule(name).weight.copy_(w)
        outs, refs = [], []
        for h in cache.hidden[:batches]:
            out, ref = h, h
            for j in range(index, through + 1):
                out = cache.call_for(j, out).run(edited[j], out)
                ref = cache.call_for(j, ref).run(layers[j], ref)
            outs.append(out)
            refs.append(ref)
        rms = torch.cat([r.reshape(-1, r.shape[-1]) for r in refs]).pow(2).mean(0).sqrt()
        losses = [1 - torch.nn.functional.cosine_similarity(o / rms, r / rms, dim=-1).mean() for o, r in zip(outs, refs)]
    return float(torch.stack(losses).mean())


@pytest.mark.parametrize("scope", ["layer output", "model"])
def test_scope_loss_is_the_cosine_loss_of_the_edited_layer(setup, scope):
    model, layers, cache = setup
    if scope == "model":
        loss_fn = scope_loss_fn(scope, layers[0], 0, cache, GROUP, windows=2, later_layers=layers[1:])
    else:
        loss_fn = ScopeObjective(layers[0], 0, cache, GROUP, windows=2)
    dense = [layers[0].get_submodule(name).weight.detach() for name in GROUP]
    assert float(loss_fn(dense)) == pytest.approx(0.0, abs=1e-6)
    through = 0 if scope == "layer output" else len(layers) - 1
    value = float(loss_fn(_pruned(layers[0])))
    assert value > 1e-5 and value == pytest.approx(_reference(layers, cache, 0, _pruned(layers[0]), through), rel=1e-4)


@pytest.mark.parametrize("windows, batches", [(1, 1), (2, 1), (3, 2), (16, 3)])
def test_scope_objective_is_scored_on_the_first_batches_holding_enough_windows(setup, windows, batches):
    model, layers, _ = setup
    ids = torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(2))
    cache = capture(model, layers, ids, batch_size=2, device="cpu")  # 3 batches of 2 windows
    loss_fn = scope_loss_fn("model", layers[0], 0, cache, GROUP, windows=windows, later_layers=layers[1:])
    value, last = float(loss_fn(_pruned(layers[0]))), len(layers) - 1
    assert value == pytest.approx(_reference(layers, cache, 0, _pruned(layers[0]), last, batches), rel=1e-4)
    if batches < 3:  # fewer batches give a different value, so the count is really checked
        assert value != pytest.approx(_reference(layers, cache, 0, _pruned(layers[0]), last, 3), rel=1e-4)
    with pytest.raises(ValueError, match="windows >= 1"):
        scope_loss_fn("model", layers[0], 0, cache, GROUP, windows=0)


def test_gradients_reach_the_candidates_and_never_the_model(setup):
    model, layers, cache = setup
    loss_fn = scope_loss_fn("model", layers[0], 0, cache, GROUP, later_layers=layers[1:])
    candidates = [w.clone().requires_grad_(True) for w in _pruned(layers[0])]
    loss_fn(candidates).backward()
    assert all(c.grad is not None and c.grad.abs().sum() > 0 for c in candidates)
    assert all(p.grad is None for p in model.parameters())


def test_layer_scope_uses_the_gram_objective_and_unknown_scopes_fail(setup):
    _, layers, cache = setup
    assert scope_loss_fn("layer", layers[0], 0, cache, GROUP) is None
    for removed in ("block", "global"):
        with pytest.raises(ValueError, match="valid scopes: layer, model"):
            scope_loss_fn(removed, layers[0], 0, cache, GROUP)


def test_learning_on_the_model_scope_never_loses_to_its_init(setup, one_thread):
    _, layers, cache = setup
    layer = layers[1]
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(1))
    gram, norms = x.T @ x / 64, x.norm(dim=0)
    weights = [layer.get_submodule(name).weight.detach() for name in GROUP]
    init = heuristic_permutation(torch.cat([wanda_scores(w, norms) for w in weights]), 2, 4)
    with torch.no_grad():
        cache.hidden = [cache.call_for(0, h).run(layers[0], h) for h in cache.hidden]  # layer 1's inputs
    loss_fn = scope_loss_fn("model", layer, 1, cache, GROUP, later_layers=layers[2:])
    result = learn_permutation(weights, gram, norms, 2, 4, init_perm=init, block_size=32, steps=3, refine_rounds=2,
                               loss_fn=loss_fn)
    assert result.best_loss <= result.init_loss
    pruned = []
    for w in weights:
        mask = nm_mask(wanda_scores(w, norms)[:, result.perm], 2, 4)
        out = torch.empty_like(w)
        out[:, result.perm] = w[:, result.perm].masked_fill(~mask, 0)
        pruned.append(out)
    assert result.best_loss == pytest.approx(float(loss_fn(pruned)), rel=1e-4, abs=1e-7)


def test_standardised_cosine_sees_every_feature_not_only_the_massive_one():
    torch.manual_seed(0)
    target = torch.randn(4, 8, 16)
    target[..., 0] = 1000.0  # one massive feature, as in an LLM residual stream
    damaged = target.clone()
    damaged[..., 1:] = torch.randn(4, 8, 15)  # every other feature replaced by noise
    assert float(cosine_loss(damaged, target)) < 1e-4  # a plain cosine barely notices
    assert float(cosine_loss(damaged, target, feature_scale([target]))) > 0.5


def test_feature_scale_hand_computed():
    """RMS of each feature over every token of every output; a dead feature is floored at 1e-6 of the largest."""
    outputs = [torch.tensor([[[1.0, 0.0, 2.0]]]), torch.tensor([[7.0, 0.0, -2.0]])]
    # feature 0: sqrt((1 + 49) / 2) = 5; feature 1: 0, floored to 1e-6 * 5; feature 2: sqrt((4 + 4) / 2) = 2
    assert torch.allclose(feature_scale(outputs), torch.tensor([5.0, 5e-6, 2.0]), rtol=1e-6, atol=0)


def test_cosine_loss_hand_computed():
    """1 - cos over the last dimension, averaged over tokens; a scale divides the features first."""
    output, target = torch.tensor([[1.0, 1.0], [3.0, 0.0]]), torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    # token 0: cos = 1 / sqrt(2); token 1: parallel, cos = 1
    assert float(cosine_loss(output, target)) == pytest.approx((1 - 2 ** -0.5) / 2, rel=1e-6)
    # divided by (1, 2): token 0 becomes (1, 0.5) against (1, 0), cos = 1 / sqrt(1.25)
    assert float(cosine_loss(output, target, torch.tensor([1.0, 2.0]))) == pytest.approx((1 - 1.25 ** -0.5) / 2, rel=1e-6)

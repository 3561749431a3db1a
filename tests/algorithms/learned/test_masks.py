"""masked_weight: PermLLM's W * (mask(S P) P^T) against its definition, and its gradients."""

import torch

from optimum_permllm.algorithms.assignment import assignment_matrix
from optimum_permllm.algorithms.learned import BlockPermutation, masked_weight
from optimum_permllm.sparse import nm_mask
from optimum_permllm.sparse.permutation import invert_permutation


def test_masked_weight_with_hard_blocks_is_the_weight_pruned_in_that_permutation():
    g = torch.Generator().manual_seed(0)
    weight, scores = torch.randn(6, 32, generator=g), torch.rand(6, 32, generator=g)
    init = torch.randperm(32, generator=g)
    module = BlockPermutation(32, 16, init, g)
    slots = torch.stack([torch.randperm(16, generator=g) for _ in range(2)])
    perm = module.perm_from_blocks(slots)
    got = masked_weight(weight, scores, assignment_matrix(slots), init, invert_permutation(init), 2, 4)
    mask = nm_mask(scores[:, perm], 2, 4)[:, invert_permutation(perm)]  # the definition, in original order
    assert torch.equal(got, weight * mask)
    assert torch.equal(got != 0, mask)


def test_masked_weight_is_exact_forward_and_sends_gradients_to_the_block_logits():
    g = torch.Generator().manual_seed(1)
    weight, scores = torch.randn(4, 16, generator=g), torch.rand(4, 16, generator=g)
    module = BlockPermutation(16, 8, generator=g)
    perm, blocks = module(tau=0.5)
    out = masked_weight(weight, scores, blocks, module.init_perm, invert_permutation(module.init_perm), 2, 4)
    assert torch.equal(out.detach(), weight * nm_mask(scores[:, perm], 2, 4)[:, invert_permutation(perm)])
    (out * torch.randn(4, 16, generator=g)).sum().backward()
    assert module.weight.grad.abs().sum() > 0

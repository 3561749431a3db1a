"""PermutedSparseLinear: the drop-in replacement for nn.Linear that holds an N:M weight.

It stores the portable form only (input permutation, packed kept values, position bitmask, bias), so
checkpoints are kernel-agnostic. The fast CUDA form (a semi-structured tensor) is built lazily on the
device at first use and is never saved.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from . import cuda_sparse
from ..sparse.nm import NMPattern, check_nm, nm_mask, pack_nm, unpack_bits, unpack_nm
from ..sparse.permutation import check_permutation, identity_permutation, invert_permutation, is_identity

logger = logging.getLogger(__name__)


class PermutedSparseLinear(nn.Module):
    """y = x[..., input_perm] @ W_p.T + bias, with W_p an N:M-sparse weight in permuted column order.

    State dict keys: `weight` (kept values, [out, in*n/m]), `weight_mask` (uint8 bitmask of kept
    positions, [out, ceil(in/8)]), `input_perm` (int64 [in]) and `bias` when present. Naming the packed
    values `weight` makes a plain transformers model refuse the checkpoint (shape mismatch) instead of
    silently loading random weights when the plugin is not imported.
    """

    def __init__(self, in_features: int, out_features: int, n: int = 2, m: int = 4, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        pattern = NMPattern(n, m)
        pattern.check_width(in_features)
        self.in_features, self.out_features, self.n, self.m = in_features, out_features, n, m
        kept = in_features * n // m
        self.weight = nn.Parameter(torch.zeros(out_features, kept, device=device, dtype=dtype), requires_grad=False)
        self.register_buffer("weight_mask", torch.zeros(out_features, -(-in_features // 8), dtype=torch.uint8, device=device))
        self.register_buffer("input_perm", identity_permutation(in_features, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._compressed = None  # (key, semi-structured tensor) built lazily on CUDA, never saved
        self._dense = None  # (key, unpacked weight) for the dense path, never saved
        self._skip_gather = None  # (key, "input_perm is the identity"), recomputed when input_perm changes

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_linear(cls, linear: nn.Linear, n: int = 2, m: int = 4, mask: torch.Tensor | None = None,
                    perm: torch.Tensor | None = None, weight: torch.Tensor | None = None) -> PermutedSparseLinear:
        """Build from a dense nn.Linear.

        `perm` permutes the input channels (identity if None). `weight`, if given, replaces the dense
        weight and must already be in permuted column order (e.g. SparseGPT's updated weight). `mask` is
        in permuted order; if None, the N:M mask keeps the largest magnitudes of the permuted weight.
        """
        dense = linear.weight.detach()
        perm = identity_permutation(linear.in_features, dense.device) if perm is None else perm.to(dense.device).long()
        check_permutation(perm, linear.in_features)
        permuted = dense[:, perm] if weight is None else weight.detach().to(dense.device, dense.dtype)
        if mask is None:
            mask = nm_mask(permuted.abs(), n, m)
        module = cls(linear.in_features, linear.out_features, n, m, bias=linear.bias is not None,
                     device=dense.device, dtype=dense.dtype)
        module.load_packed(permuted.masked_fill(~mask.to(torch.bool), 0), perm, mask=mask,
                           bias=None if linear.bias is None else linear.bias.detach())
        return module

    def load_packed(self, permuted_weight: torch.Tensor, perm: torch.Tensor, mask: torch.Tensor | None = None,
                    bias: torch.Tensor | None = None) -> None:
        """Store a dense N:M weight given in permuted column order, with its permutation."""
        values, bitmask = pack_nm(permuted_weight, self.n, self.m, mask=mask)
        with torch.no_grad():
            self.weight.data = values.to(self.weight.dtype)
            self.weight_mask.data = bitmask.to(self.weight_mask.device)
            self.input_perm.data = perm.long().to(self.input_perm.device).clone()  # layers of a group never share it
            if bias is not None:
                self.bias.data = bias.to(self.bias.dtype)
        self.free_cache()

    @torch.no_grad()
    def set_input_perm(self, perm: torch.Tensor) -> None:
        """Read the input in another order without touching the weight (folding moves a permutation
        into the producer of the input, or back out of it)."""
        check_permutation(perm, self.in_features)
        self.input_perm.data = perm.detach().long().clone().to(self.input_perm.device)
        self.free_cache()

    @torch.no_grad()
    def permute_output_rows(self, perm: torch.Tensor) -> None:
        """Reorder the output features: out_new[j] = out_old[perm[j]]. Rows keep their N:M pattern."""
        check_permutation(perm, self.out_features)
        perm = perm.to(self.weight.device)
        self.weight_mask.data = self.weight_mask.data[perm.to(self.weight_mask.device)]
        self.weight.data = self.weight.data[perm]
        if self.bias is not None:
            self.bias.data = self.bias.data[perm.to(self.bias.device)]
        self.free_cache()

    def free_cache(self) -> None:
        """Drop the weights derived for the forward (unpacked, compressed CUDA) and the identity flag;
        they are rebuilt at the next call. The module calls it whenever its stored tensors change;
        an offloading hook calls it to free the execution device between forwards."""
        self._compressed = None
        self._dense = None
        self._skip_gather = None

    # ----------------------------------------------------------------- views of the weight
    def permuted_mask(self) -> torch.Tensor:
        """Boolean [out, in] mask of kept weights, in permuted column order."""
        return unpack_bits(self.weight_mask, self.in_features)

    def permuted_dense_weight(self) -> torch.Tensor:
        """Dense [out, in] weight in permuted column order, zeros where pruned."""
        return unpack_nm(self.weight, self.weight_mask, self.in_features)

    def dense_weight(self) -> torch.Tensor:
        """Dense [out, in] weight in the original column order (what a plain nn.Linear would hold)."""
        return self.permuted_dense_weight()[:, invert_permutation(self.input_perm)]

    def to_linear(self) -> nn.Linear:
        """The equivalent dense nn.Linear: un-permuted, zeros in place of pruned weights."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.dense_weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    # ----------------------------------------------------------------- forward
    def has_identity_perm(self) -> bool:
        """True when the input permutation is the identity (folded or never permuted): no gather."""
        key = (self.input_perm.data_ptr(), self.input_perm._version)
        if self._skip_gather is None or self._skip_gather[0] != key:
            self._skip_gather = (key, is_identity(self.input_perm))
        return self._skip_gather[1]

    def permute_input(self, x: torch.Tensor) -> torch.Tensor:
        """Gather the input features into the stored order (skipped for the identity)."""
        return x if self.has_identity_perm() else x.index_select(-1, self.input_perm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and self._uses_kernel(x):
            x = self.permute_input(x)
            return cuda_sparse.sparse_linear(x, self._cuda_weight(), self.permuted_dense_weight, self.bias, 0)
        return self._dense_call(x)

    def _uses_kernel(self, x: torch.Tensor) -> bool:
        """True for calls large enough to gain from the 2:4 kernel (`min_tokens_for`) on a layer it serves.
        The compressed weight is built at the first such call, so decode never holds it."""
        tokens = x.numel() // max(self.in_features, 1)
        if tokens < cuda_sparse.min_tokens_for(self.out_features, self.in_features):
            return False
        same_dtype = x.dtype == self.weight.dtype and (self.bias is None or self.bias.dtype == x.dtype)
        return same_dtype and self._cuda_weight() is not None

    def _dense_call(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T + bias with the cached dense weight in the input's own column order: one matmul, no gather,
        as cheap as the dense layer (casts only when x has another dtype)."""
        weight, bias = self._cached_dense_weight(), self.bias
        if weight.dtype != x.dtype:
            weight = weight.to(x.dtype)
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        return F.linear(x, weight, bias)

    def _weight_key(self) -> tuple:
        """What the derived weights depend on: the packed values and the mask (their place and version)."""
        return (self.weight.device, self.weight.dtype, self.weight._version, self.weight.data_ptr(),
                self.weight_mask._version, self.weight_mask.data_ptr())

    def _cached_dense_weight(self) -> torch.Tensor:
        """The dense weight in the original column order (the permutation folded into it), kept between calls
        (unpacking every call costs more than the matmul at decode sizes). Rebuilt when the stored tensors
        or the permutation change."""
        key = (*self._weight_key(), self.input_perm._version, self.input_perm.data_ptr())
        if self._dense is None or self._dense[0] != key:
            self._dense = (key, self.dense_weight().contiguous())
        return self._dense[1]

    def _cuda_weight(self):
        """The semi-structured weight for this device and dtype, or None when no kernel serves it.
        Rebuilt when the packed values or the mask change (a stale one computes with old positions)."""
        key = self._weight_key()
        if self._compressed is not None and self._compressed[0] == key:
            return self._compressed[1]
        reason = cuda_sparse.semi_structured_support((self.out_features, self.in_features), self.weight.dtype,
                                         self.weight.device, self.n, self.m)
        if reason is not None:
            logger.info("PermutedSparseLinear(%d -> %d, %s) stays on the dense path: %s", self.in_features,
                        self.out_features, self.weight.dtype, reason)
        compressed = None if reason is not None else cuda_sparse.compress_weight(self._checked_nm_weight())
        self._compressed = (key, compressed)
        return compressed

    def _checked_nm_weight(self) -> torch.Tensor:
        """The permuted dense weight, refused unless it is N:M (the semi-structured kernel would compute garbage)."""
        dense = self.permuted_dense_weight()
        if not check_nm(dense, self.n, self.m):
            raise ValueError(f"This PermutedSparseLinear claims {self.n}:{self.m} but its weight_mask keeps more than "
                             f"{self.n} of {self.m} entries in some groups; reload it from a valid checkpoint.")
        return dense

    def extra_repr(self) -> str:
        perm = "offloaded" if self.input_perm.is_meta else "identity" if self.has_identity_perm() else "permuted"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"sparsity={self.n}:{self.m}, input_perm={perm}, bias={self.bias is not None}")

    def _apply(self, fn, recurse=True):
        self.free_cache()
        return super()._apply(fn, recurse)

"""Triton kernel for the permuted norm: one program per row, output written in permuted column order.

Pass 1 (LayerNorm only) takes the row mean, pass 2 the mean square of (x - mean), pass 3 reads
x[perm[j]] and w[perm[j]] and writes column j. Rows are re-read from cache, never staged in HBM.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

KIND_CODES = {"rms": 0, "rms_one_plus": 1, "layer": 2}
MAX_BLOCK = 4096


@triton.jit
def _permuted_norm_kernel(x_ptr, w_ptr, b_ptr, perm_ptr, out_ptr, x_row_stride, out_row_stride, n_cols, eps,
                          KIND: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                          BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_row_stride
    out_row = out_ptr + row * out_row_stride
    offsets = tl.arange(0, BLOCK)
    mean = 0.0
    if KIND == 2:
        total = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + offsets
            total += tl.load(x_row + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        mean = tl.sum(total, axis=0) / n_cols
    squares = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + offsets
        inside = cols < n_cols
        centred = tl.load(x_row + cols, mask=inside, other=0.0).to(tl.float32) - mean
        centred = tl.where(inside, centred, 0.0)
        squares += centred * centred
    rstd = tl.rsqrt(tl.sum(squares, axis=0) / n_cols + eps)
    for start in range(0, n_cols, BLOCK):
        cols = start + offsets
        inside = cols < n_cols
        src = tl.load(perm_ptr + cols, mask=inside, other=0).to(tl.int64)
        y = (tl.load(x_row + src, mask=inside, other=0.0).to(tl.float32) - mean) * rstd
        if KIND == 0:
            y = y.to(x_ptr.dtype.element_ty).to(tl.float32)  # LLaMA rounds before the weight multiply
        if HAS_WEIGHT:
            w = tl.load(w_ptr + src, mask=inside, other=0.0).to(tl.float32)
            if KIND == 1:
                w = w + 1.0
            y = y * w
        if HAS_BIAS:
            y = y + tl.load(b_ptr + src, mask=inside, other=0.0).to(tl.float32)
        tl.store(out_row + cols, y.to(out_ptr.dtype.element_ty), mask=inside)


def permuted_norm_triton(x: torch.Tensor, weight, bias, perm: torch.Tensor, eps: float, kind: str) -> torch.Tensor:
    """Launch the fused norm + gather on a 2-D view of x (perm must be a permutation of the columns)."""
    n_cols = x.shape[-1]
    if perm.numel() != n_cols:
        raise ValueError(f"perm has {perm.numel()} entries but x has {n_cols} columns; the fused norm "
                         "needs a full permutation (use x.index_select for other index sets).")
    x2d = x.reshape(-1, n_cols)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    out = torch.empty(x2d.shape, dtype=norm_output_dtype(x, weight, kind), device=x.device)
    if out.numel():
        block = min(triton.next_power_of_2(n_cols), MAX_BLOCK)
        _permuted_norm_kernel[(x2d.shape[0],)](
            x2d, _contiguous(weight, x2d), _contiguous(bias, x2d), perm.to(x.device).contiguous(), out,
            x2d.stride(0), out.stride(0), n_cols, float(eps),
            KIND=KIND_CODES[kind], HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            BLOCK=block, num_warps=_num_warps(block))
    return out.reshape(x.shape[:-1] + (n_cols,))


def norm_output_dtype(x: torch.Tensor, weight: torch.Tensor | None, kind: str) -> torch.dtype:
    """The dtype the Hugging Face module returns (LLaMA's multiply by w promotes)."""
    if kind == "rms" and weight is not None:
        return torch.promote_types(x.dtype, weight.dtype)
    return x.dtype


def _contiguous(tensor, placeholder: torch.Tensor) -> torch.Tensor:
    """The tensor made contiguous, or a placeholder pointer the kernel never reads when it is None."""
    return placeholder if tensor is None else tensor.contiguous()


def _num_warps(block: int) -> int:
    """More warps for wider rows: 4 up to 2048 columns per block, then 8."""
    return 4 if block <= 2048 else 8

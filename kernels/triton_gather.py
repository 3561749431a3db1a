"""Triton kernel for `x[..., perm]`: each program copies a tile of rows x gathered columns."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_ROWS = 16
BLOCK_COLS = 256


@triton.jit
def _gather_columns_kernel(x_ptr, perm_ptr, out_ptr, n_rows, n_out, x_row_stride, out_row_stride,
                           BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < n_out
    src = tl.load(perm_ptr + cols, mask=col_ok, other=0).to(tl.int64)
    rows64 = rows.to(tl.int64)[:, None]
    inside = (rows[:, None] < n_rows) & col_ok[None, :]
    values = tl.load(x_ptr + rows64 * x_row_stride + src[None, :], mask=inside)
    tl.store(out_ptr + rows64 * out_row_stride + cols[None, :], values, mask=inside)


def gather_columns_triton(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Launch the gather on a 2-D view of x; the result is contiguous with shape [..., len(perm)]."""
    x2d = x.reshape(-1, x.shape[-1])
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    perm = perm.to(x.device).contiguous()
    out = torch.empty(x2d.shape[0], perm.numel(), dtype=x.dtype, device=x.device)
    if out.numel():
        block_r = min(BLOCK_ROWS, triton.next_power_of_2(x2d.shape[0]))
        grid = (triton.cdiv(x2d.shape[0], block_r), triton.cdiv(perm.numel(), BLOCK_COLS))
        _gather_columns_kernel[grid](x2d, perm, out, x2d.shape[0], perm.numel(), x2d.stride(0), out.stride(0),
                                     BLOCK_R=block_r, BLOCK_C=BLOCK_COLS)
    return out.reshape(*x.shape[:-1], perm.numel())

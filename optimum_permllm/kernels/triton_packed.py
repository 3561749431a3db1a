"""Triton kernel for few-token calls of a packed 2:4 layer: y = x @ W.T read straight from (values, bitmask).

Decode is memory-bound: the dense matmul reads the whole weight, the packed form is 0.56x of it (half the
values plus one bit per position). Each program computes BLOCK_O outputs of up to BLOCK_T tokens; for kept value j of
a row, its column is 4 * (j // 2) plus the position of the (j % 2)-th set bit of the group's 4-bit nibble.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _lowest_bit(nibble):
    """Position (0-3) of the lowest set bit of a 4-bit value with at least one bit set."""
    return tl.where((nibble & 1) != 0, 0, tl.where((nibble & 2) != 0, 1, tl.where((nibble & 4) != 0, 2, 3)))


@triton.jit
def _packed_24_kernel(x_ptr, values_ptr, bitmask_ptr, bias_ptr, out_ptr, n_tokens, n_out, n_kept, x_row_stride,
                      values_row_stride, bitmask_row_stride, out_row_stride, HAS_BIAS: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_J: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)).to(tl.int64)
    tokens = (tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    row_inside = rows < n_out
    token_inside = tokens < n_tokens
    acc = tl.zeros([BLOCK_T, BLOCK_O], dtype=tl.float32)
    for start in range(0, n_kept, BLOCK_J):
        kept = start + tl.arange(0, BLOCK_J)
        inside = row_inside[:, None] & (kept < n_kept)[None, :]
        values = tl.load(values_ptr + rows[:, None] * values_row_stride + kept[None, :], mask=inside, other=0.0)
        byte = tl.load(bitmask_ptr + rows[:, None] * bitmask_row_stride + (kept // 4)[None, :], mask=inside,
                       other=1).to(tl.int32)
        nibble = (byte >> (4 * ((kept // 2) % 2))[None, :]) & 15
        position = tl.where((kept % 2 == 0)[None, :], _lowest_bit(nibble), _lowest_bit(nibble & (nibble - 1)))
        columns = 4 * (kept // 2)[None, :] + position  # [BLOCK_O, BLOCK_J]
        x = tl.load(x_ptr + tokens[:, None, None] * x_row_stride + columns[None, :, :],
                    mask=token_inside[:, None, None] & inside[None, :, :], other=0.0)
        acc += tl.sum(values.to(tl.float32)[None, :, :] * x.to(tl.float32), axis=2)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=row_inside, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + tokens[:, None] * out_row_stride + rows[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=token_inside[:, None] & row_inside[None, :])


def packed_24_linear_triton(x: torch.Tensor, values: torch.Tensor, bitmask: torch.Tensor,
                            bias: torch.Tensor | None, block_o: int = 16, block_j: int = 128) -> torch.Tensor:
    """x [..., in] @ W.T (+ bias) for a 2:4 weight packed as values [out, in/2] and bitmask [out, ceil(in/8)].
    Up to 8 tokens share each program, so the weight is read once per 8 tokens."""
    in_features = x.shape[-1]
    x2d = x.reshape(-1, in_features)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    values, bitmask = values.contiguous(), bitmask.contiguous()
    out_features, kept = values.shape
    n_tokens = x2d.shape[0]
    out = torch.empty(n_tokens, out_features, device=x.device, dtype=x.dtype)
    if n_tokens and out_features:
        block_t = min(triton.next_power_of_2(n_tokens), 8)
        block_j = block_j // block_t if block_t > 2 else block_j  # bound the [T, O, J] tile in registers
        grid = (triton.cdiv(out_features, block_o), triton.cdiv(n_tokens, block_t))
        _packed_24_kernel[grid](x2d, values, bitmask, bias if bias is not None else values, out, n_tokens,
                                out_features, kept, x2d.stride(0), values.stride(0), bitmask.stride(0),
                                out.stride(0), HAS_BIAS=bias is not None, BLOCK_T=block_t, BLOCK_O=block_o,
                                BLOCK_J=max(block_j, 16))
    return out.reshape(*x.shape[:-1], out_features)

"""The adapter's pooling epilogue: residual add, LayerNorm, average pooling of query groups.

``layernorm_pool(x, residual, weight, bias, eps, stride)`` is the mean over groups of ``stride``
rows of LayerNorm(x + residual); a remainder of N % stride rows is dropped, as the release's
adapter does. One Triton program per output row reads its ``stride`` input rows once and writes
one row: the normalized (B, N, C) tensor is never stored, and backward recomputes it from the
saved per-row mean and 1/std. Launch: a whole 768-wide row per program (BLOCK_C = 1024 with a
mask), the ``stride`` rows padded to a power of two (5 -> 8) and masked; 4 warps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from mcat_kernels.dispatch import KERNEL_DTYPES, use_triton


def layernorm_pool_reference(x, residual, weight, bias, eps: float, stride: int) -> torch.Tensor:
    batch, rows, channels = x.shape
    kept = rows - rows % stride
    normed = F.layer_norm((x + residual)[:, :kept], (channels,), weight, bias, eps)
    return normed.view(batch, kept // stride, stride, channels).mean(dim=2)


@triton.jit
def _layernorm_pool_forward(
    X, R, W, B, OUT, MEAN, RSTD,
    stride_xb, stride_xn, stride_rb, stride_rn, stride_ob, stride_og,
    groups, kept, channels, eps,
    STRIDE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    program = tl.program_id(0).to(tl.int64)  # b * stride_xb: int64, like every batch offset
    b = program // groups
    g = program % groups
    offsets = tl.arange(0, BLOCK_S)
    rows = g * STRIDE + offsets
    cols = tl.arange(0, BLOCK_C)
    row_ok = offsets < STRIDE
    col_ok = cols < channels
    ok = row_ok[:, None] & col_ok[None, :]
    h = tl.load(X + b * stride_xb + rows[:, None] * stride_xn + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    h += tl.load(R + b * stride_rb + rows[:, None] * stride_rn + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    mean = tl.sum(h, 1) / channels
    centered = tl.where(ok, h - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, 1) / channels + eps)
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    bias = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = centered * rstd[:, None] * w[None, :] + bias[None, :]
    y = tl.where(ok, y, 0.0)
    tl.store(OUT + b * stride_ob + g * stride_og + cols, (tl.sum(y, 0) / STRIDE).to(OUT.dtype.element_ty), mask=col_ok)
    tl.store(MEAN + b * kept + rows, mean, mask=row_ok)
    tl.store(RSTD + b * kept + rows, rstd, mask=row_ok)


@triton.jit
def _layernorm_pool_backward(
    X, R, W, DOUT, MEAN, RSTD, DX, DW_PARTIAL, DB_PARTIAL,
    stride_xb, stride_xn, stride_rb, stride_rn, stride_gb, stride_gg, stride_dxb, stride_dxn,
    groups, kept, channels,
    STRIDE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    program = tl.program_id(0).to(tl.int64)  # b * stride_xb: int64, like every batch offset
    b = program // groups
    g = program % groups
    offsets = tl.arange(0, BLOCK_S)
    rows = g * STRIDE + offsets
    cols = tl.arange(0, BLOCK_C)
    row_ok = offsets < STRIDE
    col_ok = cols < channels
    ok = row_ok[:, None] & col_ok[None, :]
    h = tl.load(X + b * stride_xb + rows[:, None] * stride_xn + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    h += tl.load(R + b * stride_rb + rows[:, None] * stride_rn + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    mean = tl.load(MEAN + b * kept + rows, mask=row_ok, other=0.0)
    rstd = tl.load(RSTD + b * kept + rows, mask=row_ok, other=0.0)
    xhat = tl.where(ok, (h - mean[:, None]) * rstd[:, None], 0.0)
    # every row of the group receives the pooled gradient / STRIDE
    dy = tl.load(DOUT + b * stride_gb + g * stride_gg + cols, mask=col_ok, other=0.0).to(tl.float32) / STRIDE
    dy = tl.where(ok, dy[None, :], 0.0)
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    wdy = dy * w[None, :]
    c1 = tl.sum(xhat * wdy, 1) / channels
    c2 = tl.sum(wdy, 1) / channels
    dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
    tl.store(DX + b * stride_dxb + rows[:, None] * stride_dxn + cols[None, :], dx.to(DX.dtype.element_ty), mask=ok)
    tl.store(DW_PARTIAL + program * channels + cols, tl.sum(dy * xhat, 0), mask=col_ok)
    tl.store(DB_PARTIAL + program * channels + cols, tl.sum(dy, 0), mask=col_ok)


NUM_WARPS = 4


def _blocks(stride: int, channels: int) -> tuple[int, int]:
    return triton.next_power_of_2(stride), triton.next_power_of_2(channels)


class LayerNormPoolFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, stride):
        batch, rows, channels = x.shape
        groups = rows // stride
        kept = groups * stride
        x_rows = x if x.stride(-1) == 1 else x.contiguous()
        r_rows = residual if residual.stride(-1) == 1 else residual.contiguous()
        out = torch.empty(batch, groups, channels, device=x.device, dtype=x.dtype)
        mean = torch.empty(batch * kept, device=x.device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        block_s, block_c = _blocks(stride, channels)
        _layernorm_pool_forward[(batch * groups,)](
            x_rows, r_rows, weight, bias, out, mean, rstd,
            x_rows.stride(0), x_rows.stride(1), r_rows.stride(0), r_rows.stride(1), out.stride(0), out.stride(1),
            groups, kept, channels, eps,
            STRIDE=stride, BLOCK_S=block_s, BLOCK_C=block_c, num_warps=NUM_WARPS,
        )
        ctx.save_for_backward(x_rows, r_rows, weight, mean, rstd)
        ctx.stride, ctx.shape = stride, x.shape
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, residual, weight, mean, rstd = ctx.saved_tensors
        batch, rows, channels = ctx.shape
        stride = ctx.stride
        groups = rows // stride
        kept = groups * stride
        grad_out = grad_out.contiguous()
        dx = torch.zeros(ctx.shape, device=x.device, dtype=x.dtype)  # dropped rows get no gradient
        dw_partial = torch.empty(batch * groups, channels, device=x.device, dtype=torch.float32)
        db_partial = torch.empty_like(dw_partial)
        block_s, block_c = _blocks(stride, channels)
        _layernorm_pool_backward[(batch * groups,)](
            x, residual, weight, grad_out, mean, rstd, dx, dw_partial, db_partial,
            x.stride(0), x.stride(1), residual.stride(0), residual.stride(1),
            grad_out.stride(0), grad_out.stride(1), dx.stride(0), dx.stride(1),
            groups, kept, channels,
            STRIDE=stride, BLOCK_S=block_s, BLOCK_C=block_c, num_warps=NUM_WARPS,
        )
        dw = dw_partial.sum(0).to(weight.dtype)
        db = db_partial.sum(0).to(weight.dtype)
        return dx, dx, dw, db, None, None


def layernorm_pool(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    stride: int,
    implementation: str = "auto",
) -> torch.Tensor:
    """mean over groups of ``stride`` rows of LayerNorm(x + residual): (B, N, C) -> (B, N // stride, C)."""
    if x.shape != residual.shape or x.ndim != 3:
        raise ValueError(f"x and residual must both be (B, N, C); got {tuple(x.shape)} and {tuple(residual.shape)}")
    if not 1 <= stride <= x.shape[1]:
        raise ValueError(f"stride must be in [1, {x.shape[1]}], got {stride}")
    if x.dtype not in KERNEL_DTYPES:
        if implementation == "triton":
            raise ValueError(f"the Triton layernorm_pool kernel takes {KERNEL_DTYPES}, not {x.dtype}")
        return layernorm_pool_reference(x, residual, weight, bias, eps, stride)
    if not use_triton(implementation, x):
        return layernorm_pool_reference(x, residual, weight, bias, eps, stride)
    return LayerNormPoolFunction.apply(x, residual, weight, bias, eps, stride)

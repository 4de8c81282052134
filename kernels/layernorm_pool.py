"""The adapter's pooling epilogue: residual add, LayerNorm, average pooling of query groups."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def layernorm_pool(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    stride: int,
) -> torch.Tensor:
    """mean over groups of ``stride`` rows of LayerNorm(x + residual).

    x, residual: (B, N, C) -> (B, N // stride, C). A remainder of N % stride rows is dropped, as the
    release's adapter does.
    """
    if x.shape != residual.shape or x.ndim != 3:
        raise ValueError(f"x and residual must both be (B, N, C); got {tuple(x.shape)} and {tuple(residual.shape)}")
    batch, rows, channels = x.shape
    if not 1 <= stride <= rows:
        raise ValueError(f"stride must be in [1, {rows}], got {stride}")
    kept = rows - rows % stride
    normed = F.layer_norm((x + residual)[:, :kept], (channels,), weight, bias, eps)
    return normed.view(batch, kept // stride, stride, channels).mean(dim=2)

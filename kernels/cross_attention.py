"""Q-Former cross-attention from learned queries to variable-length encoder states."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def key_padding_mask(key_lengths: torch.Tensor, num_keys: int) -> torch.Tensor:
    """(B, num_keys) bool, True where the key is a real frame."""
    return torch.arange(num_keys, device=key_lengths.device)[None, :] < key_lengths[:, None]


def qformer_cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_lengths: torch.Tensor,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """softmax(q k^T * scale) v over the first ``key_lengths[b]`` keys of each sample.

    q: (B, H, Nq, D); k, v: (B, H, Nk, D); key_lengths: (B,) integers in [1, Nk].
    Frames at or past ``key_lengths`` are padding and get no attention.
    """
    if q.ndim != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"expected q (B, H, Nq, D) and k, v (B, H, Nk, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if key_lengths.shape != (q.shape[0],):
        raise ValueError(f"key_lengths must have shape ({q.shape[0]},), got {tuple(key_lengths.shape)}")
    mask = key_padding_mask(key_lengths, k.shape[2])[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)

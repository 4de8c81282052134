"""Models of a preset's real sizes with random weights, for benchmarks: built and initialized straight
on the target device (no checkpoint, no host copy of 9B parameters), optionally cut to their first
layers so that a mid-size stand-in fits a CPU."""

from __future__ import annotations

import torch

from mcat_ds.build import build_model_skeleton
from mcat_ds.config import MCATConfig
from mcat_ds.model.mcat import MCATModel


def random_mcat_model(config: MCATConfig, device: str, dtype: torch.dtype, seed: int = 0,
                      llm_layers: int | None = None, encoder_layers: int | None = None) -> MCATModel:
    torch.manual_seed(seed)
    model = build_model_skeleton(config, device, llm_layers=llm_layers, encoder_layers=encoder_layers, dtype=dtype)
    return model.to(dtype)  # what is left in fp32 (buffers such as rotary frequencies), as before


WINDOW_SECONDS = 30
FLEURS_SECONDS = (3.0, 25.0)
"""FLEURS utterance lengths are drawn uniformly from this range (its average is ~10-14 s)."""


def fleurs_like_lengths(count: int, window: int, generator: torch.Generator) -> torch.Tensor:
    """Lengths of utterances drawn uniformly from 3-25 s, scaled to a 30 s window of ``window`` units
    (mel frames, or samples)."""
    low, high = (s / WINDOW_SECONDS for s in FLEURS_SECONDS)
    fraction = low + (high - low) * torch.rand(count, generator=generator)
    return (fraction * window).round().clamp(1, window).long()


def random_log_mel(model: MCATModel, lengths: torch.Tensor, utterance_ids: list[int], device, dtype: torch.dtype,
                   seed: int = 0) -> torch.Tensor:
    """Log-mel-like features (Whisper's value range) of the given lengths, padding at its padded value.
    Each utterance's features depend only on its id, so every batching of it sees the same input."""
    bins, window = model.encoder.num_mel_bins, model.encoder.window_frames
    features = torch.full((len(lengths), bins, window), -0.6)
    for row, (length, utterance) in enumerate(zip(lengths.tolist(), utterance_ids)):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + utterance)
        features[row, :, :length] = torch.rand(bins, length, generator=generator) * 2 - 0.6
    return features.to(device, dtype)

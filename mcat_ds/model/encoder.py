"""The frozen Whisper encoder."""

from __future__ import annotations

import torch
from torch import nn


def encoder_frames(feature_lengths: torch.Tensor) -> torch.Tensor:
    """Whisper's stride-2 convolution turns L mel frames into ceil(L / 2) encoder states."""
    return torch.div(feature_lengths + 1, 2, rounding_mode="floor")


class SpeechEncoder(nn.Module):
    """A Whisper encoder that never trains: eval mode, no gradients, in its own dtype.

    Whisper only works on a full window (30 s for large-v3) of log-mel features, padded with the
    features of silence; what the padding is worth is decided downstream from ``feature_lengths``.
    """

    def __init__(self, whisper_encoder: nn.Module):
        super().__init__()
        self.whisper = whisper_encoder
        self.whisper.requires_grad_(False)
        self.whisper.eval()

    @property
    def width(self) -> int:
        return self.whisper.config.d_model

    @property
    def num_mel_bins(self) -> int:
        return self.whisper.config.num_mel_bins

    @property
    def window_frames(self) -> int:
        """Mel frames of the fixed input window (3000 = 30 s for large-v3)."""
        return 2 * self.whisper.config.max_source_positions

    def train(self, mode: bool = True) -> SpeechEncoder:
        super().train(mode)
        self.whisper.eval()
        return self

    @torch.no_grad()
    def forward(self, features: torch.Tensor, feature_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features (B, num_mel_bins, window_frames), feature_lengths (B,) valid mel frames ->
        states (B, window_frames // 2, width) and state_lengths (B,) valid states (at least 1)."""
        expected = (self.num_mel_bins, self.window_frames)
        if tuple(features.shape[1:]) != expected:
            raise ValueError(
                f"Whisper expects features of shape (batch, {expected[0]}, {expected[1]}), got {tuple(features.shape)}"
            )
        dtype = next(self.whisper.parameters()).dtype
        states = self.whisper(features.to(dtype)).last_hidden_state
        state_lengths = encoder_frames(feature_lengths.to(states.device)).clamp(1, states.shape[1])
        return states, state_lengths

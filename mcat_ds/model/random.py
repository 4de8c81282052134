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
    model = build_model_skeleton(config, device, llm_layers=llm_layers, encoder_layers=encoder_layers)
    return model.to(dtype)

"""Test helpers around the BLIP-2 reference adapter."""

from __future__ import annotations

import torch
from torch import nn

from mcat_ds.model.blip2_reference import ReleaseQFormerPoolAdapter  # noqa: F401  (re-exported for the tests)


def randomize(module: nn.Module, seed: int) -> None:
    """Every parameter random (LayerNorms included), so no term of the computation hides."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            scale = 0.5 if parameter.ndim == 1 else 1 / max(parameter.shape[-1], 1) ** 0.5
            offset = 1.0 if name.endswith("weight") and parameter.ndim == 1 else 0.0
            parameter.copy_(offset + scale * torch.randn(parameter.shape, generator=generator))

"""The DeepSpeed engine: engine settings from ds_configs/, the recipe injected from the stage config."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from mcat_ds.config import ConfigError, MCATConfig

DS_CONFIG_DIR = Path(__file__).resolve().parents[2] / "ds_configs"
RECIPE_KEYS = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "optimizer",
    "scheduler",
)
"""Keys that belong to the training recipe (the stage and optimisation configs), never to an engine file."""


def engine_file(name: str) -> Path:
    path = Path(name)
    if path.suffix == ".json":
        if not path.is_file():
            raise ConfigError(f"DeepSpeed engine file {path} does not exist")
        return path
    path = DS_CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json")))
        raise ConfigError(f"unknown engine {name!r}: ds_configs/ has {known} (or give a path to a .json file)")
    return path


def deepspeed_config(config: MCATConfig, on_gpu: bool) -> dict[str, Any]:
    """The engine file's settings plus the recipe's batch, accumulation and clipping.

    A recipe key in the engine file is an error: one fact, one place. Without a GPU, bf16 is turned
    off (the trainer runs fp32 on CPU) unless ``runtime.precision_on_cpu`` is ``engine``.
    """
    path = engine_file(config.runtime.engine)
    try:
        settings = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: not valid JSON: {error}") from None
    duplicated = [key for key in RECIPE_KEYS if key in settings]
    if duplicated:
        raise ConfigError(
            f"{path} sets {', '.join(duplicated)}: batch size, accumulation, clipping, optimizer and schedule "
            f"come from the stage and optim configs (e.g. --set stage.micro_batch_size=4); remove them from the file"
        )
    settings.update(
        train_micro_batch_size_per_gpu=config.stage.micro_batch_size,
        gradient_accumulation_steps=config.stage.grad_accum_steps,
        gradient_clipping=config.optim.grad_clip,
    )
    if not on_gpu and config.runtime.precision_on_cpu == "fp32":
        settings["bf16"] = {"enabled": False}
        settings.pop("communication_data_type", None)
    if not on_gpu:
        offload = settings.get("zero_optimization", {}).get("offload_optimizer")
        if offload:
            offload["pin_memory"] = False
    return settings


def make_optimizer(model: torch.nn.Module, config: MCATConfig, on_gpu: bool, offloaded: bool) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters only, as one parameter group (weight decay on all of
    them, as the release does). One group also sidesteps DeepSpeed linking ZeRO fragments to the
    optimizer state of only the first group."""
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    if offloaded:
        # States live in CPU memory: DeepSpeed's vectorised CPU Adam steps them there.
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(trainable, lr=config.optim.lr, betas=config.optim.betas,
                                weight_decay=config.optim.weight_decay, adamw_mode=True)
    # DeepSpeed's JIT-built FusedAdam does not build for sm_90a; torch's fused AdamW is as fast.
    return torch.optim.AdamW(trainable, lr=config.optim.lr, betas=config.optim.betas,
                             weight_decay=config.optim.weight_decay, fused=on_gpu)


def learning_rate(config: MCATConfig, step: int, total_steps: int) -> float:
    """Linear warmup, then constant or cosine decay; a pure function of the step, so a resumed stage
    needs no scheduler state."""
    optim = config.optim
    warmup = min(optim.warmup_steps, max(total_steps - 1, 0))
    if step < warmup:
        return optim.lr * (step + 1) / warmup
    if optim.schedule == "constant":
        return optim.lr
    decay_from = max(warmup, int(optim.decay_start * total_steps))
    if step < decay_from:
        return optim.lr
    span = max(total_steps - decay_from, 1)
    progress = min((step - decay_from) / span, 1.0)
    floor = optim.min_lr_ratio * optim.lr
    return floor + (optim.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))

"""Resumable training state, written without pickles and independent of the world size.

A checkpoint holds what trains and where the run stands, never the frozen base weights::

    checkpoints/step-00000100/
        trainable.safetensors     full fp32 master weights of the trainable parameters
        optimizer.safetensors     AdamW moments (exp_avg, exp_avg_sq) of those parameters
        rng-rank00000.safetensors each rank's RNG states
        state.json                step, epoch, data positions, world size, config, code version
        COMPLETE                  written last
    checkpoints/latest            the tag of the newest complete checkpoint, replaced atomically

Tensors are gathered out of (and scattered back into) DeepSpeed's ZeRO partitions with its
fragment API, so nothing depends on how a world size partitioned them; the learning rate is a
function of the step, so there is no scheduler state. A job killed at any moment leaves ``latest``
naming a checkpoint that loads: the pointer moves only after the new one is complete.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mcat_ds.optional import require

deepspeed = require("deepspeed")
from deepspeed.utils import (  # noqa: E402 (after the check that says how to install it)
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
)
from safetensors.torch import load_file, save_file

from mcat_ds.checkpoint import code_version

WEIGHTS_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
COMPLETE_FILE = "COMPLETE"
LATEST_FILE = "latest"
MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass
class TrainingState:
    step: int
    """Optimizer steps done in this stage."""
    epoch: int
    positions: list[int]
    """Examples of the epoch's plan each rank has consumed."""
    world_size: int


def _trainable(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, parameter) for name, parameter in module.named_parameters() if parameter.requires_grad]


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def prime_optimizer_states(engine, zero_loss: Callable[[], torch.Tensor]) -> None:
    """Create AdamW's moments now, without changing anything.

    AdamW creates its state at the first step, and DeepSpeed links its ZeRO fragments to that state
    only then; a resumed stage must write saved moments before it steps. One step at learning rate
    zero on ``zero_loss`` (a real forward pass times zero: under ZeRO-3 only a forward gathers the
    parameters) creates both, leaving weights, moments and decay as they were; the step counters
    are then set back to zero.
    """
    groups = engine.optimizer.param_groups
    rates = [group["lr"] for group in groups]
    for group in groups:
        group["lr"] = 0.0
    for _ in range(engine.gradient_accumulation_steps()):
        engine.backward(zero_loss())
        engine.step()
    for group, rate in zip(groups, rates):
        group["lr"] = rate
    _set_adam_step(engine, 0)


def _set_adam_step(engine, step: int) -> None:
    for state in engine.optimizer.optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"].fill_(step)
        else:  # DeepSpeed's CPU Adam counts in a Python int
            state["step"] = step


def _write_module_parameter(parameter: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Set a module parameter's (low-precision) value, gathering it first if ZeRO-3 partitioned it."""
    if hasattr(parameter, "ds_id"):
        with deepspeed.zero.GatheredParameters([parameter], modifier_rank=0):
            if _rank() == 0:
                parameter.data.copy_(value.to(parameter.dtype))
    else:
        with torch.no_grad():
            parameter.copy_(value.to(parameter.dtype))


def full_trainable_state(engine) -> dict[str, torch.Tensor]:
    """fp32 master weights of every trainable parameter, gathered from the ZeRO partitions
    (collective: every rank calls it; rank 0's copy is the one to use)."""
    return {name: safe_get_full_fp32_param(parameter).detach().cpu().clone()
            for name, parameter in _trainable(engine.module)}


def save_training_state(engine, step: int, epoch: int, position: int, checkpoints: Path, config: dict[str, Any],
                        keep: int, environment: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint (collective: ``position`` is this rank's), then point ``latest`` at it and
    prune old ones (rank 0). ``environment``: where the run runs (``mcat_ds.environment``)."""
    rank = _rank()
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    target = checkpoints / f"step-{step:08d}"
    if rank == 0:
        if target.exists():
            shutil.rmtree(target)  # a partial write of an earlier attempt at this step
        target.mkdir(parents=True)
    _barrier()
    weights, moments = {}, {}
    for name, parameter in _trainable(engine.module):
        weights[name] = safe_get_full_fp32_param(parameter).detach().cpu().clone()
        for moment in MOMENTS:
            moments[f"{name}::{moment}"] = safe_get_full_optimizer_state(parameter, moment).detach().cpu().clone()
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, str(target / f"rng-rank{rank:05d}.safetensors"))
    positions = [position] * world_size
    if dist.is_initialized():
        dist.all_gather_object(positions, position)
    if rank == 0:
        save_file(weights, str(target / WEIGHTS_FILE))
        save_file(moments, str(target / OPTIMIZER_FILE))
        state = TrainingState(step, epoch, positions, world_size)
        record = {**asdict(state), "adam_step": _adam_step(engine), "code_version": code_version(),
                  "environment": environment, "config": config}
        (target / STATE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    _barrier()  # every rank's RNG file is on disk
    if rank == 0:
        (target / COMPLETE_FILE).write_text("")
        _write_atomically(checkpoints / LATEST_FILE, target.name)
        _prune(checkpoints, keep)
    _barrier()
    return target


def _write_atomically(path: Path, text: str) -> None:
    staging = path.with_name(path.name + f".tmp-{os.getpid()}")
    staging.write_text(text)
    os.replace(staging, path)


def _prune(checkpoints: Path, keep: int) -> None:
    complete = sorted(path for path in checkpoints.glob("step-*") if (path / COMPLETE_FILE).is_file())
    for old in complete[:-keep] if keep > 0 else []:
        shutil.rmtree(old)


def _adam_step(engine) -> int:
    steps = [int(state["step"]) for state in engine.optimizer.optimizer.state.values() if "step" in state]
    return max(steps, default=0)


def latest_checkpoint(checkpoints: Path) -> Path | None:
    """The checkpoint ``latest`` names; if that one is not complete, the newest complete one."""
    pointer = checkpoints / LATEST_FILE
    if pointer.is_file():
        named = checkpoints / pointer.read_text().strip()
        if (named / COMPLETE_FILE).is_file():
            return named
    complete = sorted(path for path in checkpoints.glob("step-*") if (path / COMPLETE_FILE).is_file())
    return complete[-1] if complete else None


def load_training_state(engine, checkpoint: Path) -> TrainingState:
    """Restore weights, AdamW moments and step, and this rank's RNG (collective)."""
    record = json.loads((checkpoint / STATE_FILE).read_text())
    weights = load_file(str(checkpoint / WEIGHTS_FILE))
    moments = load_file(str(checkpoint / OPTIMIZER_FILE))
    trainable = _trainable(engine.module)
    missing = sorted({name for name, _ in trainable} - set(weights))
    if missing:
        raise ValueError(f"{checkpoint}: no saved weights for {len(missing)} trainable parameters, e.g. {missing[:3]}")
    for name, parameter in trainable:
        value = weights[name]
        shape = getattr(parameter, "ds_shape", parameter.shape)
        if value.shape != shape:
            raise ValueError(f"{checkpoint}: {name} has shape {tuple(value.shape)} there but {tuple(shape)} now")
        _write_module_parameter(parameter, value.to(parameter.device))
        safe_set_full_fp32_param(parameter, value.to(parameter.device))
        for moment in MOMENTS:
            safe_set_full_optimizer_state(parameter, moments[f"{name}::{moment}"].to(parameter.device), moment)
    _set_adam_step(engine, record["adam_step"])
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    rng_file = checkpoint / f"rng-rank{_rank():05d}.safetensors"
    if record["world_size"] == world_size and rng_file.is_file():
        rng = load_file(str(rng_file))
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return TrainingState(record["step"], record["epoch"], record["positions"], record["world_size"])

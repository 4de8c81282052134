"""Resumable training state, written without pickles and independent of the world size.

A checkpoint holds what trains and where the run stands, never the frozen base weights::

    checkpoints/step-00000100/
        trainable.safetensors     full fp32 master weights of the trainable parameters
        optimizer.safetensors     AdamW moments (exp_avg, exp_avg_sq) of those parameters
        rng-rank00000.safetensors each rank's RNG states
        state.json                step, epoch, data position, world size, what the position
                                  depends on (``data_identity``), config, code version
        COMPLETE                  written last
    checkpoints/latest            the tag of the newest complete checkpoint, replaced atomically

Tensors are gathered out of (and scattered back into) DeepSpeed's ZeRO partitions with its
fragment API, so nothing depends on how a world size partitioned them; the learning rate is a
function of the step, so there is no scheduler state.

A job killed at any moment, even on a filesystem whose client caches publish writes out of order
(Lustre, NFS), leaves a checkpoint that loads: every file and the folder are flushed before
``COMPLETE`` is written, and ``COMPLETE`` before ``latest`` moves. Resuming takes the newest
complete checkpoint that every rank can read, falling back to older ones (and saying so); pruning
never removes the newest one that reads back whole, and a save clears what killed saves left.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from collections.abc import Callable
from contextlib import contextmanager
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
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mcat_ds.checkpoint import code_version
from mcat_ds.files import file_sha256, fsync_directory, fsync_file, write_atomically

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
    """Examples of its share of the epoch's plan each rank has consumed (see ``plan_offset``)."""
    world_size: int
    plan_offset: int = 0
    """Where in the epoch's plan the ranks' shares were dealt from: 0, unless the run resumed
    mid-epoch on another number of ranks (``mcat_ds.data.plan.deal_to_rank``)."""

    def examples_consumed(self) -> int:
        """Examples of the epoch's plan used up by all ranks: the prefix a resumed run skips."""
        return self.plan_offset + min(self.positions) * self.world_size


class CheckpointReadError(RuntimeError):
    """A checkpoint that claims to be complete cannot be read (a cut or unflushed file)."""


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


def save_training_state(engine, state: TrainingState, checkpoints: Path, config: dict[str, Any], keep: int,
                        environment: dict[str, Any] | None = None, data_identity: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint (collective: ``state.positions`` is ``[this rank's position]``, gathered
    here from every rank), then point ``latest`` at it and prune old ones (rank 0). ``environment``: where the run
    runs (``mcat_ds.environment``); ``data_identity``: what the data position means, compared on
    resume."""
    rank = _rank()
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    target = checkpoints / f"step-{state.step:08d}"
    if rank == 0:
        _remove_unfinished(checkpoints)  # killed saves, this step's earlier attempt among them
        if target.exists():
            shutil.rmtree(target)  # a complete one that did not read back, passed over at resume
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
    _save_tensors(rng, target / f"rng-rank{rank:05d}.safetensors")
    (position,) = state.positions
    positions = [position] * world_size
    if dist.is_initialized():
        dist.all_gather_object(positions, position)
    if rank == 0:
        _save_tensors(weights, target / WEIGHTS_FILE)
        _save_tensors(moments, target / OPTIMIZER_FILE)
        record = {**asdict(TrainingState(state.step, state.epoch, positions, world_size, state.plan_offset)),
                  "adam_step": _adam_step(engine), "data_identity": data_identity, "code_version": code_version(),
                  "environment": environment, "config": config}
        with _writing(target / STATE_FILE):
            write_atomically(target / STATE_FILE, json.dumps(record, indent=2) + "\n")
    _barrier()  # every rank's RNG file is on disk
    if rank == 0:
        seal_checkpoint(target)
        with _writing(checkpoints / LATEST_FILE):
            write_atomically(checkpoints / LATEST_FILE, target.name)
        _prune(checkpoints, keep)
    _barrier()
    return target


class CheckpointWriteError(RuntimeError):
    """A checkpoint file could not be written (a full disk, a quota): the older ones are kept."""


@contextmanager
def _writing(path: Path):
    try:
        yield
    except (OSError, SafetensorError) as error:
        raise CheckpointWriteError(f"{path} could not be written ({error}); the checkpoints before it are kept, "
                                   "and a rerun resumes from the newest") from error


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    with _writing(path):
        save_file(tensors, str(path))
        fsync_file(path)


def seal_checkpoint(checkpoint: Path) -> None:
    """Mark a written checkpoint complete, so that any later change to it is noticed: ``state.json``
    gets the sha256 of every tensor file, and ``COMPLETE`` (written last) the sha256 of
    ``state.json``. A bit flipped on disk or on the wire then fails ``checkpoint_problem`` instead
    of loading as a silently different model."""
    record = json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
    record["sha256"] = {path.name: file_sha256(path) for path in sorted(checkpoint.glob("*.safetensors"))}
    with _writing(checkpoint / STATE_FILE):
        write_atomically(checkpoint / STATE_FILE, json.dumps(record, indent=2) + "\n")
    fsync_directory(checkpoint)
    with _writing(checkpoint / COMPLETE_FILE):
        write_atomically(checkpoint / COMPLETE_FILE, file_sha256(checkpoint / STATE_FILE) + "\n")


def _remove_unfinished(checkpoints: Path) -> None:
    """Folders of saves that were killed before ``COMPLETE`` (only rank 0 writes here, and only
    between barriers, so none of them is in progress)."""
    for folder in checkpoints.glob("step-*"):
        if folder.is_dir() and not (folder / COMPLETE_FILE).is_file():
            shutil.rmtree(folder, ignore_errors=True)
    for staging in checkpoints.glob(f"{LATEST_FILE}.tmp-*"):
        staging.unlink(missing_ok=True)


def complete_checkpoints(checkpoints: Path) -> list[Path]:
    """Checkpoints that claim to be complete, oldest first."""
    return sorted(path for path in checkpoints.glob("step-*") if (path / COMPLETE_FILE).is_file())


def _prune(checkpoints: Path, keep: int) -> None:
    """Keep the ``keep`` newest complete checkpoints, and never remove anything unless the newest one
    reads back whole: a save whose files did not really reach the disk must not cost the older ones."""
    complete = complete_checkpoints(checkpoints)
    if keep <= 0 or not complete or checkpoint_problem(complete[-1]) is not None:
        return
    for old in complete[:-keep]:
        shutil.rmtree(old)


def _safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file is not whole (missing, cut, or a damaged header), else None: its
    header says where the last tensor ends, and the file must reach exactly there."""
    try:
        with open(path, "rb") as handle:
            size_bytes = handle.read(8)
            if len(size_bytes) != 8:
                return f"{path.name} is cut short ({len(size_bytes)} bytes)"
            (header_size,) = struct.unpack("<Q", size_bytes)
            header = json.loads(handle.read(header_size).decode("utf-8"))
            end = max((item["data_offsets"][1] for key, item in header.items() if key != "__metadata__"), default=0)
    except FileNotFoundError:
        return f"{path.name} is missing"
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error, MemoryError) as error:
        return f"{path.name} has a damaged header ({error.__class__.__name__})"
    expected, actual = 8 + header_size + end, path.stat().st_size
    if actual != expected:
        return f"{path.name} holds {actual} bytes, its header says {expected}"
    return None


def checkpoint_problem(checkpoint: Path, rank: int | None = None) -> str | None:
    """Why ``checkpoint`` cannot be resumed from (by ``rank``, whose RNG file it reads), else None:
    a file missing, cut, or (for checkpoints ``seal_checkpoint`` sealed) not the bytes that were saved."""
    try:
        sealed = (checkpoint / COMPLETE_FILE).read_bytes().strip().decode("ascii")
        state_bytes = (checkpoint / STATE_FILE).read_bytes()
        if sealed and hashlib.sha256(state_bytes).hexdigest() != sealed:
            return f"{STATE_FILE} is not the one saved: its sha256 differs from the one in {COMPLETE_FILE}"
        record = json.loads(state_bytes.decode("utf-8"))
        for key in ("step", "epoch", "positions", "world_size", "adam_step"):
            record[key]
    except FileNotFoundError as error:
        return f"{Path(error.filename).name} is missing"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{STATE_FILE} is damaged ({error.__class__.__name__}: {error})"
    files = [WEIGHTS_FILE, OPTIMIZER_FILE]
    if rank is not None and record["world_size"] == (dist.get_world_size() if dist.is_initialized() else 1):
        files.append(f"rng-rank{rank:05d}.safetensors")
    digests = record.get("sha256") or {}
    for file in files:
        problem = _safetensors_problem(checkpoint / file)
        if problem is None and file in digests and file_sha256(checkpoint / file) != digests[file]:
            problem = f"{file} is not the one saved: its sha256 differs from the one in {STATE_FILE}"
        if problem is not None:
            return problem
    return None


def _adam_step(engine) -> int:
    steps = [int(state["step"]) for state in engine.optimizer.optimizer.state.values() if "step" in state]
    return max(steps, default=0)


def latest_checkpoint(checkpoints: Path) -> Path | None:
    """The newest complete checkpoint. ``latest`` is a pointer for people and tools; a kill between
    ``COMPLETE`` and the pointer's move leaves it naming an older one, so it does not decide."""
    complete = complete_checkpoints(checkpoints)
    return complete[-1] if complete else None


def _all_ranks_agree(ok: bool) -> bool:
    if not dist.is_initialized():
        return ok
    flags = [ok] * dist.get_world_size()
    dist.all_gather_object(flags, ok)
    return all(flags)


def resume_training_state(engine, checkpoints: Path, say: Callable[[str], None]) -> tuple[Path, TrainingState] | None:
    """Restore the newest complete checkpoint that every rank can read (collective), or None when
    there is none. A checkpoint that claims to be complete but does not read back (cut by a crash on
    a filesystem that published ``COMPLETE`` first) is passed over for the next-older one, and
    ``say`` reports it; if none reads, CheckpointReadError names each one and why."""
    candidates = complete_checkpoints(checkpoints)
    problems = []
    for checkpoint in reversed(candidates):
        problem = checkpoint_problem(checkpoint, _rank())
        if _all_ranks_agree(problem is None):
            try:
                state = load_training_state(engine, checkpoint)
            except (OSError, ValueError, RuntimeError, SafetensorError) as error:  # whole, yet unloadable
                problem = f"{error.__class__.__name__}: {error}"
            if _all_ranks_agree(problem is None):
                if problems:
                    say(f"resuming from {checkpoint.name}, the newest checkpoint that reads back whole; passed over: "
                        + "; ".join(problems))
                return checkpoint, state
        problems.append(f"{checkpoint.name} ({problem or 'unreadable on another rank'})")
    if problems:
        raise CheckpointReadError(
            f"no checkpoint in {checkpoints} can be resumed from: " + "; ".join(problems)
            + ". Nothing was removed; to start the stage over, move that folder away")
    return None


def load_training_state(engine, checkpoint: Path) -> TrainingState:
    """Restore weights, AdamW moments and step, and this rank's RNG (collective)."""
    record = json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
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
    return TrainingState(record["step"], record["epoch"], record["positions"], record["world_size"],
                         record.get("plan_offset", 0))


def saved_data_identity(checkpoint: Path) -> dict[str, Any] | None:
    """What the checkpoint's data position depends on, as it was saved (None: saved before it was)."""
    return json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8")).get("data_identity")

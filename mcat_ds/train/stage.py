"""One curriculum stage under DeepSpeed: build, initialise or resume, train, checkpoint, export.

Layout of a run directory (one per curriculum)::

    RUN/<stage>/metrics.jsonl        one line per optimizer step (step, loss, lr, throughput, ...)
    RUN/<stage>/tensorboard/         event files
    RUN/<stage>/checkpoints/         resumable training state (see mcat_ds.train.state)
    RUN/<stage>/final/               the stage's model in the MCAT checkpoint format; its presence
                                     marks the stage complete, and the next stage starts from it
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from mcat_ds.build import CheckpointError, build_model, count_parameters
from mcat_ds.model.attention import packed_length_multiple
from mcat_ds.model.checkpointing import enable_activation_checkpointing
from mcat_ds.optional import require
from mcat_ds.checkpoint import CONFIG_FILE, load_trainable_weights, run_environment, save_checkpoint
from mcat_ds.config import ConfigError, MCATConfig
from mcat_ds.curriculum import example_selection
from mcat_ds.data.audio import FeatureWindow, LogMelSpectrogram
from mcat_ds.data.loader import Batch, Collator, ExampleDataset, make_loader
from mcat_ds.data.plan import deal_to_rank, plan_epoch
from mcat_ds.data.prepare import INDEX_FILE
from mcat_ds.data.shards import load_index
from mcat_ds.files import file_sha256
from mcat_ds.train.costs import check_memory_fits, peak_flops, step_flops
from mcat_ds.train.engine import deepspeed_config, learning_rate, make_optimizer
from mcat_ds.train.monitor import StageMonitor
from mcat_ds.train.preemption import PREEMPTED_EXIT_CODE, stop_requested
from mcat_ds.train.validation import all_reduce_sum, validate
from mcat_ds.train.state import (
    CheckpointReadError,
    TrainingState,
    full_trainable_state,
    latest_checkpoint,
    prime_optimizer_states,
    resume_training_state,
    save_training_state,
    saved_data_identity,
)


@dataclass(frozen=True)
class StagePaths:
    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def final(self) -> Path:
        return self.root / "final"

    @property
    def complete(self) -> bool:
        return (self.final / CONFIG_FILE).is_file()


def stage_paths(run_dir: Path, stage: str) -> StagePaths:
    return StagePaths(Path(run_dir) / stage)


@dataclass(frozen=True)
class Placement:
    """Where this process runs."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    @property
    def leader(self) -> bool:
        return self.rank == 0


class StageError(RuntimeError):
    pass


GATE_FAILED_EXIT_CODE = 3
"""The stage trained to its end but missed ``stage.min_tag_accuracy``; its state is saved."""


def _starting_point(config: MCATConfig, run_dir: Path, init_from: Path | None) -> Path | None:
    if init_from is not None:
        if not (Path(init_from) / CONFIG_FILE).is_file():
            raise CheckpointError(f"--init-from {init_from} is not an MCAT checkpoint (no {CONFIG_FILE})")
        return Path(init_from)
    if config.stage.init_from is None:
        return None
    previous = stage_paths(run_dir, config.stage.init_from)
    if not previous.complete:
        raise StageError(
            f"stage {config.stage.name} starts from the final checkpoint of stage {config.stage.init_from}, "
            f"but {previous.final} does not exist: run `--stage {config.stage.init_from}` first "
            f"(or `--stage all`), or give --init-from PATH"
        )
    return previous.final


def _check_memory(config: MCATConfig, placement: Placement, zero_stage: int, offload: bool) -> None:
    """Say before loading 9B/27B weights that they will not fit, and what would."""
    properties = torch.cuda.get_device_properties(placement.device)
    check_memory_fits(config, placement.world_size, zero_stage, offload, properties.total_memory, properties.name)


class _ExampleStream:
    """Micro-batches across epochs for this rank, from a data position on."""

    def __init__(self, config: MCATConfig, data_dir: Path, entries, tokenizer, window: FeatureWindow,
                 num_speech_tokens: int, placement: Placement, with_targets: bool = True, pack_to_multiple: int = 1):
        self.config, self.data_dir, self.entries = config, data_dir, entries
        self.tokenizer, self.window, self.placement = tokenizer, window, placement
        self.selection = example_selection(config)
        self.collator = Collator(window, num_speech_tokens, tokenizer.pad_token_id,
                                 features_in_workers=config.data.features == "worker",
                                 padding_side="packed" if config.data.packing else "right",
                                 pack_to_multiple=pack_to_multiple)
        self.with_targets = with_targets

    def share(self, epoch: int, offset: int = 0):
        plan = plan_epoch(self.entries, self.selection, self.config.data.seed, epoch)
        return deal_to_rank(plan, self.placement.rank, self.placement.world_size, offset)

    def epoch_batches(self, epoch: int, position: int, num_workers: int, offset: int = 0) -> Iterator[Batch]:
        dataset = ExampleDataset(self.data_dir, self.entries, self.share(epoch, offset), self.tokenizer, self.window,
                                 with_targets=self.with_targets)
        yield from make_loader(dataset, self.collator, self.config.stage.micro_batch_size, position, num_workers)

    def batches(self, epoch: int, position: int, num_workers: int, offset: int = 0
                ) -> Iterator[tuple[int, int, int, Batch]]:
        """(epoch, plan offset, position after the batch, batch), epoch after epoch."""
        if not self.share(epoch):
            raise StageError(f"{self.data_dir}: the stage's plan has fewer examples than the {self.placement.world_size} ranks")
        while True:
            for batch in self.epoch_batches(epoch, position, num_workers, offset):
                position += batch.consumed
                yield epoch, offset, position, batch
            epoch, offset, position = epoch + 1, 0, 0


def data_identity(config: MCATConfig) -> dict[str, object]:
    """What a saved data position means: the examples (the index's content, wherever it lies now),
    their selection and order, and how many a step takes. A resume compares it key by key."""
    selection = example_selection(config)
    return {
        "data.index_sha256": file_sha256(Path(config.data.path) / INDEX_FILE),
        "data.seed": config.data.seed,
        "stage.selection": f"{selection.task} {','.join(selection.languages)} per_language={selection.max_per_language} "
                           f"per_direction={selection.max_per_direction} targets={selection.targets_per_utterance}",
        "stage.micro_batch_size": config.stage.micro_batch_size,
        "stage.grad_accum_steps": config.stage.grad_accum_steps,
    }


def check_resumable(saved: dict[str, object] | None, current: dict[str, object], checkpoint: Path,
                    accept: bool) -> str | None:
    """None when the saved position means the same now; a note when it does not but ``accept``
    (runtime.accept_changed_data) says go on; else StageError naming every key that differs."""
    if saved is None:
        return f"{checkpoint} predates data identities; its data position is taken as it is"
    differing = [f"{key}: {saved.get(key)!r} then, {current.get(key)!r} now"
                 for key in sorted(set(saved) | set(current)) if saved.get(key) != current.get(key)]
    if not differing:
        return None
    if accept:
        return (f"resuming from {checkpoint} although what its data position means changed "
                f"(runtime.accept_changed_data): " + "; ".join(differing))
    raise StageError(
        f"{checkpoint} was saved with other data settings, so its data position would point elsewhere: "
        + "; ".join(differing) + ". Restore those settings, or resume anyway with "
        "--set runtime.accept_changed_data=true (the position is kept as a count of examples), or start "
        "the stage over in a new --run-dir")


def resumed_position(state: TrainingState, placement: Placement) -> tuple[int, int]:
    """(plan offset, this rank's position) to continue ``state``'s epoch on this run's ranks: the
    same share on the same number of ranks; on another number, the unused rest of the epoch's plan
    dealt anew, so that no example is repeated or skipped."""
    if state.world_size == placement.world_size:
        return state.plan_offset, state.positions[placement.rank]
    return state.examples_consumed(), 0


def _forward(engine, batch: Batch, log_mel: LogMelSpectrogram, device: torch.device, predict_at=None):
    features = batch.speech_features(log_mel, device)
    if predict_at is not None:
        predict_at = predict_at.to(device)
    return engine(features, batch.feature_lengths.to(device), batch.llm.to(device), predict_at=predict_at)


def _validate(engine, stream: _ExampleStream, log_mel, tag_ids, placement: Placement) -> dict[str, float]:
    return validate(engine, stream.epoch_batches(0, 0, 0), tag_ids, stream.config.stage.task,
                    lambda batch, predict_at: _forward(engine, batch, log_mel, placement.device, predict_at),
                    lambda values: all_reduce_sum(values, placement.device))


def _passes_tag_gate(config: MCATConfig, validation: dict[str, float], languages: int, paths: StagePaths,
                     monitor: StageMonitor | None) -> bool:
    accuracy = validation.get("val_tag_accuracy")
    if accuracy is not None and accuracy >= config.stage.min_tag_accuracy:
        return True
    if monitor is not None:
        shown = "not measured" if accuracy is None else f"{accuracy:.1%}"
        monitor.message(
            f"stage {config.stage.name} failed its gate: target-tag accuracy {shown} on {config.data.validation} "
            f"is below stage.min_tag_accuracy={config.stage.min_tag_accuracy:g} (a model that ignores the prompt's "
            f"target tag scores about 1/{languages - 1}). The final state is saved in {paths.checkpoints}; no final "
            f"checkpoint was written and the next stage does not start. To accept this model, run again with "
            f"--set stage.min_tag_accuracy=none")
    return False


def precision_summary(engine, model) -> str:
    """The dtypes the step runs in, as DeepSpeed left them: frozen weights, trained weights (what the
    forward computes in) and the optimizer's master copies."""
    def dtype(module: torch.nn.Module) -> str:
        return str(next(module.parameters()).dtype).removeprefix("torch.")

    groups = getattr(engine.optimizer, "single_partition_of_fp32_groups", None)  # ZeRO-1/2 masters
    masters = str(groups[0].dtype).removeprefix("torch.") if groups else dtype(model.adapter)
    return (f"dtypes: encoder {dtype(model.encoder)}, adapter {dtype(model.adapter)}, LLM {dtype(model.llm)}, "
            f"optimizer masters {masters}")


def run_stage(config: MCATConfig, run_dir: Path, placement: Placement, *, init_from: Path | None = None) -> int:
    """Train one stage to its end (exit code 0) or until preempted (PREEMPTED_EXIT_CODE)."""
    paths = stage_paths(run_dir, config.stage.name)
    if paths.complete:
        return 0
    if config.data.path is None:
        raise ConfigError("data.path is not set (prepared shards, or run `mcat demo`)")
    entries = load_index(config.data.path)
    selection = example_selection(config)
    if not plan_epoch(entries, selection, config.data.seed, 0):
        present = sorted({entry.language for entry in entries})
        raise StageError(
            f"stage {config.stage.name} ({selection.task}) selects {', '.join(selection.languages)}, but "
            f"{config.data.path} holds no usable example for them (its languages: {', '.join(present) or 'none'})"
        )
    resume = latest_checkpoint(paths.checkpoints)
    start = None if resume is not None else _starting_point(config, run_dir, init_from)
    identity = data_identity(config)
    ds_config = deepspeed_config(config, placement.on_gpu)
    zero = ds_config.get("zero_optimization", {})
    if placement.on_gpu:
        _check_memory(config, placement, zero.get("stage", 0), bool(zero.get("offload_optimizer")))

    torch.set_num_threads(config.runtime.threads_per_rank)  # never the host's core count: see RuntimeConfig
    environment = run_environment(config)
    torch.manual_seed(config.runtime.seed)  # identical fresh weights on every rank
    model, tokenizer = build_model(config)
    if start is not None:
        load_trainable_weights(model, tokenizer, start)
    if config.runtime.gradient_checkpointing:
        enable_activation_checkpointing(model.llm, config.runtime.checkpointing_policy)
    model.to(placement.device)
    optimizer = make_optimizer(model, config, placement.on_gpu, offloaded=bool(zero.get("offload_optimizer")))
    engine, *_ = require("deepspeed").initialize(model=model, optimizer=optimizer, config=ds_config)
    window = FeatureWindow(model.encoder.num_mel_bins, model.encoder.window_frames)
    log_mel = LogMelSpectrogram(window).to(placement.device)
    pack_to_multiple = packed_length_multiple(model.llm)
    stream = _ExampleStream(config, Path(config.data.path), entries, tokenizer.hf, window,
                            model.num_speech_tokens, placement, pack_to_multiple=pack_to_multiple)
    priming = next(iter(stream.epoch_batches(0, 0, 0)))
    prime_optimizer_states(engine, lambda: _forward(engine, priming, log_mel, placement.device).loss * 0.0)
    torch.manual_seed(config.runtime.seed + 1 + placement.rank)  # dropout differs across ranks

    step, epoch, offset, position = 0, 0, 0, 0
    notes = []
    if resume is not None:
        resumed = resume_training_state(engine, paths.checkpoints, notes.append)
        if resumed is None:  # removed since the stage started
            raise CheckpointReadError(f"{resume} disappeared while the stage started")
        resume, state = resumed
        note = check_resumable(saved_data_identity(resume), identity, resume, config.runtime.accept_changed_data)
        notes += [note] if note else []
        step, epoch = state.step, state.epoch
        offset, position = resumed_position(state, placement)
        if state.world_size != placement.world_size:
            notes.append(f"{resume} was saved by {state.world_size} ranks: the rest of epoch {epoch} "
                         f"(from example {offset} of its plan) is dealt to {placement.world_size}")
        if position > len(stream.share(epoch, offset)):  # accepted changed data holds fewer examples
            epoch, offset, position = epoch + 1, 0, 0
    examples_per_step = config.stage.micro_batch_size * config.stage.grad_accum_steps
    total_steps = config.stage.max_steps or max(1, math.ceil(config.stage.epochs * len(stream.share(0)) / examples_per_step))
    validation = None
    if config.stage.min_tag_accuracy is not None and not (config.data.validation and config.stage.task == "srt"):
        raise ConfigError(f"stage.min_tag_accuracy gates SRT stages on their validation data; stage "
                          f"{config.stage.name} is {config.stage.task} with data.validation={config.data.validation}")
    if config.data.validation:
        validation = _ExampleStream(config, Path(config.data.validation), load_index(config.data.validation),
                                    tokenizer.hf, window, model.num_speech_tokens, placement,
                                    pack_to_multiple=pack_to_multiple)

    monitor = StageMonitor(paths.root, config.stage.name, total_steps, step) if placement.leader else None
    if monitor is not None:
        origin = f"resumed from {resume}" if resume else (f"from {start}" if start else "from the base models")
        monitor.message(f"stage {config.stage.name}: {total_steps} steps, {len(stream.share(0))} examples per rank "
                        f"per epoch, {placement.world_size} ranks, {origin}")
        monitor.message(precision_summary(engine, model))
        for note in notes:
            monitor.message(note)
    counts = count_parameters(model)
    embedding = model.llm.get_input_embeddings().weight
    head_parameters = getattr(embedding, "ds_numel", embedding.numel())  # tied: the LM head (MFU); ZeRO-3 shards
    peak = peak_flops(torch.cuda.get_device_name(placement.device)) if placement.on_gpu else None
    batches = stream.batches(epoch, position, config.data.num_workers, offset)
    previous_batch: Batch | None = None
    final_validation: dict[str, float] | None = None
    exit_code = 0
    try:
        while step < total_steps:
            started = time.perf_counter()
            lr = learning_rate(config, step, total_steps)
            for group in engine.optimizer.param_groups:
                group["lr"] = lr
            loss_sum = tokens = samples = llm_tokens = skipped = 0.0
            for _ in range(config.stage.grad_accum_steps):
                epoch, offset, position, batch = next(batches)
                skipped += len(batch.skipped)
                if monitor is not None:
                    for item in batch.skipped:
                        monitor.message(f"skipped {item.key}: {item.reason}")
                weight = 1.0
                if batch.llm is None:
                    # Every example of this micro-batch was unreadable. Ranks must still run the same
                    # collectives, so redo the previous batch with no weight.
                    if previous_batch is None:
                        raise StageError("the first micro-batch of the stage held no readable example")
                    batch, weight = previous_batch, 0.0
                out = _forward(engine, batch, log_mel, placement.device)
                engine.backward(out.loss * weight)
                engine.step()
                previous_batch = batch
                loss_sum += out.loss.item() * out.num_label_tokens * weight
                tokens += out.num_label_tokens * weight
                samples += len(batch.keys) * weight
                llm_tokens += batch.llm.num_tokens * weight
            step += 1
            loss_sum, tokens, samples, llm_tokens, skipped = all_reduce_sum(
                [loss_sum, tokens, samples, llm_tokens, skipped], placement.device)
            elapsed = time.perf_counter() - started
            record = {
                "step": step, "loss": loss_sum / max(tokens, 1.0), "lr": lr, "epoch": epoch,
                "samples": int(samples), "tokens": int(llm_tokens), "samples_per_s": samples / elapsed,
                "tokens_per_s": llm_tokens / elapsed, "step_seconds": elapsed, "skipped_examples": int(skipped),
            }
            if peak is not None:
                # the encoder runs over its whole window, padding included
                flops = step_flops(counts, int(llm_tokens), int(samples), model.encoder.window_frames // 2, config,
                                   model.encoder.width, head_parameters, int(tokens))
                record["mfu"] = flops / elapsed / (peak * placement.world_size)
            if validation is not None and config.stage.eval_every and (step % config.stage.eval_every == 0 or step == total_steps):
                record.update(_validate(engine, validation, log_mel, tokenizer.tag_ids.values(), placement))
                if step == total_steps:
                    final_validation = record
            if monitor is not None:
                monitor.log(record)
            preempted = stop_requested()
            if preempted or (step % config.stage.save_every == 0 and step < total_steps):
                save_training_state(engine, TrainingState(step, epoch, [position], placement.world_size, offset),
                                    paths.checkpoints, config.to_dict(), config.runtime.keep_checkpoints,
                                    environment, identity)
            if preempted:
                if monitor is not None:
                    monitor.message(f"stop requested: saved step {step}; exiting with {PREEMPTED_EXIT_CODE} to be requeued")
                exit_code = PREEMPTED_EXIT_CODE
                break
        if exit_code == 0 and config.stage.min_tag_accuracy is not None:
            if final_validation is None:  # resumed after the last step
                final_validation = _validate(engine, validation, log_mel, tokenizer.tag_ids.values(), placement)
            if not _passes_tag_gate(config, final_validation, len(selection.languages), paths, monitor):
                saved = latest_checkpoint(paths.checkpoints)
                if saved is None or saved.name != f"step-{step:08d}":  # nothing trained is lost
                    save_training_state(engine, TrainingState(step, epoch, [position], placement.world_size, offset),
                                        paths.checkpoints, config.to_dict(), config.runtime.keep_checkpoints,
                                        environment, identity)
                exit_code = GATE_FAILED_EXIT_CODE
        if exit_code == 0:
            weights = full_trainable_state(engine)
            if placement.leader:
                save_checkpoint(model, tokenizer, config, paths.final, weights=weights)
                monitor.message(f"stage {config.stage.name} complete: {paths.final}")
            if dist.is_initialized():
                dist.barrier()
    finally:
        if monitor is not None:
            monitor.close()
    return exit_code

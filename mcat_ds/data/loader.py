"""From a stage's plan to model-ready batches: a map-style dataset over one rank's share, a sampler
that starts at any position (exact resume), and a collator that pads audio and builds token batches.

Order is fixed by the plan, not by worker timing: DataLoader returns batches in sampler order
whatever the number of workers, so a run restarted at position N sees exactly the examples an
uninterrupted run would have seen after N.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mcat_ds.batching import LLMBatch, TokenizedExample, collate_examples, tokenize_example
from mcat_ds.data.audio import (
    AudioError,
    FeatureWindow,
    LogMelSpectrogram,
    decode_audio,
    feature_frames,
    pad_waveforms,
    require_audio_packages,
)
from mcat_ds.data.plan import PlannedExample
from mcat_ds.data.shards import DataError, IndexEntry, ShardReader, read_sample_meta
from mcat_ds.prompts import build_prompt, build_target


@dataclass
class LoadedExample:
    key: str
    example: PlannedExample
    samples: np.ndarray
    tokens: TokenizedExample


@dataclass(frozen=True)
class SkippedExample:
    key: str
    reason: str


class ExampleDataset(Dataset):
    """Item i of one rank's share of the plan: audio from the shards, prompt and target tokens."""

    def __init__(
        self,
        directory: str | Path,
        entries: Sequence[IndexEntry],
        examples: Sequence[PlannedExample],
        tokenizer,
        window: FeatureWindow,
        with_targets: bool = True,
    ):
        require_audio_packages()  # the DataLoader's workers decode
        self.reader = ShardReader(directory)
        self.entries = entries
        self.examples = examples
        self.tokenizer = tokenizer
        self.window = window
        self.with_targets = with_targets

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> LoadedExample | SkippedExample:
        example = self.examples[index]
        entry = self.entries[example.entry]
        try:
            meta = read_sample_meta(self.reader, entry)
            samples = decode_audio(self.reader.read(entry.shard, entry.audio), max_seconds=self.window.seconds)
        except DataError as error:  # its message names the shard file and the sample
            return SkippedExample(entry.key, str(error))
        except AudioError as error:
            return SkippedExample(entry.key, f"{entry.shard}: {error}")
        transcript = meta["transcript"]
        translation = meta["translations"].get(example.tgt) if example.tgt else None
        if self.with_targets and example.tgt and translation is None:
            return SkippedExample(entry.key, f"{entry.shard}: the metadata has no {example.tgt} translation, "
                                             "though the index lists one")
        prompt = build_prompt(example.task, example.src, example.tgt, transcript=transcript)
        target = None
        if self.with_targets:
            target = build_target(example.task, example.src, example.tgt, transcript=transcript, translation=translation)
        return LoadedExample(entry.key, example, samples, tokenize_example(self.tokenizer, prompt, target))


class PositionSampler(Sampler[list[int]]):
    """Consecutive batches of ``batch_size`` indices from ``start`` to the end of the share."""

    def __init__(self, length: int, batch_size: int, start: int = 0):
        if not 0 <= start <= length:
            raise ValueError(f"start position {start} is outside the epoch's {length} examples")
        self.length, self.batch_size, self.start = length, batch_size, start

    def __iter__(self) -> Iterator[list[int]]:
        for first in range(self.start, self.length, self.batch_size):
            yield list(range(first, min(first + self.batch_size, self.length)))

    def __len__(self) -> int:
        return -(-(self.length - self.start) // self.batch_size)


@dataclass
class Batch:
    features: torch.Tensor | None
    """(B, mels, frames) log-mel features when computed in the DataLoader workers."""
    waveforms: torch.Tensor | None
    """(B, window samples) zero-padded audio when features are computed on the model's device."""
    num_samples: torch.Tensor
    feature_lengths: torch.Tensor
    llm: LLMBatch | None
    """None when every example of the batch was skipped."""
    keys: list[str]
    examples: list[PlannedExample]
    consumed: int
    """Examples of the plan this batch used up, skipped ones included: the data position advances by it."""
    skipped: list[SkippedExample]

    def speech_features(self, log_mel: LogMelSpectrogram, device: torch.device | str) -> torch.Tensor:
        if self.features is not None:
            return self.features.to(device)
        return log_mel.to(device)(self.waveforms.to(device), self.num_samples)


class Collator:
    def __init__(self, window: FeatureWindow, num_speech_tokens: int, pad_token_id: int,
                 features_in_workers: bool, padding_side: str = "right", pack_to_multiple: int = 1):
        self.window = window
        self.num_speech_tokens = num_speech_tokens
        self.pad_token_id = pad_token_id
        self.log_mel = LogMelSpectrogram(window) if features_in_workers else None
        self.padding_side = padding_side
        self.pack_to_multiple = pack_to_multiple

    def __call__(self, items: list[LoadedExample | SkippedExample]) -> Batch:
        loaded = [item for item in items if isinstance(item, LoadedExample)]
        skipped = [item for item in items if isinstance(item, SkippedExample)]
        waveforms, num_samples = pad_waveforms([item.samples for item in loaded], self.window)
        llm = None
        if loaded:
            llm = collate_examples([item.tokens for item in loaded], self.num_speech_tokens, self.pad_token_id,
                                   self.padding_side, self.pack_to_multiple)
        features = self.log_mel(waveforms, num_samples) if self.log_mel is not None else None
        return Batch(
            features=features,
            waveforms=None if features is not None else waveforms,
            num_samples=num_samples,
            feature_lengths=feature_frames(num_samples),
            llm=llm,
            keys=[item.key for item in loaded],
            examples=[item.example for item in loaded],
            consumed=len(items),
            skipped=skipped,
        )


def _single_threaded_worker(_: int) -> None:
    # Each worker is one of several processes on the node: one math thread apiece.
    torch.set_num_threads(1)


def make_loader(dataset: ExampleDataset, collator: Collator, batch_size: int, start: int,
                num_workers: int) -> DataLoader:
    return DataLoader(
        dataset,
        batch_sampler=PositionSampler(len(dataset), batch_size, start),
        collate_fn=collator,
        num_workers=num_workers,
        worker_init_fn=_single_threaded_worker if num_workers else None,
        prefetch_factor=4 if num_workers else None,
    )

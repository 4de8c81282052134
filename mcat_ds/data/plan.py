"""Which examples a curriculum stage trains on (paper III-C, Algorithm 1).

A stage picks a language set, optionally caps samples per language (balanced ASR: 10,000) or per
translation direction (balanced SRT: 100) with a seeded choice that stays fixed across epochs, and
for SMT/SRT draws target languages for each utterance among the set (fresh each epoch). The plan of
an epoch is then shuffled globally with (seed, epoch) and dealt to ranks in equal parts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mcat_ds.config import Task
from mcat_ds.data.shards import IndexEntry

# Independent random streams derived from the seed, one per decision.
_CAPS, _TARGETS, _ORDER = 1, 2, 3


@dataclass(frozen=True)
class ExampleSelection:
    task: Task
    languages: tuple[str, ...]
    max_per_language: int | None = None
    max_per_direction: int | None = None
    targets_per_utterance: int = 1
    """SMT/SRT without a direction cap: target languages drawn per utterance and epoch."""


@dataclass(frozen=True)
class PlannedExample:
    entry: int
    """Position of the utterance in the index."""
    task: Task
    src: str
    tgt: str | None


def _choose(candidates: list[int], cap: int | None, rng: np.random.Generator) -> list[int]:
    if cap is None or len(candidates) <= cap:
        return candidates
    picked = rng.choice(len(candidates), size=cap, replace=False)
    return [candidates[i] for i in sorted(picked)]


def _utterances_by_language(entries: Sequence[IndexEntry], selection: ExampleSelection, seed: int) -> dict[str, list[int]]:
    rng = np.random.default_rng([seed, _CAPS])
    by_language: dict[str, list[int]] = {code: [] for code in selection.languages}
    for position, entry in enumerate(entries):
        if entry.language in by_language:
            by_language[entry.language].append(position)
    return {code: _choose(found, selection.max_per_language, rng) for code, found in by_language.items()}


def plan_epoch(entries: Sequence[IndexEntry], selection: ExampleSelection, seed: int, epoch: int) -> list[PlannedExample]:
    """The examples of one epoch in training order (before they are dealt to ranks)."""
    by_language = _utterances_by_language(entries, selection, seed)
    examples: list[PlannedExample] = []
    if selection.task == "asr":
        for code, positions in by_language.items():
            examples.extend(PlannedExample(p, "asr", code, None) for p in positions)
    elif selection.max_per_direction is not None:
        rng = np.random.default_rng([seed, _CAPS, 1])
        for src, positions in by_language.items():
            for tgt in selection.languages:
                if tgt == src:
                    continue
                candidates = [p for p in positions if tgt in entries[p].translations]
                chosen = _choose(candidates, selection.max_per_direction, rng)
                examples.extend(PlannedExample(p, selection.task, src, tgt) for p in chosen)
    else:
        rng = np.random.default_rng([seed, _TARGETS, epoch])
        allowed = set(selection.languages)
        for src, positions in by_language.items():
            for p in positions:
                targets = [t for t in entries[p].translations if t in allowed and t != src]
                if not targets:
                    continue
                count = min(selection.targets_per_utterance, len(targets))
                for index in sorted(rng.choice(len(targets), size=count, replace=False)):
                    examples.append(PlannedExample(p, selection.task, src, targets[index]))
    order = np.random.default_rng([seed, _ORDER, epoch]).permutation(len(examples))
    return [examples[i] for i in order]


def deal_to_rank(plan: Sequence[PlannedExample], rank: int, world_size: int, offset: int = 0) -> list[PlannedExample]:
    """Rank ``rank``'s disjoint share of ``plan[offset:]``; every rank gets the same count (the last
    few examples of the epoch's order, fewer than ``world_size``, are left for the next epoch's
    shuffle).

    Dealt round-robin, so after every rank has taken ``p`` examples the ranks together have used up
    exactly ``plan[offset:offset + p * world_size]``: a run resumed on another number of ranks deals
    the rest from ``offset + p * world_size`` and sees every example of the epoch once.
    """
    rest = plan[offset:]
    per_rank = len(rest) // world_size
    return list(rest[rank::world_size][:per_rank])


@dataclass(frozen=True)
class PlanCounts:
    languages: dict[str, tuple[int, int]]
    """language -> (utterances in the set, utterances after the per-language cap)"""
    directions: dict[str, tuple[int, int]]
    """src_tgt -> (utterances with that translation, examples per epoch); SMT/SRT only"""
    examples: int


def count_plan(entries: Sequence[IndexEntry], selection: ExampleSelection, seed: int) -> PlanCounts:
    available = Counter(entry.language for entry in entries)
    kept = _utterances_by_language(entries, selection, seed)
    languages = {code: (available.get(code, 0), len(kept[code])) for code in selection.languages}
    plan = plan_epoch(entries, selection, seed, epoch=0)
    directions: dict[str, tuple[int, int]] = {}
    if selection.task != "asr":
        pairs = Counter()
        allowed = set(selection.languages)
        for entry in entries:
            if entry.language in allowed:
                pairs.update(f"{entry.language}_{t}" for t in entry.translations if t in allowed and t != entry.language)
        planned = Counter(f"{example.src}_{example.tgt}" for example in plan)
        directions = {
            f"{s}_{t}": (pairs.get(f"{s}_{t}", 0), planned.get(f"{s}_{t}", 0))
            for s in selection.languages for t in selection.languages if s != t
        }
    return PlanCounts(languages, directions, len(plan))

"""What ``mcat translate`` decodes: its settings, and the (utterance, direction) requests planned
from a prepared index and a ``--directions`` pattern."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mcat_ds.config import Task
from mcat_ds.data.shards import IndexEntry
from mcat_ds.languages import get_language

EngineName = Literal["fast", "hf", "vllm"]

DEFAULT_BATCH: dict[str, int] = {"fast": 50, "hf": 50, "vllm": 1024}
"""Requests per decode call: a batch for our loop and HF generate; for vLLM a chunk its scheduler
batches continuously (large enough to keep it full, small enough that a kill loses little)."""


@dataclass(frozen=True)
class TranslateConfig:
    task: Task = "srt"
    directions: str = "all"
    """``all``, ``eng-x``, ``x-eng`` or a comma list of ``src-tgt`` (``x`` stands for any language)."""
    batch: int = 50
    """Requests decoded together (``fast``, ``hf``); for ``vllm``, requests handed to its scheduler in
    one call (outputs are written, and a killed run resumes, per call)."""
    encoder_batch: int = 32
    """Utterances encoded together (at most)."""
    beams: int = 1
    max_new_tokens: int = 256
    no_repeat_ngram_size: int = 0
    engine: EngineName = "fast"
    long_audio: Literal["trim", "skip"] = "trim"
    """Audio longer than the encoder's window: ``trim`` to the window (what the release does, so an
    evaluation scores every utterance) or ``skip``. Either way it is counted in the summary."""


@dataclass(frozen=True)
class Request:
    order: int
    """Position in the input order (index order, then target language order)."""
    id: str
    entry: int
    src: str
    tgt: str | None


def parse_directions(spec: str) -> list[tuple[str, str]]:
    """``all`` / ``eng-x`` / ``x-eng`` / ``deu-fra,cmn-x`` -> (src, tgt) patterns, ``x`` = any."""
    if spec == "all":
        return [("x", "x")]
    patterns = []
    for part in spec.split(","):
        pieces = part.strip().split("-")
        if len(pieces) != 2 or not all(pieces):
            raise ValueError(f"direction {part!r} is not SRC-TGT (e.g. deu-fra, eng-x, x-eng)")
        for code in pieces:
            if code != "x":
                get_language(code)  # unknown codes fail with the near matches
        patterns.append((pieces[0], pieces[1]))
    return patterns


def _matches(patterns: list[tuple[str, str]], src: str, tgt: str | None) -> bool:
    return any(ps in ("x", src) and (tgt is None or pt in ("x", tgt)) for ps, pt in patterns)


def plan_requests(entries: list[IndexEntry], config: TranslateConfig) -> list[Request]:
    """ASR: one request per utterance. SMT/SRT: one per target language the utterance has a
    reference translation in, within ``directions``."""
    patterns = parse_directions(config.directions)
    requests = []
    for index, entry in enumerate(entries):
        if config.task == "asr":
            if _matches(patterns, entry.language, None):
                requests.append(Request(len(requests), entry.key, index, entry.language, None))
            continue
        for tgt in sorted(entry.translations):
            if tgt != entry.language and _matches(patterns, entry.language, tgt):
                requests.append(Request(len(requests), f"{entry.key}:{entry.language}-{tgt}", index, entry.language, tgt))
    return requests

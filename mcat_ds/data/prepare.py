"""``mcat prepare``: validate every utterance, write webdataset tar shards, an index and a report.

A prepared dataset directory::

    shard-000000.tar ...   webdataset shards: <key>.flac (16 kHz mono) and <key>.json (metadata)
    index.jsonl            one line per sample: key, shard, byte ranges, language, seconds,
                           transcript length, translation languages (no audio, no text)
    index.check.json       the index's entry count and sha256, so that a cut or damaged index is
                           noticed when it is loaded
    report.json            written / skipped counts per language and direction, hours per language,
                           and every skipped input with file, line and reason

Nothing that cannot be used is silently lost: each such input is counted and listed in the report.
The directory appears whole or not at all: it is written as a sibling and renamed once complete.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import os
import tarfile
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

from mcat_ds.data.audio import AudioError, check_audio, decode_audio, encode_flac, require_audio_packages
from mcat_ds.data.sources import Skipped, Utterance
from mcat_ds.files import building_directory
from mcat_ds.optional import require

INDEX_FILE = "index.jsonl"
INDEX_CHECK_FILE = "index.check.json"
REPORT_FILE = "report.json"
SHARD_PATTERN = "shard-%06d.tar"
JOBS_PER_WORKER = 4
"""Utterances in flight per worker process: enough to keep each one busy, few enough to bound memory."""


@dataclass(frozen=True)
class ShardLimits:
    max_bytes: int = 256 * 1024 * 1024
    max_samples: int = 10_000


def _encode_utterance(job: tuple[Utterance, float]) -> tuple[Utterance, bytes | None, float | str]:
    """Runs in a worker process: decode, check, re-encode. Returns the FLAC bytes and seconds, or
    None and the reason the audio cannot be used."""
    utterance, max_seconds = job
    if not utterance.audio.is_file():
        return utterance, None, "missing audio file"
    try:
        samples = decode_audio(utterance.audio, max_seconds)
        seconds = check_audio(samples, max_seconds)
    except AudioError as error:
        return utterance, None, str(error)
    return utterance, encode_flac(samples), seconds


def _encoded(jobs: Iterable[tuple[Utterance, float]], workers: int):
    if workers <= 1:
        yield from map(_encode_utterance, jobs)
        return
    yield from in_worker_processes(_encode_utterance, jobs, workers, describe=_describe_job)


def _describe_job(job: tuple[Utterance, float]) -> str:
    utterance = job[0]
    return f"{utterance.audio} ({utterance.origin} line {utterance.line})"


def in_worker_processes(function: Callable, jobs: Iterable, workers: int,
                        describe: Callable[[object], str] = repr) -> Iterator:
    """``function(job)`` for each job, in input order, computed by ``workers`` processes.

    At most ``JOBS_PER_WORKER`` jobs per worker are in flight, so memory stays flat whatever the
    input's length. A worker that dies (killed, out of memory, a crash in a codec) raises
    RuntimeError naming the jobs that were being worked on, where ``multiprocessing.Pool`` would
    wait for its result forever.
    """
    # spawn, not fork: a trainer rank that builds the demo corpus already runs communication threads,
    # and a forked child can inherit one of their locks held.
    context = multiprocessing.get_context("spawn")
    board = context.Array("q", [-1] * workers, lock=False)
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_take_board_slot,
                               initargs=(context.Value("i", 0), board))
    in_flight: deque = deque()
    numbered = enumerate(jobs)
    try:
        while True:
            for number, job in itertools.islice(numbered, workers * JOBS_PER_WORKER - len(in_flight)):
                in_flight.append((number, job, pool.submit(_run_on_board, function, number, job)))
            if not in_flight:
                return
            try:
                result = in_flight[0][2].result()
            except BrokenProcessPool:
                on = {number: job for number, job, _ in in_flight}
                working = [describe(on[number]) for number in board if number in on]
                if not working:
                    where = "before it took a job"
                elif len(working) == 1:
                    where = f"while working on {working[0]}"
                else:  # the others were stopped when it died: which of them it was is not known
                    where = f"while working on one of: {'; '.join(working)}"
                raise RuntimeError(f"a worker process died (killed, out of memory, or crashed) {where}") from None
            in_flight.popleft()
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


_board: list[int] | None = None
"""In a worker process: the shared board where each worker posts the number of the job it is on."""
_board_slot = 0


def _take_board_slot(next_slot, board) -> None:
    global _board, _board_slot
    with next_slot.get_lock():
        _board_slot = next_slot.value
        next_slot.value += 1
    _board = board


def _run_on_board(function: Callable, number: int, job):
    _board[_board_slot] = number
    try:
        return function(job)
    finally:
        _board[_board_slot] = -1


def _member_ranges(shard: Path) -> dict[str, dict[str, tuple[int, int]]]:
    ranges: dict[str, dict[str, tuple[int, int]]] = defaultdict(dict)
    with tarfile.open(shard) as archive:
        for member in archive.getmembers():
            key, _, extension = member.name.partition(".")
            ranges[key][extension] = (member.offset_data, member.size)
    return ranges


def prepare_shards(
    records: Iterable[Utterance | Skipped],
    out: str | Path,
    *,
    max_seconds: float = 30.0,
    limits: ShardLimits = ShardLimits(),
    workers: int | None = None,
) -> dict:
    """Write shards, ``index.jsonl``, its check and ``report.json`` into ``out`` (which must not exist
    or be empty) and return the report.

    Everything is written into a sibling ``<out>.partial-<host>-<pid>``, flushed to disk and renamed
    to ``out`` once complete, so a failed or killed run leaves nothing under ``out`` and a rerun
    starts over; the partial folders of runs no longer alive are removed first.
    """
    require_audio_packages()  # here, not in a worker process halfway through
    out = Path(out)
    if (out / INDEX_FILE).exists():
        raise FileExistsError(f"{out} already holds prepared shards; choose an empty directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty directory; choose an empty or new one")
    out.parent.mkdir(parents=True, exist_ok=True)
    # rename(2) replaces an empty directory in one step, so `out` is never half written
    with building_directory(out) as staging:
        report = _write_prepared(records, staging, max_seconds, limits, workers or os.cpu_count() or 1)
    return report


def _write_prepared(records: Iterable[Utterance | Skipped], out: Path, max_seconds: float, limits: ShardLimits,
                    workers: int) -> dict:
    shard_writer = require("webdataset").ShardWriter
    skipped: list[Skipped] = []
    seen: dict[str, Utterance] = {}

    def jobs():
        for record in records:
            if isinstance(record, Skipped):
                skipped.append(record)
            elif record.key in seen:
                skipped.append(Skipped(file=str(record.audio), line=record.line, origin=record.origin,
                                       language=record.language,
                                       reason=f"duplicate sample key: {record.key} (first from line {seen[record.key].line})"))
            else:
                seen[record.key] = record
                yield record, max_seconds

    metadata: dict[str, dict] = {}
    with shard_writer(str(out / SHARD_PATTERN), maxcount=limits.max_samples,
                                maxsize=limits.max_bytes, verbose=0) as writer:
        for utterance, flac, result in _encoded(jobs(), workers):
            if flac is None:
                skipped.append(Skipped(file=str(utterance.audio), line=utterance.line, origin=utterance.origin,
                                       language=utterance.language, reason=str(result)))
                continue
            meta = {
                "key": utterance.key,
                "language": utterance.language,
                "transcript": utterance.transcript,
                "translations": utterance.translations,
                "seconds": round(float(result), 4),
                "source": str(utterance.audio),
            }
            writer.write({"__key__": utterance.key, "flac": flac, "json": json.dumps(meta, ensure_ascii=False).encode()})
            metadata[utterance.key] = meta

    shards = sorted(out.glob("shard-*.tar"))
    entries, digest = 0, hashlib.sha256()
    with open(out / INDEX_FILE, "wb") as index:
        for shard in shards:
            for key, ranges in _member_ranges(shard).items():
                meta = metadata[key]
                entry = {
                    "key": key,
                    "shard": shard.name,
                    "audio": list(ranges["flac"]),
                    "meta": list(ranges["json"]),
                    "language": meta["language"],
                    "seconds": meta["seconds"],
                    "chars": len(meta["transcript"]),
                    "translations": sorted(meta["translations"]),
                }
                line = (json.dumps(entry) + "\n").encode("utf-8")
                index.write(line)
                digest.update(line)
                entries += 1
    (out / INDEX_CHECK_FILE).write_text(json.dumps({"entries": entries, "sha256": digest.hexdigest()}) + "\n",
                                        encoding="utf-8")
    report = _report(metadata.values(), skipped, [shard.name for shard in shards])
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return report


def _report(written: Iterable[dict], skipped: list[Skipped], shards: list[str]) -> dict:
    languages: dict[str, dict] = defaultdict(lambda: {"written": 0, "skipped": 0, "hours": 0.0})
    directions: Counter[str] = Counter()
    total = 0
    for meta in written:
        total += 1
        entry = languages[meta["language"]]
        entry["written"] += 1
        entry["hours"] += meta["seconds"] / 3600
        for target in meta["translations"]:
            directions[f"{meta['language']}_{target}"] += 1
    for item in skipped:
        if item.language is not None:
            languages[item.language]["skipped"] += 1
    for entry in languages.values():
        entry["hours"] = round(entry["hours"], 4)
    skipped = sorted(skipped, key=lambda item: (item.origin or item.file, item.line or 0, item.file))
    reasons = Counter(item.reason.split(":")[0] for item in skipped)
    return {
        "written": total,
        "skipped_count": len(skipped),
        "skipped_by_reason": dict(sorted(reasons.items())),
        "hours": round(sum(entry["hours"] for entry in languages.values()), 4),
        "languages": dict(sorted(languages.items())),
        "directions": dict(sorted(directions.items())),
        "shards": shards,
        "skipped": [item.to_json() for item in skipped],
    }

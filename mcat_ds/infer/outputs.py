"""What ``mcat translate`` leaves on disk, and how a rerun reads it back.

    OUT                  one JSON line per request, in the data's order (rewritten atomically)
    OUT.part<RANK>       each rank's lines as its batches finish; merged into OUT at the end
    OUT.identity.json    what made the outputs: the model's content, dtype, task, data, generation
    OUT.summary.json     counts and timing of the last run

A rerun skips the requests already in OUT or a part file, so a killed job loses at most the batch it
was decoding. The identity keeps a rerun honest: outputs of another checkpoint, task, data or
decoding setting are never counted as done, and never mixed into one file. Directions are not part of
the identity: ``--directions x-eng`` into an OUT that holds an ``eng-x`` run adds to it.
"""

from __future__ import annotations

import contextlib
import glob
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

from mcat_ds.files import write_atomically

IDENTITY_FORMAT = "mcat-translate-outputs"


class OutputMismatch(ValueError):
    """OUT holds outputs that a run with these settings must not count as its own."""


def part_path(out: Path, rank: int) -> Path:
    return out.with_name(f"{out.name}.part{rank}")


def part_paths(out: Path) -> list[Path]:
    """Every rank's part file, whatever the world size of the run that wrote them, and nothing else
    (``OUT`` may hold glob characters; ``OUT.part0.bak`` is not a part file)."""
    pattern = re.compile(re.escape(out.name) + r"\.part\d+")
    return sorted(path for path in out.parent.glob(glob.escape(out.name) + ".part*")
                  if pattern.fullmatch(path.name) and path.is_file())


@contextlib.contextmanager
def appending(part_file: Path) -> Iterator[TextIO]:
    """``part_file`` open to append lines; a last line a kill cut stays on its own line (and is dropped
    by :func:`read_records`), not glued to the first new one."""
    with open(part_file, "a", encoding="utf-8") as part:
        if part.tell() and not part_file.read_bytes().endswith(b"\n"):
            part.write("\n")
        yield part


def read_records(paths: Iterable[Path], warn: Callable[[str], None] | None = None) -> dict[str, dict]:
    """id -> record from output and part files, read as bytes. A last line a kill cut (mid-way
    through a multi-byte character, or through the JSON) is dropped quietly: its request runs again.
    A damaged line elsewhere is dropped too, and ``warn`` names its file and line."""
    done: dict[str, dict] = {}
    for path in paths:
        if not path.is_file():
            continue
        data = path.read_bytes()
        lines = data.split(b"\n")
        for number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
                if not isinstance(record, dict) or not isinstance(record.get("id"), str):
                    raise ValueError("not an output record")
            except ValueError as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
                cut_by_a_kill = number == len(lines) and not data.endswith(b"\n")
                if warn is not None and not cut_by_a_kill:
                    warn(f"{path}:{number}: dropped a damaged output line ({error.__class__.__name__}); "
                         "its request runs again")
                continue
            done[record["id"]] = record
    return done


def read_outputs(out: Path, warn: Callable[[str], None] | None = None) -> dict[str, dict]:
    """Every finished output of OUT and its part files."""
    return read_records([out, *part_paths(out)], warn)


def merge_outputs(out: Path, order: dict[str, int], warn: Callable[[str], None] | None = None) -> int:
    """OUT and its part files -> OUT (atomic replace), part files removed; returns the records.

    Records are sorted by ``order`` (request id -> position in the data's full plan); records it does
    not know (an earlier run's, on data of the same identity) keep their relative order after them.
    Nothing already finished is dropped."""
    parts = part_paths(out)
    done = read_records([out, *parts], warn)
    known = sorted((record for record in done.values() if record["id"] in order), key=lambda r: order[r["id"]])
    others = [record for record in done.values() if record["id"] not in order]
    lines = [json.dumps({**record, "order": position}, ensure_ascii=False) + "\n"
             for position, record in enumerate(known + others)]
    write_atomically(out, "".join(lines))
    for path in parts:
        path.unlink(missing_ok=True)
    return len(lines)


@dataclass(frozen=True)
class OutputIdentity:
    """What made a translate output. ``checkpoint`` and ``data`` are where they were (for people);
    the comparison is of content: ``model`` and ``data_sha256``."""

    checkpoint: str
    model: str
    """The checkpoint's content fingerprint (``mcat_ds.checkpoint.checkpoint_fingerprint``)."""
    dtype: str
    task: str
    data: str
    data_sha256: str
    """sha256 of the prepared data's ``index.jsonl``."""
    generation: dict[str, Any]

    COMPARED = ("model", "dtype", "task", "data_sha256", "generation")


def identity_path(out: Path) -> Path:
    return out.with_name(out.name + ".identity.json")


def check_output_identity(out: Path, identity: OutputIdentity) -> str | None:
    """Raise OutputMismatch when OUT (or its part files) came from a run this one must not continue,
    naming what differs and how to go on; returns a note when OUT holds outputs of unknown origin
    (written before identities were), which are then taken as this run's."""
    sidecar = identity_path(out)
    if not (out.is_file() or part_paths(out)):
        return None  # nothing to protect: the identity of a removed output is replaced
    if not sidecar.is_file():
        return f"{out} has no {sidecar.name}: its outputs are taken as made with these settings"
    try:
        saved = json.loads(sidecar.read_bytes().decode("utf-8"))
        if not isinstance(saved, dict) or saved.get("format") != IDENTITY_FORMAT:
            raise ValueError(f"format {saved.get('format') if isinstance(saved, dict) else saved!r}")
    except ValueError as error:
        raise OutputMismatch(f"{sidecar} is damaged ({error.__class__.__name__}: {error}); it says what made the "
                             f"outputs in {out}: write to another --out, or remove {out}, its part files and "
                             f"{sidecar.name} to start over") from None
    current = asdict(identity)
    differing = [f"{key}: {saved.get(key)!r} there, {current[key]!r} now"
                 for key in OutputIdentity.COMPARED if saved.get(key) != current[key]]
    if differing:
        raise OutputMismatch(
            f"--out {out} holds outputs of another run ({'; '.join(differing)}; made from {saved.get('checkpoint')} "
            f"on {saved.get('data')}). Write to another --out, or remove {out} and {sidecar.name} to start over")
    return None


def write_output_identity(out: Path, identity: OutputIdentity) -> None:
    write_atomically(identity_path(out), json.dumps({"format": IDENTITY_FORMAT, **asdict(identity)}, indent=1,
                                                    ensure_ascii=False) + "\n")

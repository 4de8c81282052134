"""Shared by the benchmark scripts: what ran where, and rows appended to CSVs under benchmarks/."""

from __future__ import annotations

import csv
import datetime
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mcat_ds.checkpoint import code_version

CSV_COLUMNS = ("device", "date", "commit", "benchmark", "shape", "implementation", "metric", "value", "ratio")


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def commit() -> str:
    version = code_version()
    sha = version.get("git_commit", "unknown")[:12]
    return sha + ("-dirty" if version.get("git_dirty") else "")


@dataclass(frozen=True)
class Row:
    benchmark: str
    shape: str
    implementation: str
    metric: str
    value: float
    ratio: float | None = None


def append_rows(path: str | Path, rows: list[Row]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    stamp = {"device": device_name(), "date": datetime.date.today().isoformat(), "commit": commit()}
    with open(path, "a", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        if new:
            writer.writeheader()
        for row in rows:
            values = asdict(row)
            values["value"] = f"{row.value:.6g}"
            values["ratio"] = "" if row.ratio is None else f"{row.ratio:.3f}"
            writer.writerow({**stamp, **values})


def rate(work: Callable[[], int], min_seconds: float) -> float:
    """Items per second of ``work`` (which returns how many items it did), repeated for at least
    ``min_seconds`` after one warm-up call."""
    work()
    done, start = 0, time.perf_counter()
    while True:
        done += work()
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return done / elapsed

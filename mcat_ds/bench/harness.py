"""The benchmarks' one harness: their shared arguments, what ran where, and rows appended to CSVs
under benchmarks/. One module per benchmark beside it (kernels, train, inference, data, demo, longform, faults, serving); the
scripts in launch/ only call their ``main``."""

from __future__ import annotations

import argparse
import csv
import datetime
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mcat_ds.checkpoint import code_version

BENCHMARKS_DIR = Path(__file__).resolve().parents[2] / "benchmarks"
"""Where the rows of record go: the repository's benchmarks/ folder (an editable install)."""
CSV_COLUMNS = ("device", "date", "commit", "benchmark", "shape", "implementation", "metric", "value", "ratio")


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def commit() -> str:
    version = code_version()
    sha = version.get("git_commit", "unknown")[:12]
    return sha + ("-dirty" if version.get("git_dirty") else "")


def cpu_peak_memory(function: Callable[[], object]) -> int | None:
    """Peak bytes of CPU tensors alive while ``function`` runs (those that existed before included),
    from the PyTorch profiler's memory timeline; None where this torch cannot produce one. Slow: for
    one untimed call."""
    try:
        from torch.profiler._memory_profiler import MemoryProfileTimeline

        activities = [torch.profiler.ProfilerActivity.CPU]
        with torch.profiler.profile(activities=activities, profile_memory=True, record_shapes=True,
                                    with_stack=True) as profile:
            function()
        _, sizes = MemoryProfileTimeline(profile._memory_profile())._coalesce_timeline("cpu")
    except (ImportError, AttributeError, RuntimeError):  # a private API: absent or changed
        return None
    return int(max(sum(categories) for categories in sizes)) if sizes else None


@dataclass(frozen=True)
class Row:
    benchmark: str
    shape: str
    implementation: str
    metric: str
    value: float
    ratio: float | None = None


def append_stamped_rows(path: str | Path, columns: tuple[str, ...], rows: list[dict]) -> None:
    """Append rows to a benchmark CSV (header first when it is new), each stamped with the device,
    the date and the commit it was measured on."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    stamp = {"device": device_name(), "date": datetime.date.today().isoformat(), "commit": commit()}
    with open(path, "a", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({**stamp, **row})


def append_rows(path: str | Path, rows: list[Row]) -> None:
    append_stamped_rows(path, CSV_COLUMNS, [
        {**asdict(row), "value": f"{row.value:.6g}", "ratio": "" if row.ratio is None else f"{row.ratio:.3f}"}
        for row in rows])


def report(rows: list[Row], csv_path: str | Path | None) -> None:
    """Print the rows (what a benchmark script shows) and append them to ``csv_path`` when given."""
    for row in rows:
        ratio = "" if row.ratio is None else f"  x{row.ratio:.2f}"
        print(f"{row.benchmark:24s} {row.implementation:44s} {row.metric:30s} {row.value:12.4g}{ratio}")
    if len({row.shape for row in rows}) == 1:
        print(f"[{rows[0].shape}]")
    if csv_path:
        append_rows(csv_path, rows)
        print(f"appended {len(rows)} rows to {csv_path}")


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


def read_rows(path: str | Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def latest_run(rows: list[dict[str, str]], device: str | None = None) -> list[dict[str, str]]:
    """The rows of the newest (date, commit) measured on ``device`` (default: the newest run's device),
    in file order."""
    if device is not None:
        rows = [r for r in rows if r["device"] == device]
    if not rows:
        return []
    last = rows[-1]
    return [r for r in rows if (r["device"], r["date"], r["commit"]) == (last["device"], last["date"], last["commit"])]


def plot_times(rows: list[dict[str, str]], path: str | Path, title: str) -> None:
    """One panel per (benchmark, shape): a horizontal bar of milliseconds per implementation, labelled
    with its speed-up over the panel's baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if r["metric"] == "ms"]
    panels: dict[tuple[str, str], list[dict[str, str]]] = {}
    for row in timed:
        panels.setdefault((row["benchmark"], row["shape"]), []).append(row)
    if not panels:
        raise ValueError("no timing rows to plot")
    figure, axes = plt.subplots(len(panels), 1, figsize=(9, 1.2 + 0.45 * sum(len(v) + 2 for v in panels.values())),
                                squeeze=False)
    for axis, ((benchmark, shape), panel) in zip(axes[:, 0], panels.items()):
        names = [r["implementation"] for r in panel]
        values = [float(r["value"]) for r in panel]
        bars = axis.barh(range(len(panel)), values, color="#4c72b0")
        axis.set_yticks(range(len(panel)), names, fontsize=8)
        axis.invert_yaxis()
        axis.set_xlabel("ms (lower is better)", fontsize=8)
        axis.set_title(f"{benchmark}: {shape}", fontsize=8, loc="left")
        for bar, row in zip(bars, panel):
            label = f" {float(row['value']):.3g} ms" + (f"  x{float(row['ratio']):.2f}" if row["ratio"] else "")
            axis.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, label, va="center", fontsize=7)
        axis.set_xlim(0, max(values) * 1.35)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def benchmark_parser(description: str | None, csv_name: str) -> argparse.ArgumentParser:
    """The arguments every benchmark takes: --device, --csv, --smoke."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--csv", help=f"rows go here (default: benchmarks/{csv_name}; none with --smoke)")
    parser.add_argument("--smoke", action="store_true",
                        help="toy sizes on CPU in seconds: a check that it runs (what the test suite runs)")
    return parser


def csv_target(args: argparse.Namespace, csv_name: str) -> str | None:
    """--csv, else the repository's CSV of record, else (--smoke) none."""
    return args.csv or (None if args.smoke else str(BENCHMARKS_DIR / csv_name))

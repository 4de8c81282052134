"""The GPU acceptance run cannot rot: its --smoke runs every step on CPU and prints the targets table."""

import csv
import os
import subprocess
import sys

import pytest

from conftest import REPO
from mcat_ds.bench.acceptance import TARGETS, Target, evaluate_targets
from mcat_ds.bench.harness import BENCHMARKS_DIR, CSV_COLUMNS


def write_rows(path, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({"device": "H100", "date": "d", "commit": "c", "ratio": "", **row})


def test_targets_are_judged_from_the_runs_rows(tmp_path):
    write_rows(tmp_path / "kernels.csv", [
        {"benchmark": "cross-attention fwd", "shape": "32x12h, all frames valid", "implementation": "mcat triton",
         "metric": "ms", "value": "1.0", "ratio": "1.2"},
        {"benchmark": "cross-attention fwd", "shape": "32x12h, all frames valid", "implementation": "mcat triton",
         "metric": "ms", "value": "1.0", "ratio": "1.7"},  # the newest row counts
        {"benchmark": "cross-attention fwd", "shape": "32x12h, FLEURS-like lengths", "implementation": "mcat triton",
         "metric": "ms", "value": "1.0", "ratio": "2.5"},
    ])
    write_rows(tmp_path / "train.csv", [
        {"benchmark": "training", "shape": "tiny, random weights", "implementation": "ours (packed, label logits)",
         "metric": "mfu", "value": "0.5"},
    ])
    results = {target.what: (measured, verdict) for target, measured, verdict in evaluate_targets(tmp_path)}
    assert results["cross-attention fwd vs SDPA flash, all frames valid"] == (1.7, "met")
    assert results["cross-attention fwd vs masked SDPA, FLEURS-like lengths"] == (2.5, "missed")
    assert results["training MFU (small-9b)"] == (None, "not measured")  # a tiny row is not the 9B target
    assert dict((t.what, m) for t, m, _ in evaluate_targets(tmp_path, smoke=True))["training MFU (small-9b)"] == 0.5
    assert results["batch inference vs HF generate"] == (None, "not measured")  # no CSV at all
    assert Target("x", "a.csv", "b", "c", "d", at_most=1.0).verdict(0.9)


@pytest.mark.slow
def test_the_smoke_run_runs_every_step_and_prints_the_targets_table(tmp_path):
    record = {path.name: path.read_bytes() for path in BENCHMARKS_DIR.glob("*.csv")}
    result = subprocess.run(["bash", str(REPO / "launch" / "gpu_acceptance.sh"), "--smoke", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=900,
                            env={**os.environ, "MCAT_PYTHON": sys.executable})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    for step in ("cuda-tests", "kernels", "train-small-9b", "train-large-27b", "deepspeed-stage", "inference"):
        assert f"[{step}] ok in" in result.stdout
        assert (tmp_path / f"{step}.log").is_file()
    table = (tmp_path / "targets.md").read_text()
    for target in TARGETS:
        assert f"| {target.what} | {target.bound()} |" in table
    assert "| batch inference vs HF generate | >= 9x |" in table and "not measured |" in table  # CPU: no roofline
    assert "deepspeed stage: 2 steps logged" in table
    for name in ("kernels.csv", "train.csv", "inference.csv"):
        assert (tmp_path / name).stat().st_size > 0
    # a smoke run leaves the CSVs of record alone
    assert {path.name: path.read_bytes() for path in BENCHMARKS_DIR.glob("*.csv")} == record

"""The GPU acceptance run cannot rot: .gpu/ is packed, installed the way the GPU machine installs it
(pip --no-index into an environment holding only the GPU image's packages), and the --smoke run
goes through every step on CPU and prints the targets table."""

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from mcat_ds.bench.acceptance import TARGETS, Target, evaluate_targets
from mcat_ds.bench.harness import BENCHMARKS_DIR, CSV_COLUMNS

SCRIPT = REPO / "launch" / "gpu_acceptance.sh"
IMAGE_PYTHON = os.environ.get("MCAT_GPU_IMAGE_PYTHON")
"""launch/test.sh sets it: the interpreter of .venv-gpu-image (the image's packages only)."""
PACK_LIMIT_BYTES = 48 * 2**20
IMAGE_LACKS = ("deepspeed", "webdataset", "soundfile", "soxr", "pydantic", "hjson", "liger_kernel", "vllm", "comet")


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
    assert results["batch inference vs HF generate, 4 directions per utterance"] == (None, "not measured")  # no CSV
    assert Target("x", "a.csv", "b", "c", "d", at_most=1.0).verdict(0.9)


def pinned_versions() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints" / "transformers5.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name.lower())] = version
    return pins


def read_manifest(folder: Path) -> list[dict[str, str]]:
    lines = [line for line in (folder / "MANIFEST.tsv").read_text().splitlines() if not line.startswith("#")]
    return list(csv.DictReader(lines, delimiter="\t"))


def pack(folder: Path, python_version: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), "--pack", "--python-version", python_version, "--wheels", str(folder)],
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def packed_for_the_image(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pack") / ".gpu"
    result = pack(folder, "3.12")  # the default target: the image's CPython
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return folder


@pytest.mark.slow
def test_pack_holds_each_wanted_package_once_at_the_tested_version_for_the_image(packed_for_the_image):
    manifest = read_manifest(packed_for_the_image)
    wanted = [line.split() for line in (REPO / "launch" / "gpu_wheels.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert [row["name"] for row in manifest] == [fields[0].split("==")[0] for fields in wanted]
    pins = pinned_versions()
    for row, fields in zip(manifest, wanted):
        expected = fields[0].split("==")[1] if "==" in fields[0] else pins[re.sub(r"[-_.]+", "-", row["name"].lower())]
        assert row["version"] == expected, row
        path = packed_for_the_image / row["file"]
        assert path.stat().st_size == int(row["bytes"])
        if path.suffix == ".whl":  # CPython 3.12 or pure Python, manylinux x86-64 or any platform
            tags = path.stem.split("-")[-3:]
            assert tags[0] in {"cp312", "py3", "py2.py3"} and tags[1] in {"cp312", "abi3", "none"}, path.name
            assert tags[2] == "any" or "x86_64" in tags[2], path.name
        else:
            assert row["name"] == "deepspeed" and path.name.endswith(".tar.gz")  # the sdist, built there
    files = sorted(path.name for path in packed_for_the_image.iterdir())
    assert files == sorted([row["file"] for row in manifest] + ["MANIFEST.tsv"])  # one version each, nothing else
    assert sum(path.stat().st_size for path in packed_for_the_image.iterdir()) < PACK_LIMIT_BYTES


@pytest.mark.slow
def test_the_smoke_run_installs_from_the_pack_and_runs_every_step(tmp_path):
    """In CI this runs in .venv-gpu-image: what the image lacks comes from a pack made here, installed
    with pip --no-index as on the GPU. Run by hand, it uses this interpreter (nothing to install)."""
    python = IMAGE_PYTHON or sys.executable
    if IMAGE_PYTHON:
        probe = subprocess.run([python, "-c", "import importlib.util as u, sys; "
                                f"print([n for n in {IMAGE_LACKS!r} if u.find_spec(n)])"],
                               capture_output=True, text=True, check=True)
        assert probe.stdout.strip() == "[]", "the image stand-in holds packages the image lacks"
        version = subprocess.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                                 capture_output=True, text=True, check=True).stdout.strip()
        result = pack(tmp_path / ".gpu", version)  # the same pack, for this machine's CPython
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record = {path.name: path.read_bytes() for path in BENCHMARKS_DIR.glob("*.csv")}
    env = {**os.environ, "MCAT_PYTHON": python, "MCAT_WHEELS": str(tmp_path / ".gpu"), "MCAT_SITE": str(tmp_path / "site")}
    env.pop("PYTHONPATH", None)
    out = tmp_path / "out"
    result = subprocess.run(["bash", str(SCRIPT), "--smoke", "--out", str(out)],
                            capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    if IMAGE_PYTHON:
        assert "with pip --no-index: deepspeed" in result.stdout
        assert "every package of launch/gpu_wheels.txt imports" in result.stdout
    for step in ("cuda-tests", "kernels", "train-small-9b", "train-large-27b", "deepspeed-stage", "inference"):
        assert f"[{step}] ok in" in result.stdout
        assert (out / f"{step}.log").is_file()
    table = (out / "targets.md").read_text()
    for target in TARGETS:
        assert f"| {target.what} | {target.bound()} |" in table
    assert "not measured |" in table  # CPU: no roofline, no MFU
    assert "deepspeed stage: 2 steps logged" in table
    for name in ("kernels.csv", "train.csv", "inference.csv"):
        assert (out / name).stat().st_size > 0
    # a smoke run leaves the CSVs of record alone
    assert {path.name: path.read_bytes() for path in BENCHMARKS_DIR.glob("*.csv")} == record


def test_a_missing_package_without_a_pack_is_named(tmp_path):
    """No .gpu/ and a package that does not import: the run says which and where to get it."""
    blocker = REPO / "tests" / "blocked_imports"
    env = {**os.environ, "MCAT_PYTHON": sys.executable, "MCAT_WHEELS": str(tmp_path / "none"),
           "PYTHONPATH": str(blocker), "MCAT_BLOCKED_IMPORTS": "webdataset"}
    result = subprocess.run(["bash", str(SCRIPT), "--smoke", "--out", str(tmp_path / "out"), "--only", "nothing"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert "not importable here: webdataset" in result.stdout and "--pack" in result.stdout, result.stdout


def test_the_site_on_pythonpath_is_private_and_removed_when_the_run_ends(tmp_path):
    """Without MCAT_SITE, what goes on PYTHONPATH is a folder only this user can write, not a fixed
    shared path another local user could fill first; the run's exit status still comes through."""
    record = tmp_path / "record"
    python = tmp_path / "python"
    python.write_text(f"""#!/usr/bin/env bash
case "$1" in
    -c) exit 1 ;;  # "import mcat_ds, mcat_kernels" fails: the checkout and the site go on PYTHONPATH
    -m) site=${{PYTHONPATH##*:}}; stat -c %a "$site" > {record}; echo "$site" >> {record}; ls "$site" >> {record}; exit 3 ;;
    *) cat > /dev/null ;;  # the import probe: everything imports
esac
""")
    python.chmod(0o755)
    env = {**os.environ, "MCAT_PYTHON": str(python), "TMPDIR": str(tmp_path)}
    for name in ("PYTHONPATH", "MCAT_SITE"):
        env.pop(name, None)
    result = subprocess.run(["bash", str(SCRIPT), "--smoke"], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 3, result.stdout + result.stderr
    mode, site, link = record.read_text().split()
    assert mode == "700" and Path(site).parent == tmp_path and link == "mcat_kernels"
    assert not Path(site).exists()

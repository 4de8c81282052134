"""The benchmark scripts run (in --smoke mode) so that they cannot rot."""

import subprocess
import sys

from conftest import REPO


def run_script(name: str, *args: str) -> str:
    result = subprocess.run([sys.executable, str(REPO / "launch" / name), *args],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_bench_data_smoke(small_shards):
    out = run_script("bench_data.py", "--smoke", "--data", str(small_shards))
    assert "WhisperFeatureExtractor (baseline)" in out and "DataLoader 1 workers" in out
    assert "samples_per_s" in out

"""The serving benchmark runs (--smoke: three clips, one and two requests in flight) and writes its
rows: mcat serve's requests per second and real-time factor at each concurrency, beside the offline
engine's, which is the baseline of the ratios.

Runs where vLLM is installed, with the package installed there (the server finds the model through
its plugin entry point). It starts a server and then an offline engine, one after the other, in a
subprocess of its own: about a minute on two cores."""

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here; launch/test.sh runs this file in .venv-vllm")

from conftest import needs_espeak  # noqa: E402
from mcat_ds.bench.harness import read_rows  # noqa: E402
from mcat_ds.bench.serving import OFFLINE  # noqa: E402
from test_benchmarks import run_script  # noqa: E402

METRICS = {"requests_per_second", "real_time_factor"}


@needs_espeak
def test_bench_serving_smoke_rows_carry_the_offline_ratio(tmp_path):
    table = tmp_path / "serving.csv"
    out = run_script("bench_serving.py", "--smoke", "--csv", str(table))
    assert "mcat serve answered /health" in out
    rows = read_rows(table)
    served = [f"mcat serve /v1/audio/translations, {concurrency} in flight" for concurrency in (1, 2)]
    assert {(row["implementation"], row["metric"]) for row in rows} == {
        (implementation, metric) for implementation in [*served, OFFLINE] for metric in METRICS}
    assert len(rows) == 6 and len({row["shape"] for row in rows}) == 1
    assert "3 clips" in rows[0]["shape"] and "6 requests" in rows[0]["shape"]
    baseline = {row["metric"]: float(row["value"]) for row in rows if row["implementation"] == OFFLINE}
    for row in rows:
        assert float(row["value"]) > 0 and row["device"] and row["commit"]
        assert float(row["ratio"]) == pytest.approx(float(row["value"]) / baseline[row["metric"]], rel=1e-2)

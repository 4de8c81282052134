"""The benchmark scripts run (in --smoke mode) so that they cannot rot."""

import subprocess
import sys

import pytest

from conftest import REPO, needs_espeak
from mcat_ds.bench.harness import read_rows


def run_script(name: str, *args: str) -> str:
    result = subprocess.run([sys.executable, str(REPO / "launch" / name), *args],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_bench_data_smoke(small_shards):
    out = run_script("bench_data.py", "--smoke", "--data", str(small_shards))
    assert "WhisperFeatureExtractor (baseline)" in out and "DataLoader 1 workers" in out
    assert "samples_per_s" in out


def test_bench_kernels_smoke_writes_rows_and_plot(tmp_path):
    """Every implementation is checked against the reference before it is timed, rows carry ratios to
    the case's baseline, and the plot is drawn from the CSV. The kernels run in Triton's interpreter."""
    table = tmp_path / "kernels.csv"
    out = run_script("bench_kernels.py", "--smoke", "--csv", str(table))
    assert "appended" in out
    rows = read_rows(table)
    implementations = {(r["benchmark"], r["implementation"]) for r in rows}
    for mode in ("fwd", "fwd+bwd"):
        for name in ("mcat triton", "sdpa + mask", "eager (Blip2QFormer)"):
            assert (f"cross-attention {mode}", name) in implementations
        assert (f"adapter {mode}", "mcat triton kernels, varlen K/V") in implementations
        baseline = [r for r in rows if r["benchmark"] == f"adapter {mode}" and "reference" in r["implementation"]]
        assert [float(r["ratio"]) for r in baseline] == [1.0]
    for row in rows:
        assert float(row["value"]) > 0 and row["device"] and row["commit"]
    skipped = {r["implementation"]: float(r["value"]) for r in rows if r["benchmark"] == "padding accounting"}
    assert 0.3 < skipped["cross-attention K/V bytes and FLOPs, block-skipping kernel"] < 0.7
    assert (tmp_path / "kernels.png").stat().st_size > 10_000


def test_bench_inference_smoke_counts_encoder_passes_and_matches_hf(tmp_path):
    table = tmp_path / "inference.csv"
    run_script("bench_inference.py", "--smoke", "--csv", str(table))
    values = {(r["implementation"], r["metric"]): float(r["value"]) for r in read_rows(table)}
    assert values[("HF generate, encoder per request (release)", "encoder_passes_per_utterance")] == 3
    assert values[("mcat translate path", "encoder_passes_per_utterance")] == 1
    assert values[("mcat translate path", "outputs_identical_to_hf_fraction")] == 1.0
    assert values[("mcat translate path", "seconds")] > 0


def test_bench_train_smoke_same_loss_less_padding_fewer_logits(tmp_path):
    table = tmp_path / "train.csv"
    run_script("bench_train.py", "--smoke", "--checkpointing", "selective,full", "--llm-layers", "2", "--per-layer",
               "--csv", str(table))
    values = {(r["implementation"], r["metric"]): float(r["value"]) for r in read_rows(table)}
    naive, ours = "naive (padded, eager, full logits)", "ours (packed, label logits)"
    for variant in (ours, "ours + selective checkpointing", "ours + full checkpointing"):
        # same model, same batches
        assert values[(variant, "loss")] == pytest.approx(values[(naive, "loss")], rel=1e-4), variant
        assert values[(variant, "padding_fraction")] == 0 < values[(naive, "padding_fraction")]
        assert values[(variant, "logits_gib_fp32_alive")] < values[(naive, "logits_gib_fp32_alive")]
    for variant in (naive, ours):
        assert values[(variant, "samples_per_s")] > 0 and values[(variant, "peak_memory_gib")] > 0
        assert (variant, "ms_per_llm_layer") in values and (variant, "samples_per_s_at_2_layers") in values


@needs_espeak
def test_bench_longform_smoke_rows_carry_the_batched_ratio(tmp_path):
    table = tmp_path / "longform.csv"
    run_script("bench_longform.py", "--smoke", "--csv", str(table))
    rows = {row["implementation"]: row for row in read_rows(table)}
    assert set(rows) == {"batched", "one window at a time"}
    batched, sequential = rows["batched"], rows["one window at a time"]
    assert batched["shape"] == sequential["shape"] and "segments" in batched["shape"]
    assert float(sequential["ratio"]) == 1.0
    assert float(batched["ratio"]) == pytest.approx(float(batched["value"]) / float(sequential["value"]), rel=1e-2)

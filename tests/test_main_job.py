"""The README's main command, end to end: the whole curriculum on the demo corpus, then the user's
path: `mcat translate` of every utterance into each of its targets, `mcat evaluate`."""

import json
import subprocess
import sys

import pytest

from conftest import needs_espeak, read_metrics
from mcat_ds.curriculum import stage_names
from mcat_ds.presets import get_preset

pytestmark = [pytest.mark.slow, needs_espeak]

EXACT_MATCH_FLOOR = 0.95
"""Below every seed measured (benchmarks/demo_seeds.csv) by a margin; the README quotes the spread."""


def test_mcat_demo_overfits_the_demo_corpus(tmp_path):
    run_dir = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "mcat_ds.cli", "demo", "--run-dir", str(run_dir)],
                            capture_output=True, text=True, timeout=25 * 60)
    # a stage that misses its target-tag gate stops the curriculum there, and says so
    assert result.returncode == 0, result.stderr[-5000:]
    report = json.loads((run_dir / "report.json").read_text())
    assert (report["n_utterances"], report["n_requests"], report["directions"]) == (360, 2880, 72)
    assert report["srt_exact_match"] >= EXACT_MATCH_FLOOR, report
    assert report["dev"]["n_requests"] == 720 and 0 <= report["dev"]["srt_exact_match"] <= 1
    for stage in stage_names(get_preset("tiny")):
        steps = [m["step"] for m in read_metrics(run_dir / stage / "metrics.jsonl")]
        assert steps == list(range(1, len(steps) + 1)) and steps
        assert (run_dir / stage / "final" / "mcat_config.json").is_file()
    assert report["stages"]["srt"]["val_tag_accuracy"] >= 0.9
    environment = report["environment"]
    assert environment["world_size"] == 2 and environment["threads_per_rank"] == 1
    assert environment["seeds"] == {"runtime": 0, "data": 0} and report["seed"] == 0
    decoded = [json.loads(line) for line in (run_dir / "decoded.jsonl").read_text().splitlines()]
    assert len(decoded) == 2880 and {"id", "src", "tgt", "hyp", "hyp_transcript", "ref", "src_ref"} <= set(decoded[0])
    directions = (run_dir / "evaluation" / "directions.csv").read_text().splitlines()
    assert len(directions) == 1 + 72 and report["evaluation"]["mean_chrf"] >= 90
    assert (run_dir / "evaluation" / "heatmap.png").is_file()
    assert (run_dir / "evaluation-dev" / "directions.csv").is_file()

    # running it again finds every stage complete and decodes again, to the same outputs
    again = subprocess.run([sys.executable, "-m", "mcat_ds.cli", "demo", "--run-dir", str(run_dir)],
                           capture_output=True, text=True, timeout=10 * 60)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((run_dir / "report.json").read_text())["srt_exact_match"] == report["srt_exact_match"]
    other_seed = subprocess.run([sys.executable, "-m", "mcat_ds.cli", "demo", "--run-dir", str(run_dir), "--seed", "1"],
                                capture_output=True, text=True, timeout=5 * 60)
    assert other_seed.returncode == 2 and "trained with --seed 0" in other_seed.stderr

"""The README's main command, end to end: the whole curriculum on the demo corpus, then decoding."""

import json
import subprocess
import sys

import pytest

from conftest import needs_espeak, read_metrics
from mcat_ds.curriculum import stage_names
from mcat_ds.presets import get_preset

pytestmark = [pytest.mark.slow, needs_espeak]


def test_mcat_demo_overfits_the_demo_corpus(tmp_path):
    run_dir = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "mcat_ds.cli", "demo", "--run-dir", str(run_dir)],
                            capture_output=True, text=True, timeout=25 * 60)
    assert result.returncode == 0, result.stderr[-5000:]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["n_utterances"] == 360
    assert report["srt_exact_match"] >= 0.9, report
    for stage in stage_names(get_preset("tiny")):
        steps = [m["step"] for m in read_metrics(run_dir / stage / "metrics.jsonl")]
        assert steps == list(range(1, len(steps) + 1)) and steps
        assert (run_dir / stage / "final" / "mcat_config.json").is_file()
    decoded = [json.loads(line) for line in (run_dir / "decoded.jsonl").read_text().splitlines()]
    assert len(decoded) == 360 and {"id", "src", "tgt", "hyp", "hyp_transcript", "ref", "src_ref"} <= set(decoded[0])
    assert len({(d["src"], d["tgt"]) for d in decoded}) == 72  # every direction of the 9 languages
    directions = (run_dir / "evaluation" / "directions.csv").read_text().splitlines()
    assert len(directions) == 1 + 72 and report["evaluation"]["mean_chrf"] >= 90
    assert (run_dir / "evaluation" / "heatmap.png").is_file()

    # running it again finds every stage complete and only decodes
    again = subprocess.run([sys.executable, "-m", "mcat_ds.cli", "demo", "--run-dir", str(run_dir)],
                           capture_output=True, text=True, timeout=10 * 60)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((run_dir / "report.json").read_text())["srt_exact_match"] == report["srt_exact_match"]

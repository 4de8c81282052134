"""``mcat demo``: the whole curriculum on the built-in demo corpus with the tiny preset, on CPU.

It synthesizes the corpus, writes the tiny random base checkpoints, starts the DeepSpeed launcher
with two ranks for every curriculum stage, then goes the way a user goes with a trained model:
``mcat translate`` (the fast decoder) turns every training utterance into SRT outputs for each of
its 8 target languages, and the ``dev`` split (a voice never trained on) as well, and
``mcat evaluate`` scores them. ``report.json`` holds exact-match rates (training split: the figure
the test gates; dev: reported apart, not gated), the stages' final losses and target-tag
accuracies, timings and where it ran. The tiny model overfits its data; exact transcripts and
translations for nearly all utterances show that labels, masking, prompts, the stage hand-off and
decoding agree.

The SRT stages stop the curriculum with exit code 3 when the model did not learn to copy the
prompt's target tag (``stage.min_tag_accuracy``, set for the tiny preset in ``mcat_ds.presets``),
so a bad run says so after its ``srt`` stage instead of after decoding.
"""

from __future__ import annotations

import csv
import datetime
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from mcat_ds.checkpoint import read_checkpoint_metadata
from mcat_ds.curriculum import stage_names
from mcat_ds.data.demo import build_demo_data
from mcat_ds.eval.evaluate import run_evaluate_command
from mcat_ds.infer.outputs import part_paths
from mcat_ds.infer.translate_command import TranslateJob, run_translate_job
from mcat_ds.presets import get_preset
from mcat_ds.train.distributed import free_port
from mcat_ds.train.monitor import METRICS_FILE
from mcat_ds.train.run import DEMO_DATA_DIR
from mcat_ds.train.stage import GATE_FAILED_EXIT_CODE, stage_paths

REPORT_FILE = "report.json"
SEED_FILE = "demo-seed.json"
DEFAULT_SEED = 0
SPLITS = {"train": ("decoded.jsonl", "evaluation"), "dev": ("decoded-dev.jsonl", "evaluation-dev")}
"""Split -> (the translate output, the evaluate directory) inside the run directory."""
MAX_NEW_TOKENS = 96
"""The longest demo target (transcript, tags, translation) is ~60 tokens."""
DECODE_THREADS = 2
"""Math threads while decoding: fixed, like the training ranks', so outputs do not depend on the host."""


def launch_curriculum(run_dir: Path, ranks: int, extra: list[str]) -> int:
    launcher = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
    command = [launcher, "--num_gpus", str(ranks), "--master_port", str(free_port()), "--module", "mcat_ds.train.run",
               "--stage", "all", "--preset", "tiny", "--run-dir", str(run_dir), *extra]
    return subprocess.run(command, check=False).returncode


def _check_seed(run_dir: Path, seed: int) -> None:
    """A run directory holds one seed's stages: another seed there would skip them as complete."""
    path = run_dir / SEED_FILE
    if path.is_file():
        recorded = json.loads(path.read_text())["seed"]
        if recorded != seed:
            raise ValueError(f"{run_dir} holds a demo trained with --seed {recorded}; give --seed {recorded} to "
                             f"continue it, or another --run-dir for seed {seed}")
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"seed": seed}) + "\n")


def read_stage_records(run_dir: Path, stage: str) -> list[dict]:
    path = stage_paths(run_dir, stage).root / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def stage_summary(run_dir: Path) -> dict:
    """Per stage: steps, final training loss, and the last validation figures."""
    summary = {}
    for stage in stage_names(get_preset("tiny")):
        records = read_stage_records(run_dir, stage)
        if not records:
            continue
        validated = [r for r in records if "val_loss" in r]
        entry = {"steps": records[-1]["step"], "final_loss": records[-1]["loss"],
                 "val_loss": validated[-1]["val_loss"] if validated else None}
        for key in ("val_tag_accuracy", "val_first_token_accuracy"):
            if validated and key in validated[-1]:
                entry[key] = validated[-1][key]
        summary[stage] = entry
    return summary


def decode_and_score(checkpoint: Path, data: Path, run_dir: Path, split: str) -> dict:
    """``mcat translate`` of every utterance into every target it has, then ``mcat evaluate``."""
    decoded_name, evaluation_name = SPLITS[split]
    decoded, evaluation = run_dir / decoded_name, run_dir / evaluation_name
    for stale in (decoded, decoded.with_name(decoded.name + ".summary.json"), *part_paths(decoded)):
        stale.unlink(missing_ok=True)  # decode again: a rerun checks the decoder as it is now
    job = TranslateJob(checkpoint=str(checkpoint), data=str(data), out=str(decoded), task="srt",
                       max_new_tokens=MAX_NEW_TOKENS)
    print(f"{split}: mcat translate {job}", flush=True)
    run_translate_job(job)
    print(f"{split}: mcat evaluate --hyps {decoded} --out {evaluation}", flush=True)
    run_evaluate_command(decoded, evaluation)
    return exact_match_scores(decoded) | {"evaluation": _evaluation_summary(evaluation)}


def exact_match_scores(decoded: Path) -> dict:
    records = [json.loads(line) for line in decoded.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not records:
        raise RuntimeError(f"{decoded} holds no outputs")
    transcripts = [r["hyp_transcript"] == r["src_ref"] for r in records]
    translations = [r["hyp"] == r["ref"] for r in records]
    count = len(records)
    return {
        "srt_exact_match": sum(a and b for a, b in zip(transcripts, translations)) / count,
        "transcript_exact_match": sum(transcripts) / count,
        "translation_exact_match": sum(translations) / count,
        "well_formed": sum(bool(r["well_formed"]) for r in records) / count,
        "n_requests": count,
        "n_utterances": len({r["id"].split(":")[0] for r in records}),
        "directions": len({(r["src"], r["tgt"]) for r in records}),
    }


def _evaluation_summary(directory: Path) -> dict:
    with open(directory / "directions.csv", encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    chrf = [float(row["chrf"]) for row in rows if row["chrf"]]
    return {"directory": str(directory), "directions": len(rows),
            "mean_chrf": round(sum(chrf) / len(chrf), 2) if chrf else None}


def _training_record(run_dir: Path) -> dict:
    """Where the training ranks ran and which code they ran: from the newest checkpoint written."""
    newest = None
    for stage in stage_names(get_preset("tiny")):
        paths = stage_paths(run_dir, stage)
        if paths.complete:
            newest = read_checkpoint_metadata(paths.final)
        else:
            saved = sorted(paths.checkpoints.glob("step-*/state.json"))
            if saved:
                newest = json.loads(saved[-1].read_text())
            break
    newest = newest or {}
    return {"environment": newest.get("environment"), "code_version": newest.get("code_version"),
            "date": datetime.date.today().isoformat()}


def _write_report(run_dir: Path, report: dict) -> None:
    (run_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")


def _gate_message(run_dir: Path) -> str:
    for stage in stage_names(get_preset("tiny")):
        if not stage_paths(run_dir, stage).complete:
            validated = [r for r in read_stage_records(run_dir, stage) if "val_tag_accuracy" in r]
            shown = f"{validated[-1]['val_tag_accuracy']:.1%}" if validated else "unmeasured"
            return (f"stage {stage} ended with target-tag accuracy {shown} on the dev split, below its gate "
                    f"(stage.min_tag_accuracy): the model does not copy the prompt's target language. "
                    f"See {stage_paths(run_dir, stage).root / METRICS_FILE}")
    return "a stage missed its gate"


SEED_COLUMNS = (
    "date", "commit", "seed", "outcome", "srt_exact_match", "transcript_exact_match", "translation_exact_match",
    "dev_srt_exact_match", "srt_tag_accuracy", "seconds_total", "seconds_training", "python", "torch", "transformers",
    "peft", "deepspeed", "numpy", "cpu", "isa", "threads_per_rank", "world_size",
)
"""benchmarks/demo_seeds.csv: one measured ``mcat demo`` run per row, and where it ran."""


def seed_row(report: dict) -> dict:
    environment = report.get("environment") or {}
    packages, cpu = environment.get("packages", {}), environment.get("cpu", {})
    version = report.get("code_version") or {}
    commit = version.get("git_commit", "unknown")[:12] + ("-dirty" if version.get("git_dirty") else "")
    complete = report.get("outcome") == "complete"

    def rate(value) -> str:
        return f"{value:.4f}" if complete else ""

    return {
        "date": report.get("date", ""), "commit": commit, "seed": report["seed"], "outcome": report.get("outcome", ""),
        "srt_exact_match": rate(report.get("srt_exact_match")),
        "transcript_exact_match": rate(report.get("transcript_exact_match")),
        "translation_exact_match": rate(report.get("translation_exact_match")),
        "dev_srt_exact_match": rate(report.get("dev", {}).get("srt_exact_match")),
        "srt_tag_accuracy": report["stages"].get("srt", {}).get("val_tag_accuracy", ""),
        "seconds_total": report["seconds"].get("total", ""), "seconds_training": report["seconds"]["training"],
        "python": environment.get("python", ""),
        **{name: packages.get(name, "") for name in ("torch", "transformers", "peft", "deepspeed", "numpy")},
        "cpu": cpu.get("model", ""), "isa": cpu.get("torch_cpu_capability", ""),
        "threads_per_rank": environment.get("threads_per_rank", ""), "world_size": environment.get("world_size", ""),
    }


def append_seed_rows(path: str | Path, reports: list[dict]) -> None:
    path = Path(path)
    new = not path.exists()
    with open(path, "a", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=SEED_COLUMNS)
        if new:
            writer.writeheader()
        for report in reports:
            writer.writerow(seed_row(report))


def run_demo(run_dir: str | Path, ranks: int | None = None, extra: list[str] | None = None,
             seed: int = DEFAULT_SEED) -> int:
    import torch

    run_dir = Path(run_dir)
    started = time.perf_counter()
    _check_seed(run_dir, seed)
    (run_dir / REPORT_FILE).unlink(missing_ok=True)  # a report always describes the latest attempt
    shards = build_demo_data(run_dir / DEMO_DATA_DIR)
    ranks = ranks or (min(2, torch.cuda.device_count()) if torch.cuda.is_available() else 2)
    prepared = time.perf_counter()
    seeds = ["--set", f"runtime.seed={seed}", "--set", f"data.seed={seed}"]
    code = launch_curriculum(run_dir, ranks, seeds + list(extra or []))
    if code == GATE_FAILED_EXIT_CODE:
        message = _gate_message(run_dir)
        print(f"mcat demo: {message}", file=sys.stderr)
        _write_report(run_dir, {"outcome": f"stopped: {message}", "seed": seed, "stages": stage_summary(run_dir),
                                **_training_record(run_dir),
                                "seconds": {"data": round(prepared - started, 1),
                                            "training": round(time.perf_counter() - prepared, 1)}})
        return code
    if code != 0:
        print(f"mcat demo: training stopped with exit code {code}; run the same command again to resume",
              file=sys.stderr)
        return code
    trained = time.perf_counter()
    final = stage_paths(run_dir, stage_names(get_preset("tiny"))[-1]).final
    torch.set_num_threads(DECODE_THREADS)
    train_scores = decode_and_score(final, shards / "train", run_dir, "train")
    dev_scores = decode_and_score(final, shards / "dev", run_dir, "dev")
    finished = time.perf_counter()
    report = {
        "outcome": "complete",
        **train_scores,
        "dev": dev_scores,
        "seed": seed,
        "checkpoint": str(final),
        "stages": stage_summary(run_dir),
        "ranks": ranks,
        "decode_threads": DECODE_THREADS,
        **_training_record(run_dir),
        "seconds": {"data": round(prepared - started, 1), "training": round(trained - prepared, 1),
                    "decoding": round(finished - trained, 1), "total": round(finished - started, 1)},
    }
    _write_report(run_dir, report)
    print(f"SRT exact match {train_scores['srt_exact_match']:.1%} on {train_scores['n_requests']} requests "
          f"({train_scores['n_utterances']} training utterances x their 8 targets; transcript "
          f"{train_scores['transcript_exact_match']:.1%}, translation {train_scores['translation_exact_match']:.1%}); "
          f"dev voice {dev_scores['srt_exact_match']:.1%}; {report['seconds']['total']:.0f} s; "
          f"report in {run_dir / REPORT_FILE}")
    return 0

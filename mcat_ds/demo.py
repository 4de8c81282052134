"""``mcat demo``: the whole curriculum on the built-in demo corpus with the tiny preset, on CPU.

It synthesizes the corpus, writes the tiny random base checkpoints, starts the DeepSpeed launcher
with two ranks for every curriculum stage, then decodes every training utterance with the final
model (SRT, a target language per utterance in turn) and writes ``report.json``. The tiny model
overfits its data; exact transcripts and translations for nearly all utterances show that labels,
masking, prompts, the stage hand-off and decoding agree.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from mcat_ds.checkpoint import load_checkpoint
from mcat_ds.curriculum import stage_names
from mcat_ds.data.audio import FeatureWindow
from mcat_ds.data.demo import build_demo_data
from mcat_ds.data.loader import Collator, ExampleDataset, make_loader
from mcat_ds.data.plan import PlannedExample
from mcat_ds.data.shards import ShardReader, load_index
from mcat_ds.evaluate import evaluate
from mcat_ds.model import GenerationOptions
from mcat_ds.presets import get_preset
from mcat_ds.prompts import split_srt_output
from mcat_ds.train.distributed import free_port
from mcat_ds.train.monitor import METRICS_FILE
from mcat_ds.train.run import DEMO_DATA_DIR
from mcat_ds.train.stage import stage_paths

REPORT_FILE = "report.json"
DECODED_FILE = "decoded.jsonl"
EVALUATION_DIR = "evaluation"


def launch_curriculum(run_dir: Path, ranks: int, extra: list[str]) -> int:
    launcher = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
    command = [launcher, "--num_gpus", str(ranks), "--master_port", str(free_port()), "--module", "mcat_ds.train.run",
               "--stage", "all", "--preset", "tiny", "--run-dir", str(run_dir), *extra]
    return subprocess.run(command, check=False).returncode


def srt_targets(entries) -> list[PlannedExample]:
    """One SRT example per utterance, its target language going round the others in turn."""
    examples = []
    for position, entry in enumerate(entries):
        targets = sorted(entry.translations)
        if targets:
            examples.append(PlannedExample(position, "srt", entry.language, targets[position % len(targets)]))
    return examples


@torch.no_grad()
def decode_srt(checkpoint: Path, data_dir: Path, out: Path, batch_size: int = 64) -> dict:
    model, tokenizer, _ = load_checkpoint(checkpoint)
    model.eval()
    entries = load_index(data_dir)
    examples = srt_targets(entries)
    window = FeatureWindow(model.encoder.num_mel_bins, model.encoder.window_frames)
    dataset = ExampleDataset(data_dir, entries, examples, tokenizer.hf, window, with_targets=False)
    collator = Collator(window, model.num_speech_tokens, tokenizer.hf.pad_token_id, features_in_workers=True,
                        padding_side="left")
    reader = ShardReader(data_dir)
    exact = transcripts = translations = well_formed = 0
    with open(out, "w", encoding="utf-8") as decoded:
        for batch in make_loader(dataset, collator, batch_size, 0, 0):
            outputs = model.generate(batch.features, batch.feature_lengths, batch.llm,
                                     GenerationOptions(num_beams=1, max_new_tokens=96))
            for key, example, ids in zip(batch.keys, batch.examples, outputs):
                entry = entries[example.entry]
                meta = json.loads(reader.read(entry.shard, entry.meta))
                text = tokenizer.hf.decode(ids, skip_special_tokens=True)
                parts = split_srt_output(text, example.src, example.tgt)
                reference = meta["translations"][example.tgt]
                ok_transcript = parts.transcript == meta["transcript"]
                ok_translation = parts.translation == reference
                transcripts += ok_transcript
                translations += ok_translation
                exact += ok_transcript and ok_translation
                well_formed += parts.well_formed
                decoded.write(json.dumps({
                    "id": key, "src": example.src, "tgt": example.tgt, "hyp": parts.translation,
                    "hyp_transcript": parts.transcript, "ref": reference, "src_ref": meta["transcript"],
                    "output": text, "exact": ok_transcript and ok_translation,
                }, ensure_ascii=False) + "\n")
    count = len(examples)
    return {
        "srt_exact_match": exact / count,
        "n_utterances": count,
        "transcript_exact_match": transcripts / count,
        "translation_exact_match": translations / count,
        "well_formed": well_formed / count,
    }


def stage_summary(run_dir: Path) -> dict:
    summary = {}
    for stage in stage_names(get_preset("tiny")):
        path = stage_paths(run_dir, stage).root / METRICS_FILE
        if path.is_file():
            records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            validated = [r["val_loss"] for r in records if "val_loss" in r]
            summary[stage] = {"steps": records[-1]["step"], "final_loss": records[-1]["loss"],
                              "val_loss": validated[-1] if validated else None}
    return summary


def run_demo(run_dir: str | Path, ranks: int | None = None, extra: list[str] | None = None) -> int:
    run_dir = Path(run_dir)
    started = time.perf_counter()
    shards = build_demo_data(run_dir / DEMO_DATA_DIR)
    ranks = ranks or (min(2, torch.cuda.device_count()) if torch.cuda.is_available() else 2)
    prepared = time.perf_counter()
    code = launch_curriculum(run_dir, ranks, extra or [])
    if code != 0:
        print(f"mcat demo: training stopped with exit code {code}; run the same command again to resume",
              file=sys.stderr)
        return code
    trained = time.perf_counter()
    final = stage_paths(run_dir, stage_names(get_preset("tiny"))[-1]).final
    scores = decode_srt(final, shards / "train", run_dir / DECODED_FILE)
    # the same scorer users run on mcat translate outputs: per-direction chrF++ and WER, tables, heat map
    directions = evaluate(run_dir / DECODED_FILE, run_dir / EVALUATION_DIR)
    finished = time.perf_counter()
    report = {
        **scores,
        "evaluation": {"directory": str(run_dir / EVALUATION_DIR), "directions": len(directions),
                       "mean_chrf": round(sum(d.chrf for d in directions) / len(directions), 2)},
        "checkpoint": str(final),
        "stages": stage_summary(run_dir),
        "ranks": ranks,
        "seconds": {"data": round(prepared - started, 1), "training": round(trained - prepared, 1),
                    "decoding": round(finished - trained, 1), "total": round(finished - started, 1)},
    }
    (run_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    print(f"SRT exact match {scores['srt_exact_match']:.1%} on {scores['n_utterances']} training utterances "
          f"(transcript {scores['transcript_exact_match']:.1%}, translation {scores['translation_exact_match']:.1%}); "
          f"{report['seconds']['total']:.0f} s; report in {run_dir / REPORT_FILE}")
    return 0

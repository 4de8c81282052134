"""Long recordings: the real-time factor of ``mcat translate-audio`` with every chunk of every
recording in one batched pass, beside decoding one window at a time (whisper's way), in the same run.

The recordings are English demo sentences spoken by espeak-ng, joined with seeded pauses of 0.2 to
1.6 s (a third of them shorter than the 0.5 s min-silence, so chunks hold one to several sentences):
one 10-minute recording, and ten 1-minute ones. Both ways run the same command on the same files
into --to deu,fra, end to end (model load, voice activity, decoding, subtitle files):

- batched: ``--batch 50`` (the default), chunks longest first, 32 encoded at a time, 50 requests per
  decoder call;
- one window at a time: ``--batch 1``, each chunk encoded alone and each of its requests decoded
  alone, in the order of the planner.

The model is the tiny preset with random weights (``mcat_ds.tiny.write_random_checkpoint``), which
seldom stops before ``--max-new-tokens``: the default of 24 is about what a 3-second sentence's
translation takes. Rows (benchmarks/longform.csv, the harness's columns): the real-time factor
(audio seconds / wall seconds) of each way per input, the ratio batched / one window at a time.
"""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

import numpy as np

from mcat_ds.bench.harness import Row, benchmark_parser, csv_target, report

CSV_NAME = "longform.csv"
TARGETS = ("deu", "fra")
PAUSE_RANGE = (0.2, 1.6)
WAYS = {"batched": None, "one window at a time": 1}
"""Implementation -> --batch (None: the command's default)."""


def write_recordings(root: Path, lengths: list[float], seed: int = 0) -> list[Path]:
    """Recordings of about ``lengths`` seconds each (22.05 kHz WAV, as espeak-ng speaks) in ``root``."""
    import soundfile

    from mcat_ds.data.demo import VOICES, demo_sentences, speak

    clips_dir = root / "clips"
    clips_dir.mkdir(parents=True, exist_ok=True)
    texts = [sentence.texts["eng"] for sentence in demo_sentences()]
    jobs = [(VOICES["eng"], text, clips_dir / f"{index}.wav") for index, text in enumerate(texts)]
    speak(jobs, threads=2)
    clips, rate = [], 0
    for _, _, path in jobs:
        samples, rate = soundfile.read(path, dtype="float32")
        loud = np.flatnonzero(np.abs(samples) > 1e-3)
        clips.append(samples[loud[0]:loud[-1] + 1])
    rng = random.Random(seed)
    paths = []
    for number, length in enumerate(lengths):
        pieces, total = [], 0
        while total < length * rate:
            pause = np.zeros(round(rng.uniform(*PAUSE_RANGE) * rate), np.float32)
            pieces += [pause, rng.choice(clips)]
            total += pause.size + pieces[-1].size
        path = root / f"talk{number:02d}.wav"
        soundfile.write(path, np.concatenate(pieces + [np.zeros(rate // 2, np.float32)]), rate, subtype="PCM_16")
        paths.append(path)
    return paths


def run_way(checkpoint: Path, audio: list[Path], out: Path, batch: int | None, max_new_tokens: int) -> dict:
    """One end-to-end run of the command; its summary.json."""
    from mcat_ds.infer.translate_audio import TranslateAudioOptions, run_translate_audio

    options = TranslateAudioOptions(checkpoint=str(checkpoint), source="eng", out=str(out),
                                    audio=tuple(map(str, audio)), to=TARGETS, batch=batch,
                                    max_new_tokens=max_new_tokens, device="cpu")
    run_translate_audio(options)
    return json.loads((out / "summary.json").read_text(encoding="utf-8"))


def bench_longform(work: Path, inputs: dict[str, list[float]], max_new_tokens: int) -> list[Row]:
    from mcat_ds.tiny import write_random_checkpoint

    checkpoint = write_random_checkpoint(work / "model")
    rows = []
    warm_up = write_recordings(work / "warm-up", [15.0], seed=99)
    run_way(checkpoint, warm_up, work / "warm-up" / "out", None, max_new_tokens)  # first imports and model load
    for name, lengths in inputs.items():
        audio = write_recordings(work / name, lengths)
        factors = {}
        for way, batch in WAYS.items():
            summary = run_way(checkpoint, audio, work / name / way.replace(" ", "-"), batch, max_new_tokens)
            factors[way] = summary["real_time_factor"]
            shape = (f"{name}: {summary['audio_seconds']:.0f} s of audio, {summary['segments']} segments, "
                     f"eng->{','.join(TARGETS)}, tiny preset, max_new_tokens {max_new_tokens}")
            rows.append(Row("longform", shape, way, "real_time_factor", summary["real_time_factor"]))
        rows[-2] = Row(**{**rows[-2].__dict__, "ratio": factors["batched"] / factors["one window at a time"]})
        rows[-1] = Row(**{**rows[-1].__dict__, "ratio": 1.0})
    return rows


def main(argv: list[str] | None = None, description: str | None = None) -> None:
    parser = benchmark_parser(description, CSV_NAME)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--work-dir", type=Path, help="keep the recordings and outputs here (default: a temp dir)")
    args = parser.parse_args(argv)
    inputs = ({"one 30 s recording": [30.0]} if args.smoke
              else {"one 10-min recording": [600.0], "ten 1-min recordings": [60.0] * 10})
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work_dir or Path(scratch)
        rows = bench_longform(work, inputs, 4 if args.smoke else args.max_new_tokens)
    report(rows, csv_target(args, CSV_NAME))

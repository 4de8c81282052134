"""How fast the data path feeds a GPU: shard reads, decoding, log-mel features, the full loader.

Every rate is samples/s, measured in one run side by side with the baseline the release uses per
sample (decode, then ``WhisperFeatureExtractor``). The target: the loader with 4 workers feeding one
GPU delivers at least 3x what a ``small-9b`` training step consumes (~30 samples/s per GPU).
"""

from __future__ import annotations

import itertools
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import WhisperFeatureExtractor

from mcat_ds.bench.harness import Row, append_rows, benchmark_parser, csv_target, rate
from mcat_ds.build import add_language_tags
from mcat_ds.data.audio import FeatureWindow, LogMelSpectrogram, decode_audio, pad_waveforms
from mcat_ds.data.loader import Collator, ExampleDataset, make_loader
from mcat_ds.data.plan import ExampleSelection, plan_epoch
from mcat_ds.data.demo import demo_sentences
from mcat_ds.data.shards import ShardReader, load_index
from mcat_ds.tiny import train_tokenizer

FLEURS_LIKE_SECONDS = (3.0, 25.0)
SMALL_9B_STEP_SAMPLES_PER_S = 30.0
"""What one GPU's small-9b training step consumes (naive path, one H100)."""


@dataclass(frozen=True)
class DataBenchConfig:
    data: Path
    workload: str
    """What the shards hold, for the CSV's shape column (e.g. "FLEURS-like 3-25 s")."""
    tokenizer: object
    window: FeatureWindow = FeatureWindow(128, 3000)
    workers: int = 4
    batch_size: int = 8
    min_seconds: float = 3.0


def write_fleurs_like_shards(out: Path, count: int = 200, seed: int = 0,
                             seconds_range: tuple[float, float] = FLEURS_LIKE_SECONDS) -> Path:
    """Noise utterances with FLEURS-like lengths (uniform 3-25 s by default), prepared like real data."""
    from mcat_ds.data.prepare import prepare_shards
    from mcat_ds.data.sources import Utterance
    from mcat_ds.optional import require

    soundfile = require("soundfile")

    rng = np.random.default_rng(seed)
    audio = out / "audio"
    audio.mkdir(parents=True, exist_ok=True)
    records = []
    for index in range(count):
        seconds = rng.uniform(*seconds_range)
        path = audio / f"{index}.wav"
        soundfile.write(path, (0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32), 16000)
        records.append(Utterance(key=f"eng_{index}", audio=path, language="eng", transcript=f"utterance {index}",
                                 translations={"deu": f"Äußerung {index}"}))
    prepare_shards(records, out / "shards", max_seconds=30.0)
    return out / "shards"


def run_data_benchmark(config: DataBenchConfig) -> list[Row]:
    entries = load_index(config.data)
    languages = tuple(sorted({entry.language for entry in entries}))
    plan = plan_epoch(entries, ExampleSelection("asr", languages), seed=0, epoch=0)
    reader = ShardReader(config.data)
    cycle = itertools.cycle(entries)
    log_mel = LogMelSpectrogram(config.window)
    extractor = WhisperFeatureExtractor(feature_size=config.window.num_mel_bins,
                                        chunk_length=round(config.window.seconds))
    shape = f"{config.workload}, {config.window.num_mel_bins} mels x {config.window.seconds:g} s window"

    def read() -> int:
        entry = next(cycle)
        reader.read(entry.shard, entry.audio)
        json.loads(reader.read(entry.shard, entry.meta))
        return 1

    def read_decode() -> int:
        entry = next(cycle)
        decode_audio(reader.read(entry.shard, entry.audio))
        return 1

    def read_decode_features() -> int:
        entry = next(cycle)
        samples = decode_audio(reader.read(entry.shard, entry.audio))
        log_mel(*pad_waveforms([samples], config.window))
        return 1

    def read_decode_hf_extractor() -> int:
        entry = next(cycle)
        samples = decode_audio(reader.read(entry.shard, entry.audio))
        extractor(samples, sampling_rate=16000, return_tensors="np")
        return 1

    def loader_rate(features_in_workers: bool, device: str) -> float:
        dataset = ExampleDataset(config.data, entries, plan * 50, config.tokenizer, config.window)
        collator = Collator(config.window, 30, config.tokenizer.pad_token_id, features_in_workers)
        loader = iter(make_loader(dataset, collator, config.batch_size, 0, config.workers))
        device_log_mel = LogMelSpectrogram(config.window).to(device)

        def batches() -> int:
            batch = next(loader)
            batch.speech_features(device_log_mel, device)
            if device == "cuda":
                torch.cuda.synchronize()
            return len(batch.keys)

        return rate(batches, config.min_seconds)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one worker's view: a single core
    baseline = rate(read_decode_hf_extractor, config.min_seconds)
    measured = [
        ("read shard bytes", rate(read, config.min_seconds)),
        ("read + decode", rate(read_decode, config.min_seconds)),
        ("read + decode + WhisperFeatureExtractor (baseline)", baseline),
        ("read + decode + LogMelSpectrogram", rate(read_decode_features, config.min_seconds)),
    ]
    torch.set_num_threads(threads)
    measured.append((f"DataLoader {config.workers} workers, features in workers", loader_rate(True, "cpu")))
    if torch.cuda.is_available():
        measured.append((f"DataLoader {config.workers} workers, features on GPU", loader_rate(False, "cuda")))
    rows = [Row("data", f"{shape}, 1 process" if "DataLoader" not in name else f"{shape}, batch {config.batch_size}",
                name, "samples_per_s", value, value / baseline) for name, value in measured]
    rows += [Row("data", shape, f"{name} vs small-9b step", "x_step_consumption", value / SMALL_9B_STEP_SAMPLES_PER_S)
             for name, value in measured if "DataLoader" in name]
    return rows


def summarize(rows: list[Row]) -> str:
    lines = []
    for row in rows:
        ratio = "" if row.ratio is None else f"  ({row.ratio:.2f}x baseline)"
        lines.append(f"{row.implementation:<60} {row.value:10.1f} {row.metric}{ratio}")
    return "\n".join(lines)



# ---------------------------------------------------------------- the script


def main(argv: list[str] | None = None, description: str | None = None) -> None:
    parser = benchmark_parser(description, "data.csv")
    parser.add_argument("--data", help="prepared shards (default: 200 noise utterances of FLEURS-like lengths)")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: a small BPE of the demo corpus)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=3.0, help="measuring time per implementation")
    args = parser.parse_args(argv)

    scratch = Path(tempfile.mkdtemp(prefix="bench_data_"))
    data = Path(args.data) if args.data else write_fleurs_like_shards(scratch, count=20 if args.smoke else 200)
    if args.tokenizer:
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        tokenizer = train_tokenizer([t for s in demo_sentences() for t in s.texts.values()], 2000)
    add_language_tags(tokenizer)
    config = DataBenchConfig(
        data=data,
        workload=f"shards {data}" if args.data else "FLEURS-like 3-25 s",
        tokenizer=tokenizer,
        window=FeatureWindow(80, 500) if args.smoke else FeatureWindow(128, 3000),
        workers=1 if args.smoke else args.workers,
        batch_size=2 if args.smoke else args.batch_size,
        min_seconds=0.2 if args.smoke else args.seconds,
    )
    rows = run_data_benchmark(config)
    print(summarize(rows))
    csv_path = csv_target(args, "data.csv")
    if csv_path:
        append_rows(csv_path, rows)
        print(f"appended {len(rows)} rows to {csv_path}")

"""Data-path microbenchmark: samples/s of shard reading, decoding, features and the full loader.

    python launch/bench_data.py                      # FLEURS-like lengths (3-25 s), 128 mels x 30 s, 4 workers
    python launch/bench_data.py --data SHARDS --tokenizer /models/GemmaX2-28-9B-v0.1
    python launch/bench_data.py --smoke              # seconds; what the test suite runs

Rows are appended to benchmarks/data.csv (device, date, commit, shape, implementation, value, ratio).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import transformers

from mcat_ds.benchmarking import append_rows
from mcat_ds.build import add_language_tags
from mcat_ds.data.audio import FeatureWindow
from mcat_ds.data.benchmark import DataBenchConfig, run_data_benchmark, summarize, write_fleurs_like_shards
from mcat_ds.data.demo import demo_sentences
from mcat_ds.tiny import train_tokenizer

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="prepared shards (default: 200 noise utterances of FLEURS-like lengths)")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: a small BPE of the demo corpus)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=3.0, help="measuring time per implementation")
    parser.add_argument("--csv", default=str(REPO / "benchmarks" / "data.csv"))
    parser.add_argument("--smoke", action="store_true", help="tiny settings, no CSV row: a check that it runs")
    args = parser.parse_args()

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
    if not args.smoke:
        append_rows(args.csv, rows)
        print(f"appended {len(rows)} rows to {args.csv}")


if __name__ == "__main__":
    main()

"""Batch-inference benchmark: HF generate as the release runs it vs mcat translate's path, one run.

    python launch/bench_inference.py                       # GPU: small-9b random weights, bf16, 1,000 utterances
    python launch/bench_inference.py --targets 5           # 200 utterances x 5 directions: encoder once vs 5 times
    python launch/bench_inference.py --preset tiny --device cpu --utterances 200
    python launch/bench_inference.py --smoke               # seconds on CPU; what the test suite runs

Rows (device, date, commit, shape, implementation, metric, value, ratio) are appended to
benchmarks/inference.csv (none with --smoke unless --csv is given).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from mcat_ds.benchmarking import report
from mcat_ds.inference_benchmark import InferenceBenchConfig, bench_inference

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--preset", default="small-9b" if cuda else "tiny")
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16" if cuda else "fp32")
    parser.add_argument("--utterances", type=int, default=1000)
    parser.add_argument("--targets", type=int, default=1, help="directions per utterance")
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--csv", help="default: benchmarks/inference.csv (none with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="tiny preset, 12 utterances x 3 targets, 6 tokens")
    args = parser.parse_args(argv)
    config = InferenceBenchConfig(
        preset="tiny" if args.smoke else args.preset, device="cpu" if args.smoke else args.device,
        dtype=torch.float32 if args.smoke or args.dtype == "fp32" else torch.bfloat16,
        utterances=12 if args.smoke else args.utterances, targets_per_utterance=3 if args.smoke else args.targets,
        batch=8 if args.smoke else args.batch, max_new_tokens=6 if args.smoke else args.max_new_tokens)
    rows = bench_inference(config)
    report(rows, args.csv or (None if args.smoke else str(REPO / "benchmarks" / "inference.csv")))


if __name__ == "__main__":
    main()

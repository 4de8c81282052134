"""Training-throughput benchmark: the naive path vs ours, same model and batches, one run.

    python launch/bench_train.py                          # GPU: small-9b sizes, random weights, bf16, batch 8
    python launch/bench_train.py --preset large-27b --llm-layers 8 --per-layer   # 27B, per layer, extrapolated
    python launch/bench_train.py --checkpointing selective,full   # plus ours under activation checkpointing
    python launch/bench_train.py --device cpu --preset tiny           # CPU figures
    python launch/bench_train.py --device cpu --preset small-9b --llm-layers 2 --encoder-layers 2  # mid-size on CPU
    python launch/bench_train.py --smoke                  # seconds; what the test suite runs

Rows (device, date, commit, shape, implementation, metric, value, ratio) are appended to
benchmarks/train.csv (none with --smoke unless --csv is given).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from mcat_ds.benchmarking import report
from mcat_ds.train_benchmark import TrainBenchConfig, bench_training

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--preset", default="small-9b" if cuda else "tiny")
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16" if cuda else "fp32")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--llm-layers", type=int, help="only the LLM's first N layers")
    parser.add_argument("--encoder-layers", type=int, help="only the encoder's first N layers")
    parser.add_argument("--checkpointing", default="",
                        help="comma-separated policies (selective, full): extra variants of ours")
    parser.add_argument("--per-layer", action="store_true",
                        help="also run at half --llm-layers: per-layer time/memory, step at full depth")
    parser.add_argument("--csv", help="default: benchmarks/train.csv (none with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="tiny preset, 2 steps")
    args = parser.parse_args(argv)
    config = TrainBenchConfig(
        preset="tiny" if args.smoke else args.preset, device="cpu" if args.smoke else args.device,
        dtype=torch.float32 if args.smoke or args.dtype == "fp32" else torch.bfloat16,
        batch=4 if args.smoke else args.batch, steps=2 if args.smoke else args.steps,
        warmup_steps=1 if args.smoke else 2, llm_layers=args.llm_layers, encoder_layers=args.encoder_layers,
        checkpointing=tuple(policy for policy in args.checkpointing.split(",") if policy),
        per_layer=args.per_layer)
    rows = bench_training(config)
    report(rows, args.csv or (None if args.smoke else str(REPO / "benchmarks" / "train.csv")))


if __name__ == "__main__":
    main()

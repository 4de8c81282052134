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

import sys

from mcat_ds.optional import run_main

if __name__ == "__main__":
    sys.exit(run_main("mcat_ds.bench.train:main", description=__doc__))

"""Data-path microbenchmark: samples/s of shard reading, decoding, features and the full loader.

    python launch/bench_data.py                      # FLEURS-like lengths (3-25 s), 128 mels x 30 s, 4 workers
    python launch/bench_data.py --data SHARDS --tokenizer /models/GemmaX2-28-9B-v0.1
    python launch/bench_data.py --smoke              # seconds; what the test suite runs

Rows are appended to benchmarks/data.csv (device, date, commit, shape, implementation, value, ratio).
"""

import sys

from mcat_ds.optional import run_main

if __name__ == "__main__":
    sys.exit(run_main("mcat_ds.bench.data:main", description=__doc__))

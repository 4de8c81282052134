"""Batch-inference benchmark: HF generate as the release runs it vs mcat translate's path, one run.

    python launch/bench_inference.py                       # GPU: small-9b random weights, bf16, 1,000 utterances
    python launch/bench_inference.py --targets 5           # 200 utterances x 5 directions: encoder once vs 5 times
    python launch/bench_inference.py --preset tiny --device cpu --utterances 200
    python launch/bench_inference.py --smoke               # seconds on CPU; what the test suite runs

Rows (device, date, commit, shape, implementation, metric, value, ratio) are appended to
benchmarks/inference.csv (none with --smoke unless --csv is given).
"""

import sys

from mcat_ds.optional import run_main

if __name__ == "__main__":
    sys.exit(run_main("mcat_ds.bench.inference:main", description=__doc__))

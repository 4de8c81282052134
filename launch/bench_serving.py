"""Serving: mcat serve's audio translations at 1, 8 and 32 requests in flight vs vLLM's offline engine, one run.

    python launch/bench_serving.py                     # 256 clips x 2 targets per pass, tiny random model (2 CPU cores: ~2 min)
    python launch/bench_serving.py --concurrency 1,4,16 --max-new-tokens 48
    python launch/bench_serving.py --smoke             # seconds: 3 clips, 1 and 2 in flight; what the test suite runs

Runs where vLLM is installed, with this package installed there (the server finds the model through
its plugin entry point). Rows (device, date, commit, shape, implementation, metric, value, ratio) are
appended to benchmarks/serving.csv (none with --smoke unless --csv is given).
"""

import sys

from mcat_ds.optional import run_main

if __name__ == "__main__":
    sys.exit(run_main("mcat_ds.bench.serving:main", description=__doc__))

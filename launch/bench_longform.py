"""Long recordings: mcat translate-audio with every chunk batched vs one window at a time, one run.

    python launch/bench_longform.py                      # a 10-min recording and ten 1-min ones (2 CPU cores: ~4.5 min)
    python launch/bench_longform.py --max-new-tokens 48  # longer outputs
    python launch/bench_longform.py --smoke              # seconds: one 30 s recording; what the test suite runs

Rows (device, date, commit, shape, implementation, metric, value, ratio) are appended to
benchmarks/longform.csv (none with --smoke unless --csv is given).
"""

import sys

from mcat_ds.optional import run_main

if __name__ == "__main__":
    sys.exit(run_main("mcat_ds.bench.longform:main", description=__doc__))

"""Kill campaigns: training, translate, prepare and evaluate SIGKILLed at seeded random moments and rerun
until they complete; what they leave is compared with an uninterrupted run's.

    python launch/bench_faults.py                       # 60 kills over the four commands (2 CPU cores: ~8 min)
    python launch/bench_faults.py --kills 100 --seed 1  # more, elsewhere
    python launch/bench_faults.py --comet-model DIR     # evaluate with COMET as well
    python launch/bench_faults.py --smoke               # a minute: translate, prepare, evaluate, one kill each

A row per command (device, date, commit, command, seed, kills attempted and landed, restarts, runs
recovered, identical yes/no, seconds) is appended to benchmarks/faults.csv (none with --smoke unless
--csv is given).
"""

import sys

from mcat_ds.optional import run_main

if __name__ == "__main__":
    sys.exit(run_main("mcat_ds.bench.faults:main", description=__doc__))

"""The main job over several seeds: how reliably `mcat demo` lands, and where it ran.

    python launch/bench_demo.py --seeds 0,1,2,3,4          # one demo per seed, in runs/demo-seeds/seed-N
    python launch/bench_demo.py --reports runs/*/report.json  # rows for demos that already ran

Each run appends a row to benchmarks/demo_seeds.csv: date, commit, seed, exact-match rates (training
split, dev voice), the srt stage's target-tag accuracy, seconds, package versions, CPU, threads.
"""

import sys

from mcat_ds.optional import run_main

if __name__ == "__main__":
    sys.exit(run_main("mcat_ds.bench.demo:main", description=__doc__))

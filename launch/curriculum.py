"""Run every curriculum stage in order, skipping completed ones:
`deepspeed launch/curriculum.py --run-dir runs/x --preset small-9b [launch/train.py options]`."""

import sys

from mcat_ds.optional import run_main

if __name__ == "__main__":
    sys.exit(run_main("mcat_ds.train.run:main", ["--stage", "all", *sys.argv[1:]]))

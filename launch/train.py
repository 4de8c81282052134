"""Train MCAT curriculum stages: `deepspeed launch/train.py --stage srt --run-dir runs/x --preset small-9b`.

Everything it does lives in mcat_ds.train.run (see its docstring for the options).
"""

import sys

from mcat_ds.optional import run_main

if __name__ == "__main__":
    sys.exit(run_main("mcat_ds.train.run:main"))

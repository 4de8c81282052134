"""The main job over several seeds: how reliably `mcat demo` lands, and where it ran (rows in
benchmarks/demo_seeds.csv, written by ``mcat_ds.demo.append_seed_rows``)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from mcat_ds.bench.harness import BENCHMARKS_DIR
from mcat_ds.demo import REPORT_FILE, append_seed_rows


def main(argv: list[str] | None = None, description: str | None = None) -> int:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds (default: %(default)s)")
    parser.add_argument("--runs", default="runs/demo-seeds", help="a run directory per seed goes here")
    parser.add_argument("--reports", nargs="+", help="append rows for these report.json files instead of running")
    parser.add_argument("--csv", default=str(BENCHMARKS_DIR / "demo_seeds.csv"))
    args = parser.parse_args(argv)
    if args.reports:
        append_seed_rows(args.csv, [json.loads(Path(path).read_text()) for path in args.reports])
        print(f"appended {len(args.reports)} rows to {args.csv}")
        return 0
    failed = []
    for seed in (int(text) for text in args.seeds.split(",")):
        run_dir = Path(args.runs) / f"seed-{seed}"
        code = subprocess.run([sys.executable, "-m", "mcat_ds.cli", "demo", "--seed", str(seed),
                               "--run-dir", str(run_dir)], check=False).returncode
        if code != 0:
            failed.append(seed)
            print(f"seed {seed}: mcat demo exited with {code}", file=sys.stderr)
        report = run_dir / REPORT_FILE
        if report.is_file():  # a run stopped by a stage's gate reports too: it was measured
            append_seed_rows(args.csv, [json.loads(report.read_text())])
            print(f"seed {seed}: row appended to {args.csv}")
    return 1 if failed else 0

"""Kernel microbenchmarks: the adapter's Triton kernels against the PyTorch and BLIP-2 baselines.

    python launch/bench_kernels.py                   # on a GPU: bf16, 32 x 12 heads x 150 x 1500 x 64
    python launch/bench_kernels.py --device cpu      # the PyTorch paths on CPU (fp32, smaller batches)
    TRITON_INTERPRET=1 python launch/bench_kernels.py --smoke --csv /tmp/k.csv   # seconds; the test suite

Rows (device, date, commit, shape, implementation, ms or GB/s, ratio) are appended to
benchmarks/kernels.csv and the newest run is drawn to benchmarks/kernels.png. In ``ms`` rows the
ratio is the speed-up over the case's baseline (SDPA for attention, the BLIP-2 reference for the
adapter); in ``GB_per_s`` rows it is the fraction of the device's memory roofline.
"""

import sys

from mcat_ds.optional import run_main

if __name__ == "__main__":
    sys.exit(run_main("mcat_ds.bench.kernels:main", description=__doc__))

"""Kernel microbenchmarks: the adapter's Triton kernels against the PyTorch and BLIP-2 baselines.

    python launch/bench_kernels.py                   # on a GPU: bf16, 32 x 12 heads x 150 x 1500 x 64
    python launch/bench_kernels.py --device cpu      # the PyTorch paths on CPU (fp32, smaller batches)
    TRITON_INTERPRET=1 python launch/bench_kernels.py --smoke --csv /tmp/k.csv   # seconds; the test suite

Rows (device, date, commit, shape, implementation, ms or GB/s, ratio) are appended to
benchmarks/kernels.csv and the newest run is drawn to benchmarks/kernels.png. In ``ms`` rows the
ratio is the speed-up over the case's baseline (SDPA for attention, the BLIP-2 reference for the
adapter); in ``GB_per_s`` rows it is the fraction of the device's memory roofline.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch

from mcat_ds.benchmarking import device_name, latest_run, plot_times, read_rows, report
from mcat_ds.model.benchmark import (
    KernelBenchConfig,
    bench_adapter,
    bench_cross_attention,
    padding_accounting,
    small_9b_adapter_shapes,
    smoke_config,
    timer,
)
from mcat_ds.presets import get_preset

REPO = Path(__file__).resolve().parent.parent
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--batch", type=int, help="cross-attention batch (default 32 on CUDA, 8 on CPU)")
    parser.add_argument("--adapter-batch", type=int, help="adapter batch (default 32 on CUDA, 4 on CPU)")
    parser.add_argument("--only", choices=("attention", "adapter", "accounting"), action="append",
                        help="run only these parts (repeatable)")
    parser.add_argument("--csv", help="default: benchmarks/kernels.csv (none with --smoke)")
    parser.add_argument("--plot", help="default: the CSV's name with .png")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes in seconds: a check that it runs")
    args = parser.parse_args(argv)

    cuda = args.device.startswith("cuda")
    if args.smoke:
        config = smoke_config()
        adapter_config, encoder_width, llm_width = get_preset("tiny").model.adapter, 48, 40
    else:
        config = KernelBenchConfig(device=args.device, triton=cuda,
                                   dtype=torch.bfloat16 if cuda else torch.float32,
                                   batch=32 if cuda else 8, adapter_batch=32 if cuda else 4)
        adapter_config, encoder_width, llm_width = small_9b_adapter_shapes()
    config = replace(config, **{k: v for k, v in {
        "dtype": DTYPES.get(args.dtype), "batch": args.batch, "adapter_batch": args.adapter_batch}.items() if v is not None})
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    name = device_name()
    measure = timer(config)
    parts = args.only or ["attention", "adapter", "accounting"]
    rows = []
    if "attention" in parts:
        rows += bench_cross_attention(config, measure, name)
    if "adapter" in parts:
        rows += bench_adapter(config, measure, adapter_config, encoder_width, llm_width)
    if "accounting" in parts:
        rows += padding_accounting(config, adapter_config, encoder_width, samples=100 if args.smoke else 10_000)
    csv_path = args.csv or (None if args.smoke else str(REPO / "benchmarks" / "kernels.csv"))
    report(rows, csv_path)
    if csv_path:
        plot_path = args.plot or str(Path(csv_path).with_suffix(".png"))
        plot_times(latest_run(read_rows(csv_path), name), plot_path, f"{name}, {latest_run(read_rows(csv_path), name)[-1]['date']}")
        print(f"plot: {plot_path}")


if __name__ == "__main__":
    main()

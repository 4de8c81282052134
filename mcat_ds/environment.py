"""Where a run ran: the facts that decide its floating-point results, recorded with its results.

Two runs of the same code and config give bit-identical losses when these agree. Package versions
change kernels; the CPU's instruction set decides which vectorised kernels PyTorch and oneDNN pick
(and so their rounding); the number of math threads per rank decides how reductions are split.
``report.json`` of ``mcat demo`` and every checkpoint's metadata carry this record.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

PACKAGES = ("torch", "transformers", "peft", "deepspeed", "numpy", "triton", "tokenizers", "safetensors")

ISA_FLAGS = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
    "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve", "sve2",
)
"""The /proc/cpuinfo flags that select vector kernels (x86 SIMD, AMX; Arm NEON/SVE)."""


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


@lru_cache(maxsize=1)
def cpu_description() -> dict[str, Any]:
    """CPU model, the SIMD/AMX flags it has, and the vector ISA PyTorch's kernels dispatch to."""
    model, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Model") and value.strip():
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except AttributeError:
        capability = None
    return {"model": model, "machine": platform.machine(), "cores": os.cpu_count(),
            "isa_flags": [flag for flag in ISA_FLAGS if flag in flags], "torch_cpu_capability": capability}


def describe_environment(*, world_size: int, threads_per_rank: int, seeds: dict[str, int]) -> dict[str, Any]:
    """The record stored as ``"environment"`` in reports and checkpoint metadata."""
    record: dict[str, Any] = {
        "python": platform.python_version(),
        "implementation": sys.implementation.name,
        "platform": platform.platform(),
        "packages": package_versions(),
        "cpu": cpu_description(),
        "world_size": world_size,
        "threads_per_rank": threads_per_rank,
        "seeds": dict(seeds),
    }
    if torch.cuda.is_available():
        record["gpu"] = {"name": torch.cuda.get_device_name(), "cuda": torch.version.cuda,
                         "count": torch.cuda.device_count()}
    return record

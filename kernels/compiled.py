"""What a GPU compile of the kernels gives, on any machine: Triton compiles for a CUDA target without a
GPU (its wheel carries ptxas), so the IR, the registers and the spills of every launch configuration
can be checked on a CPU. Needs Triton's compiler, not its interpreter: run with TRITON_INTERPRET unset.

    python -m mcat_kernels.compiled          # every configuration the launchers may pick, as a table
"""

from __future__ import annotations

import inspect
import re
import subprocess
import tempfile
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

SM90 = 90
"""H100/H200: the target the configurations were sized for."""


@dataclass(frozen=True)
class Compiled:
    ttir: str
    registers: int
    spill_bytes: int
    shared_bytes: int


def _signature(kernel, pointer_types: dict[str, str], float_arguments: tuple[str, ...], constexprs: dict) -> dict:
    signature = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointer_types:
            signature[name] = f"*{pointer_types[name]}"
        elif name in float_arguments:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"  # strides and sizes: what Triton specialises a Python int below 2**31 to
    return signature


def compile_kernel(kernel, pointer_types: dict[str, str], constexprs: dict, num_warps: int, num_stages: int = 3,
                   float_arguments: tuple[str, ...] = (), arch: int = SM90) -> Compiled:
    """``kernel`` (a ``@triton.jit`` function) compiled for ``sm_<arch>``: its TTIR, and the registers,
    spill stores and shared memory ptxas reports for it."""
    if not hasattr(kernel, "fn"):
        raise RuntimeError("the kernels were imported under TRITON_INTERPRET=1; compile them in a process without it")
    source = ASTSource(fn=kernel, signature=_signature(kernel, pointer_types, float_arguments, constexprs),
                       constexprs=constexprs)
    binary = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch) if "arch" in inspect.signature(get_ptxas).parameters else get_ptxas()
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(binary.asm["ptx"])
        ptx.flush()
        report = subprocess.run([ptxas.path, f"-arch=sm_{arch}a", "-v", ptx.name, "-o", "/dev/null"],
                                capture_output=True, text=True, check=True)
    info = report.stdout + report.stderr
    registers = re.search(r"Used (\d+) registers", info)
    spills = re.search(r"(\d+) bytes spill stores", info)
    return Compiled(binary.asm["ttir"], int(registers.group(1)) if registers else -1,
                    int(spills.group(1)) if spills else 0, int(binary.metadata.shared))


def launch_configurations():
    """(label, Compiled) for every launch configuration the kernels' launchers use, compiled for sm_90a."""
    from mcat_kernels import cross_attention as attention
    from mcat_kernels import layernorm_pool as pool

    pointers = lambda dtype: {**{name: dtype for name in ("Q", "K", "V", "O", "DO", "DK", "DV", "DQ")},  # noqa: E731
                              "LSE": "fp32", "DELTA": "fp32", "LENGTHS": "i32"}
    kernels = {"forward": (attention._cross_attention_forward, attention.FORWARD_LAUNCHES),
               "backward dK dV": (attention._cross_attention_backward_dkdv,
                                  {key: (launch,) for key, launch in attention.DKDV_LAUNCH.items()}),
               "backward dQ": (attention._cross_attention_backward_dq,
                               {key: (launch,) for key, launch in attention.DQ_LAUNCH.items()})}
    for name, (kernel, table) in kernels.items():
        for (fp32_dot, head_dim), launches in table.items():
            dtype = "fp32" if fp32_dot else "bf16"
            for launch in launches:
                constexprs = {"HEAD_DIM": head_dim, "BLOCK_M": launch.block_m, "BLOCK_N": launch.block_n,
                              "FP32_DOT": fp32_dot}
                yield (f"cross-attention {name} | {dtype} | {head_dim} | {launch.block_m} x {launch.block_n} | "
                       f"{launch.num_warps} | {launch.num_stages}",
                       compile_kernel(kernel, pointers(dtype), constexprs, launch.num_warps, launch.num_stages,
                                      ("scale", "scale_log2")))
    block_s, block_c = pool._blocks(5, 768)
    for name, kernel in (("forward", pool._layernorm_pool_forward), ("backward", pool._layernorm_pool_backward)):
        for dtype in ("bf16", "fp32"):
            pointer_types = {**{name: dtype for name in ("X", "R", "W", "B", "OUT", "DOUT", "DX")},
                             "MEAN": "fp32", "RSTD": "fp32", "DW_PARTIAL": "fp32", "DB_PARTIAL": "fp32"}
            yield (f"layernorm_pool {name} | {dtype} | 768 channels, stride 5 | {block_s} x {block_c} | "
                   f"{pool.NUM_WARPS} | 3",
                   compile_kernel(kernel, pointer_types, {"STRIDE": 5, "BLOCK_S": block_s, "BLOCK_C": block_c},
                                  pool.NUM_WARPS, 3, ("eps",)))


def main() -> None:
    print(f"Triton {triton.__version__}, sm_{SM90}a")
    print("| kernel | dtype | shape | block | warps | stages | registers | spill bytes | shared KiB |")
    print("| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for label, compiled in launch_configurations():
        print(f"| {label} | {compiled.registers} | {compiled.spill_bytes} | {compiled.shared_bytes / 1024:.0f} |")


if __name__ == "__main__":
    main()

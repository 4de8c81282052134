"""Microbenchmarks of the speech adapter's kernels, side by side with the baselines they replace.

Everything measured in one run on one timing harness (``triton.testing.do_bench`` on CUDA, the
median of wall-clock repetitions on CPU) so the ratios compare like with like:

- cross-attention 150 queries x 1500 frames, forward and forward+backward, with (a) every frame
  valid and (b) FLEURS-like valid lengths (uniform 3-25 s of a 30 s window): ours, PyTorch SDPA
  (flash where it applies, i.e. without a mask; memory-efficient with the mask) and the eager
  attention Blip2QFormerModel runs;
- the whole adapter (Q-Former + pooling + MLP + norm), forward and forward+backward, against the
  Blip2QFormerModel-based reference, each with FLEURS-like lengths;
- the work the padding-aware paths skip, counted exactly on the same lengths (device independent).

Each run returns :class:`mcat_ds.bench.harness.Row` s: ``ms`` rows carry the speed-up over the case's
baseline in ``ratio``; ``GB_per_s`` rows carry the fraction of the device's memory roofline; the
``cross-attention fwd work`` rows count what the Triton forward does at its launch (FLOPs useful and
executed, exp2, bytes, programs) and the time each unit needs for it, and ``fraction_of_bound`` is
the slowest of those times over the measured one.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from mcat_ds.architectures import llm_config, whisper_config
from mcat_ds.bench.harness import Row, benchmark_parser, csv_target, device_name, latest_run, plot_times, read_rows, report
from mcat_ds.config import AdapterConfig
from mcat_ds.model.adapter import SpeechAdapter
from mcat_ds.model.blip2_reference import ReleaseQFormerPoolAdapter
from mcat_ds.model.random import WINDOW_SECONDS, fleurs_like_lengths
from mcat_ds.presets import get_preset
from mcat_ds.release import release_adapter_state
from mcat_kernels.cross_attention import (
    cross_attention_reference,
    forward_launch,
    key_padding_mask,
    qformer_cross_attention,
)
from mcat_kernels.dispatch import interpreter_active

FRAMES_PER_SECOND = 50  # Whisper encoder frames per second of audio

@dataclass(frozen=True)
class DeviceLimits:
    """Data-sheet limits: HBM bandwidth, dense bf16 tensor-core rate, SMs and boost clock."""

    memory_gb_per_s: float
    bf16_tflop_per_s: float
    sms: int
    boost_ghz: float

    @property
    def exp2_per_s(self) -> float:
        return EXP2_PER_SM_PER_CLOCK * self.sms * self.boost_ghz * 1e9


EXP2_PER_SM_PER_CLOCK = 16
"""The special-function units' exp2 rate per SM and clock (MUFU.EX2, Ampere and Hopper): softmax's
exp2 runs there, not on the tensor cores, and caps attention with small head dims."""
DEVICE_LIMITS = {  # matched against torch.cuda.get_device_name(), most specific names first
    "H200": DeviceLimits(4800.0, 989.0, 132, 1.98),
    "H100 NVL": DeviceLimits(3900.0, 835.0, 132, 1.785),
    "H100 PCIe": DeviceLimits(2000.0, 756.0, 114, 1.755),
    "H100": DeviceLimits(3350.0, 989.0, 132, 1.98),  # SXM5 (reported as "NVIDIA H100 80GB HBM3")
    "A100-SXM4-80GB": DeviceLimits(2039.0, 312.0, 108, 1.41),
    "A100 80GB PCIe": DeviceLimits(1935.0, 312.0, 108, 1.41),
    "A100": DeviceLimits(1555.0, 312.0, 108, 1.41),  # 40 GB parts
    "L40S": DeviceLimits(864.0, 362.0, 142, 2.52),
}


def device_limits(device_name: str) -> DeviceLimits | None:
    return next((limits for key, limits in DEVICE_LIMITS.items() if key in device_name), None)


@dataclass(frozen=True)
class KernelBenchConfig:
    batch: int = 32
    heads: int = 12
    queries: int = 150
    keys: int = 1500
    head_dim: int = 64
    adapter_batch: int = 32
    dtype: torch.dtype = torch.bfloat16
    device: str = "cuda"
    triton: bool = True
    """Time the Triton kernels (compiled on CUDA; on CPU only in the interpreter, for --smoke)."""
    seed: int = 0
    warmup_ms: float = 25.0
    rep_ms: float = 100.0


def smoke_config() -> KernelBenchConfig:
    """Seconds on a CPU, kernels in Triton's interpreter: proves the script runs, measures nothing."""
    return KernelBenchConfig(batch=2, heads=2, queries=15, keys=60, head_dim=16, adapter_batch=2,
                             dtype=torch.float32, device="cpu", triton=interpreter_active(),
                             warmup_ms=0.0, rep_ms=0.0)


def timer(config: KernelBenchConfig) -> Callable[..., float]:
    """``measure(fn, grad_to_none=None) -> ms``: do_bench's median on CUDA, wall-clock median on CPU."""
    if config.device.startswith("cuda"):
        import triton.testing

        def measure(fn, grad_to_none=None):
            return triton.testing.do_bench(fn, warmup=config.warmup_ms, rep=config.rep_ms,
                                           grad_to_none=grad_to_none, return_mode="median")
        return measure

    def measure(fn, grad_to_none=None):
        fn()  # warm-up (allocator, lazy init)
        times, start = [], time.perf_counter()
        while len(times) < 3 or (time.perf_counter() - start) * 1e3 < config.rep_ms:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
            for tensor in grad_to_none or ():
                tensor.grad = None
        return statistics.median(times)
    return measure


# ---------------------------------------------------------------- cross-attention implementations

def _sdpa_backend(name: str):
    if name == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel({"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}[name])


def blip2_eager_attention(q, k, v, key_lengths):
    """What Blip2QFormerModel's eager attention computes: scores plus an additive mask of the dtype's
    minimum, softmax in the input dtype, then the weighted sum."""
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    additive = (~key_padding_mask(key_lengths, k.shape[2])).to(q.dtype) * torch.finfo(q.dtype).min
    return torch.matmul(scores.add(additive[:, None, None, :]).softmax(-1), v)


@dataclass(frozen=True)
class AttentionImplementation:
    name: str
    run: Callable
    needs_all_valid: bool = False  # computes unmasked attention: same result only when no frame is padding
    is_sdpa: bool = False


def attention_implementations(config: KernelBenchConfig) -> list[AttentionImplementation]:
    cuda = config.device.startswith("cuda")

    def sdpa(backend: str, masked: bool):
        def run(q, k, v, lengths):
            with _sdpa_backend(backend):
                if masked:
                    return cross_attention_reference(q, k, v, lengths)
                return F.scaled_dot_product_attention(q, k, v)
        return run

    found = []
    if config.triton:
        found.append(AttentionImplementation(
            "mcat triton", lambda q, k, v, lengths: qformer_cross_attention(q, k, v, lengths, implementation="triton")))
    found += [
        AttentionImplementation("sdpa flash, no mask" if cuda else "sdpa, no mask",
                                sdpa("flash" if cuda else "default", False), needs_all_valid=True, is_sdpa=True),
        AttentionImplementation("sdpa efficient + mask" if cuda else "sdpa + mask",
                                sdpa("efficient" if cuda else "default", True), is_sdpa=True),
        AttentionImplementation("eager (Blip2QFormer)", blip2_eager_attention),
    ]
    return found


def attention_bytes(config: KernelBenchConfig, lengths: torch.Tensor) -> int:
    """The least HBM traffic of the forward pass: Q and O once, K and V of the valid frames once,
    the fp32 log-sum-exp. Achieved bandwidth = these bytes / time (for every implementation). The
    query blocks of one (sample, head) run side by side, so K/V come from HBM once, then from L2."""
    element = torch.finfo(config.dtype).bits // 8
    q_or_o = config.batch * config.heads * config.queries * config.head_dim
    kv = 2 * int(lengths.sum()) * config.heads * config.head_dim
    return element * (2 * q_or_o + kv) + 4 * config.batch * config.heads * config.queries


@dataclass(frozen=True)
class AttentionWork:
    """The forward kernel's work at one launch, counted: what bounds it on a device."""

    useful_flop: float
    executed_flop: float
    """Tensor-core work of whole blocks: idle query rows and the masked tail of the last key block count."""
    exp2: float
    bytes: int
    programs: int

    def bound_s(self, limits: DeviceLimits) -> dict[str, float]:
        """Seconds each unit needs at its data-sheet rate; the slowest bounds the kernel."""
        return {"memory": self.bytes / (limits.memory_gb_per_s * 1e9),
                "tensor cores": self.executed_flop / (limits.bf16_tflop_per_s * 1e12),
                "exp2": self.exp2 / limits.exp2_per_s}


def attention_work(config: KernelBenchConfig, lengths: torch.Tensor, launch) -> AttentionWork:
    blocks_m = -(-config.queries // launch.block_m)
    key_blocks = torch.div(lengths + launch.block_n - 1, launch.block_n, rounding_mode="floor")
    executed_pairs = blocks_m * launch.block_m * int(key_blocks.sum()) * launch.block_n * config.heads
    useful_pairs = config.queries * int(lengths.sum()) * config.heads
    return AttentionWork(useful_flop=4.0 * useful_pairs * config.head_dim,
                         executed_flop=4.0 * executed_pairs * config.head_dim, exp2=float(executed_pairs),
                         bytes=attention_bytes(config, lengths), programs=blocks_m * config.batch * config.heads)


def attention_work_rows(config: KernelBenchConfig, lengths: torch.Tensor, shape: str, launch, limits,
                        ms: float | None) -> list[Row]:
    """Counted rows of the Triton forward at ``launch``, and (timed on a known device) its fraction of
    the bound: the slowest of its memory, tensor-core and exp2 time at data-sheet rates."""
    work = attention_work(config, lengths, launch)
    name = f"mcat triton, {launch}"
    rows = [Row("cross-attention fwd work", shape, name, "GFLOP useful", work.useful_flop / 1e9),
            Row("cross-attention fwd work", shape, name, "GFLOP executed", work.executed_flop / 1e9),
            Row("cross-attention fwd work", shape, name, "exp2 millions", work.exp2 / 1e6),
            Row("cross-attention fwd work", shape, name, "MB moved", work.bytes / 1e6),
            Row("cross-attention fwd work", shape, name, "programs", work.programs)]
    if limits is not None:
        bounds = work.bound_s(limits)
        rows += [Row("cross-attention fwd work", shape, name, f"us bound by {unit}", seconds * 1e6)
                 for unit, seconds in bounds.items()]
        rows.append(Row("cross-attention fwd work", shape, name, "programs per SM", work.programs / limits.sms))
        if ms is not None:
            rows.append(Row("cross-attention fwd", shape, "mcat triton", "fraction_of_bound",
                            max(bounds.values()) / (ms * 1e-3)))
    return rows


def bench_cross_attention(config: KernelBenchConfig, measure, device_name: str) -> list[Row]:
    generator = torch.Generator().manual_seed(config.seed)
    cases = {
        "all frames valid": torch.full((config.batch,), config.keys, dtype=torch.long),
        "FLEURS-like lengths": fleurs_like_lengths(config.batch, config.keys, generator),
    }
    shape = f"{config.batch}x{config.heads}h x {config.queries}q x {config.keys}k x {config.head_dim}d {str(config.dtype).split('.')[-1]}"
    make = lambda n: torch.randn(config.batch, config.heads, n, config.head_dim, generator=generator).to(config.device, config.dtype)  # noqa: E731
    q, k, v = make(config.queries), make(config.keys), make(config.keys)
    limits = device_limits(device_name)
    roofline = limits.memory_gb_per_s if limits else None
    rows = []
    for case, lengths in cases.items():
        lengths = lengths.to(config.device)
        all_valid = bool((lengths == config.keys).all())
        implementations = [i for i in attention_implementations(config) if all_valid or not i.needs_all_valid]
        expected = cross_attention_reference(q.float(), k.float(), v.float(), lengths)
        tolerance = 2e-2 if config.dtype != torch.float32 else 1e-4
        for implementation in implementations:  # a wrong result is never timed
            got = implementation.run(q, k, v, lengths).float()
            error = (got - expected).abs().max().item()
            if error > tolerance:
                raise AssertionError(f"{implementation.name} differs from the reference by {error:.3g} ({case})")
        for mode in ("fwd", "fwd+bwd"):
            times = {}
            for implementation in implementations:
                leaves = [t.detach().requires_grad_(mode == "fwd+bwd") for t in (q, k, v)]
                grad = torch.randn_like(q)
                if mode == "fwd":
                    def step(run=implementation.run, leaves=leaves):
                        with torch.no_grad():
                            run(*leaves, lengths)
                else:
                    def step(run=implementation.run, leaves=leaves, grad=grad):
                        run(*leaves, lengths).backward(grad)
                times[implementation.name] = measure(step, grad_to_none=leaves if mode == "fwd+bwd" else None)
            # the baseline: the fastest SDPA backend that gives the same result in this case
            baseline = min(times[i.name] for i in implementations if i.is_sdpa)
            benchmark = f"cross-attention {mode}"
            for implementation in implementations:
                ms = times[implementation.name]
                rows.append(Row(benchmark, f"{shape}, {case}", implementation.name, "ms", ms, baseline / ms))
                if mode == "fwd":
                    gb_per_s = attention_bytes(config, lengths) / (ms * 1e-3) / 1e9
                    rows.append(Row(benchmark, f"{shape}, {case}", implementation.name, "GB_per_s", gb_per_s,
                                    gb_per_s / roofline if roofline else None))
            if mode == "fwd" and config.triton:
                launch, tuned = forward_launch(q)
                print(f"cross-attention forward, {case}: {launch}{' (autotuned)' if tuned else ''}", flush=True)
                rows += attention_work_rows(config, lengths, f"{shape}, {case}", launch, limits, times["mcat triton"])
    return rows


# ---------------------------------------------------------------- the whole adapter

def small_9b_adapter_shapes() -> tuple[AdapterConfig, int, int]:
    """(adapter config, encoder width, LLM width) of the small-9b preset: whisper-large-v3, GemmaX2-9B."""
    from mcat_ds.presets import get_preset
    model = get_preset("small-9b").model
    return (model.adapter, whisper_config(model.encoder.architecture).d_model,
            llm_config(model.llm.architecture).hidden_size)


def bench_adapter(config: KernelBenchConfig, measure, adapter_config: AdapterConfig,
                  encoder_width: int, llm_width: int) -> list[Row]:
    adapter_config = replace(adapter_config, dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(config.seed)
    reference = ReleaseQFormerPoolAdapter(adapter_config, encoder_width, llm_width)
    state = release_adapter_state({f"encoder_projector.{k}": v for k, v in reference.state_dict().items()})
    variants = {"Blip2QFormerModel reference (eager)": reference}
    choices = [("torch", "per_layer"), ("torch", "varlen")]
    if config.triton:
        choices += [("triton", "per_layer"), ("triton", "varlen")]
    for kernels, projection in choices:
        adapter = SpeechAdapter(replace(adapter_config, kernels=kernels, kv_projection=projection), encoder_width, llm_width)
        adapter.load_state_dict(state)
        variants[f"mcat {kernels} kernels, {projection} K/V"] = adapter
    generator = torch.Generator().manual_seed(config.seed)
    keys = config.keys if config.keys != 1500 else WINDOW_SECONDS * FRAMES_PER_SECOND
    lengths = fleurs_like_lengths(config.adapter_batch, keys, generator).to(config.device)
    states = torch.randn(config.adapter_batch, keys, encoder_width, generator=generator).to(config.device, config.dtype)
    mask = key_padding_mask(lengths, keys).long()
    shape = (f"batch {config.adapter_batch} x {keys} frames x {encoder_width} -> {adapter_config.num_layers} layers x "
             f"{adapter_config.hidden_size} -> {llm_width}, FLEURS-like lengths, {str(config.dtype).split('.')[-1]}")
    expected = None
    rows = []
    for name, module in variants.items():
        module.to(config.device, config.dtype).eval()
        run = (lambda m=module: m(states, mask)) if module is reference else (lambda m=module: m(states, lengths))
        with torch.no_grad():
            out = run().float()
        if expected is None:
            expected = out
        else:
            error = ((out - expected).abs().max() / expected.abs().max()).item()
            if error > (5e-2 if config.dtype != torch.float32 else 1e-4):
                raise AssertionError(f"{name} differs from the reference adapter by {error:.3g} (relative)")
    baseline = {}
    for mode in ("fwd", "fwd+bwd"):
        for name, module in variants.items():
            run = (lambda m=module: m(states, mask)) if module is reference else (lambda m=module: m(states, lengths))
            params = [p for p in module.parameters()]
            if mode == "fwd":
                def step(run=run):
                    with torch.no_grad():
                        run()
            else:
                def step(run=run):
                    run().float().square().mean().backward()
            ms = measure(step, grad_to_none=params if mode == "fwd+bwd" else None)
            baseline.setdefault(mode, ms)
            rows.append(Row(f"adapter {mode}", shape, name, "ms", ms, baseline[mode] / ms))
    return rows


# ---------------------------------------------------------------- work skipped, counted

def padding_accounting(config: KernelBenchConfig, adapter_config: AdapterConfig, encoder_width: int,
                       samples: int = 10_000) -> list[Row]:
    """Fractions of the dense work that the padding-aware paths do, on FLEURS-like lengths (exact counts
    over ``samples`` draws; device independent). The attention kernel reads K/V in blocks of 64 frames."""
    generator = torch.Generator().manual_seed(config.seed)
    window = WINDOW_SECONDS * FRAMES_PER_SECOND
    lengths = fleurs_like_lengths(samples, window, generator)
    block = 64
    read = (torch.div(lengths + block - 1, block, rounding_mode="floor") * block).clamp(max=window)
    cross_layers = len(range(0, adapter_config.num_layers, adapter_config.cross_attention_every))
    shape = f"FLEURS-like 3-25 s in a {WINDOW_SECONDS} s window ({window} frames), {samples} draws"
    dense = samples * window
    rows = [
        Row("padding accounting", shape, "cross-attention K/V bytes and FLOPs, block-skipping kernel", "fraction_of_dense",
            int(read.sum()) / dense),
        Row("padding accounting", shape, f"K/V projection FLOPs, varlen ({cross_layers} layers in one GEMM)",
            "fraction_of_dense", int(lengths.sum()) / dense),
        Row("padding accounting", shape, "K/V projection GFLOP per utterance, per-layer padded", "GFLOP",
            2 * 2 * cross_layers * window * encoder_width * adapter_config.hidden_size / 1e9),
        Row("padding accounting", shape, "K/V projection GFLOP per utterance, varlen", "GFLOP",
            2 * 2 * cross_layers * float(lengths.float().mean()) * encoder_width * adapter_config.hidden_size / 1e9),
    ]
    return rows


# ---------------------------------------------------------------- the script

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def main(argv: list[str] | None = None, description: str | None = None) -> None:
    parser = benchmark_parser(description, "kernels.csv")
    parser.add_argument("--dtype", choices=DTYPES, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--batch", type=int, help="cross-attention batch (default 32 on CUDA, 8 on CPU)")
    parser.add_argument("--adapter-batch", type=int, help="adapter batch (default 32 on CUDA, 4 on CPU)")
    parser.add_argument("--only", choices=("attention", "adapter", "accounting"), action="append",
                        help="run only these parts (repeatable)")
    parser.add_argument("--plot", help="default: the CSV's name with .png")
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
    csv_path = csv_target(args, "kernels.csv")
    report(rows, csv_path)
    if csv_path:
        plot_path = args.plot or str(Path(csv_path).with_suffix(".png"))
        plot_times(latest_run(read_rows(csv_path), name), plot_path, f"{name}, {latest_run(read_rows(csv_path), name)[-1]['date']}")
        print(f"plot: {plot_path}")

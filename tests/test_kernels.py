"""The Triton kernels against PyTorch references: output and every gradient, odd shapes, dtypes.

On CPU they run in Triton's interpreter (conftest sets TRITON_INTERPRET=1); on a GPU, compiled.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from blip2_reference import ReleaseQFormerPoolAdapter, randomize
from mcat_ds.config import AdapterConfig
from mcat_ds.model.adapter import SpeechAdapter
from mcat_ds.release import release_adapter_state
from mcat_kernels.cross_attention import (
    DKDV_LAUNCH,
    DQ_LAUNCH,
    FORWARD_LAUNCHES,
    MAX_GRID_Y,
    check_launch_limits,
    cross_attention_forward,
    cross_attention_reference,
    element_offset_bound,
    qformer_cross_attention,
)
from mcat_kernels.layernorm_pool import layernorm_pool, layernorm_pool_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCES = {  # dtype: (atol, rtol), against an fp32 reference
    torch.float32: (2e-5, 1e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 2e-2),
}


def attention_inputs(batch, heads, queries, keys, dim, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    make = lambda n: torch.randn(batch, heads, n, dim, generator=generator).to(DEVICE, dtype).requires_grad_()  # noqa: E731
    return make(queries), make(keys), make(keys)


def check_cross_attention(batch, heads, queries, keys, dim, lengths, dtype):
    q, k, v = attention_inputs(batch, heads, queries, keys, dim, dtype)
    lengths = torch.tensor(lengths, device=DEVICE)
    out = qformer_cross_attention(q, k, v, lengths, implementation="triton")
    grad = torch.randn_like(out)
    out.backward(grad)
    got = [out, q.grad, k.grad, v.grad]
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    expected = cross_attention_reference(q32, k32, v32, lengths)
    expected.backward(grad.float())
    atol, rtol = TOLERANCES[dtype]
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, [expected, q32.grad, k32.grad, v32.grad]):
        torch.testing.assert_close(a.float(), b, atol=atol * max(1.0, b.abs().max().item()), rtol=rtol, msg=name)
    for row, length in enumerate(lengths.tolist()):  # padding keys get exactly zero gradient
        assert k.grad[row, :, length:].abs().max() == 0 if length < keys else True
        assert v.grad[row, :, length:].abs().max() == 0 if length < keys else True


@pytest.mark.parametrize("queries", [1, 5, 150, 151])
@pytest.mark.parametrize("keys, lengths", [(1, [1, 1]), (17, [17, 1]), (70, [33, 64])])
def test_cross_attention_odd_shapes_fp32(queries, keys, lengths):
    check_cross_attention(2, 3, queries, keys, 64, lengths, torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dim", [64, 128])
def test_cross_attention_dtypes_and_head_dims(dtype, dim):
    check_cross_attention(2, 2, 150, 97, dim, [97, 40], dtype)


@pytest.mark.cuda
def test_cross_attention_whisper_length_once():
    check_cross_attention(2, 2, 150, 1500, 64, [1500, 377], torch.float32)


@pytest.mark.cuda
def test_padding_blocks_are_never_read():
    q, k, v = attention_inputs(2, 2, 150, 300, 64, torch.float32)
    lengths = torch.tensor([130, 300], device=DEVICE)
    clean = qformer_cross_attention(q, k, v, lengths, implementation="triton")
    with torch.no_grad():
        k[0, :, 130:] = float("nan")  # would poison any read of sample 0's padding, masked or not
        v[0, :, 130:] = float("nan")
    poisoned = qformer_cross_attention(q, k, v, lengths, implementation="triton")
    assert torch.isfinite(poisoned).all()
    torch.testing.assert_close(poisoned, clean, rtol=0, atol=0)


def test_noncontiguous_head_views_like_the_adapter_passes():
    base = torch.randn(2, 150, 4 * 64, device=DEVICE)
    keys = torch.randn(2, 90, 4 * 64, device=DEVICE)
    q = base.view(2, 150, 4, 64).transpose(1, 2)
    k = keys.view(2, 90, 4, 64).transpose(1, 2)
    lengths = torch.tensor([90, 12], device=DEVICE)
    torch.testing.assert_close(qformer_cross_attention(q, k, k, lengths, implementation="triton"),
                               cross_attention_reference(q, k, k, lengths), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("rows, channels, stride", [pytest.param(150, 768, 5, marks=pytest.mark.cuda),
                                                   (151, 40, 5), (7, 33, 3), (4, 16, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layernorm_pool_matches_reference(rows, channels, stride, dtype):
    generator = torch.Generator().manual_seed(1)
    make = lambda *shape: (torch.randn(*shape, generator=generator) * 2 + 0.5).to(DEVICE, dtype).requires_grad_()  # noqa: E731
    x, residual = make(2, rows, channels), make(2, rows, channels)
    weight, bias = make(channels), make(channels)
    out = layernorm_pool(x, residual, weight, bias, 1e-5, stride, implementation="triton")
    grad = torch.randn_like(out)
    out.backward(grad)
    got = [out, x.grad, residual.grad, weight.grad, bias.grad]
    leaves32 = [t.detach().float().requires_grad_() for t in (x, residual, weight, bias)]
    expected = layernorm_pool_reference(*leaves32, 1e-5, stride)
    expected.backward(grad.float())
    atol, rtol = TOLERANCES[dtype]
    for name, a, b in zip(("out", "dx", "dresidual", "dweight", "dbias"), got, [expected] + [t.grad for t in leaves32]):
        torch.testing.assert_close(a.float(), b, atol=atol * max(1.0, b.abs().max().item()), rtol=rtol, msg=name)
    kept = rows - rows % stride
    assert x.grad[:, kept:].abs().max() == 0 if kept < rows else True


def adapter_config(**changes) -> AdapterConfig:
    values = dict(num_queries=150, hidden_size=64, num_layers=4, num_heads=2, intermediate_size=96,
                  cross_attention_every=2, pool_stride=5, mlp_hidden_size=48, dropout=0.0)
    return AdapterConfig(**{**values, **changes})


@pytest.mark.cuda
def test_adapter_with_kernels_equals_reference_path_and_blip2():
    encoder_width, llm_width = 48, 40
    torch.manual_seed(0)
    blip2 = ReleaseQFormerPoolAdapter(adapter_config(), encoder_width, llm_width)
    randomize(blip2, seed=3)
    state = release_adapter_state({f"encoder_projector.{k}": v for k, v in blip2.state_dict().items()})
    adapters = {}
    for kernels, projection in (("triton", "varlen"), ("torch", "varlen"), ("torch", "per_layer")):
        adapter = SpeechAdapter(adapter_config(kernels=kernels, kv_projection=projection), encoder_width, llm_width)
        adapter.load_state_dict(state)
        adapters[(kernels, projection)] = adapter.to(DEVICE).eval()
    states = torch.randn(3, 80, encoder_width, device=DEVICE)
    lengths = torch.tensor([80, 1, 37], device=DEVICE)
    outputs, grads = {}, {}
    for key, adapter in adapters.items():
        inputs = states.clone().requires_grad_()
        out = adapter(inputs, lengths)
        out.pow(2).sum().backward()
        outputs[key] = out
        grads[key] = [inputs.grad] + [p.grad for p in adapter.parameters()]
    reference = outputs[("torch", "per_layer")]
    for key in adapters:
        torch.testing.assert_close(outputs[key], reference, atol=1e-5, rtol=1e-5, msg=str(key))
        for a, b in zip(grads[key], grads[("torch", "per_layer")]):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=str(key))
    mask = (torch.arange(80, device=DEVICE)[None] < lengths[:, None]).long()
    torch.testing.assert_close(blip2.to(DEVICE).eval()(states, mask), reference, atol=1e-5, rtol=1e-5)


def test_dispatch_falls_back_where_the_kernel_cannot_run_and_says_why_when_forced():
    q = torch.randn(1, 2, 5, 8, dtype=torch.float64)  # head dim 8 and float64: not kernel shapes
    lengths = torch.tensor([3])
    out = qformer_cross_attention(q, q, q, lengths)  # auto: the PyTorch path
    torch.testing.assert_close(out, cross_attention_reference(q, q, q, lengths))
    with pytest.raises(ValueError, match="head dim 8"):
        qformer_cross_attention(q, q, q, lengths, implementation="triton")
    with pytest.raises(ValueError, match="unknown kernel implementation"):
        qformer_cross_attention(q, q, q, lengths, implementation="cuda")


@pytest.mark.cuda
def test_the_benchmark_shapes_run_at_a_gpu_launch():
    """The benchmarks' shapes (150 queries x 1500 frames, head dim 64; 768 channels pooled by 5) in bf16:
    autotuned on a GPU; in the interpreter at the first of the launches the autotuner chooses among
    (which differs in one flag: bf16 dots accumulate as fp32 dots there)."""
    from mcat_ds.bench.kernels import KernelBenchConfig
    from mcat_kernels import layernorm_pool as pool_module

    bench = KernelBenchConfig()
    assert (bench.queries, bench.keys, bench.head_dim) == (150, 1500, 64)
    check_cross_attention(1, 2, bench.queries, bench.keys, bench.head_dim, [1500], torch.bfloat16)
    x = torch.randn(1, 150, 768, device=DEVICE, dtype=torch.bfloat16)
    weight, bias = torch.rand(768, device=DEVICE) + 0.5, torch.randn(768, device=DEVICE)
    out = layernorm_pool(x, torch.zeros_like(x), weight.to(torch.bfloat16), bias.to(torch.bfloat16), 1e-12, 5,
                         implementation="triton")
    expected = layernorm_pool_reference(x.float(), torch.zeros_like(x).float(), weight, bias, 1e-12, 5)
    torch.testing.assert_close(out.float(), expected, atol=3e-2, rtol=2e-2)
    assert pool_module._blocks(5, 768) == (8, 1024)  # a whole 768-wide row per program


@pytest.mark.cuda
@pytest.mark.parametrize("key", sorted(FORWARD_LAUNCHES))
def test_every_forward_launch_the_autotuner_may_pick_is_correct(key):
    fp32_dot, head_dim = key
    dtype = torch.float32 if fp32_dot else torch.float16  # fp16: the non-fp32 dot path in the interpreter
    q, k, v = (t.detach() for t in attention_inputs(2, 2, 150, 130, head_dim, dtype))
    lengths = torch.tensor([130, 70], device=DEVICE)
    expected = cross_attention_reference(q.float(), k.float(), v.float(), lengths)
    atol, rtol = TOLERANCES[dtype]
    for launch in FORWARD_LAUNCHES[key]:
        out, _, _ = cross_attention_forward(q, k, v, lengths, q.shape[-1] ** -0.5, launch=launch)
        torch.testing.assert_close(out.float(), expected, atol=atol, rtol=rtol, msg=str(launch))


def test_block_sizes_leave_few_query_rows_idle():
    for launches in FORWARD_LAUNCHES.values():
        for launch in launches:
            computed = -(-150 // launch.block_m) * launch.block_m
            assert 1 - 150 / computed < 0.25  # 64 rows: 22% idle; 32: 6%; 16: 4% (the old 256: 41%)
    assert FORWARD_LAUNCHES[(False, 64)][0].block_m == 64  # the default off CUDA, and the autotuner's first
    for (fp32_dot, _), launches in FORWARD_LAUNCHES.items():
        if fp32_dot:  # IEEE fp32 dots spill past 1024 tile entries (see the compile test)
            assert all(launch.block_m * launch.block_n <= 1024 for launch in launches)


def test_the_largest_batch_the_launcher_accepts_needs_int64_batch_offsets_and_int32_within_a_head():
    """small-9b's adapter: 12 heads, varlen K/V of 4 cross-attention layers (K and V: 8 x 768 wide) at
    T = 1500. The launcher accepts up to CUDA's 65,535 (sample, head) programs per grid column."""
    heads, frames, width = 12, 1500, 768
    largest = MAX_GRID_Y // heads
    check_launch_limits(largest, heads)
    with pytest.raises(ValueError, match="split the batch"):
        check_launch_limits(largest + 1, heads)
    packed = torch.empty(2, frames, 8 * width, device="meta")  # the adapter's varlen layout, (B, T, 8 x 768)
    k = packed[..., :width].view(2, frames, heads, width // heads).transpose(1, 2)
    assert k.stride(0) == frames * 8 * width
    assert (largest - 1) * k.stride(0) + (heads - 1) * k.stride(1) > 2**31 - 1  # the batch offset needs int64
    assert 234 * k.stride(0) > 2**31 - 1 > 232 * k.stride(0)  # ... from ~234 utterances on
    assert element_offset_bound(k) < 2**31  # what stays int32: the offsets within one (sample, head)
    check_launch_limits(largest, heads, k)


COMPILE_SCRIPT = """
import json, re, sys
from mcat_kernels.compiled import launch_configurations
results = {}
for label, compiled in launch_configurations():
    strides = set(re.findall(r"%(stride_[a-z]+)\\b", compiled.ttir))
    batch_strides = sorted(name for name in strides if re.fullmatch(r"stride_[a-z]*[bh]", name))
    widened = sorted(name for name in batch_strides if f"arith.extsi %{name} : i32 to i64" in compiled.ttir)
    results[label] = [compiled.registers, compiled.spill_bytes, batch_strides, widened]
print(json.dumps(results))
"""


PYTHONS = [sys.executable] + ([os.environ["MCAT_GPU_IMAGE_PYTHON"]] if os.environ.get("MCAT_GPU_IMAGE_PYTHON") else [])
"""This environment's Triton, and in CI also the GPU image's (3.6, in .venv-gpu-image)."""


@pytest.mark.slow
@pytest.mark.parametrize("python", PYTHONS)
def test_every_launch_compiles_for_sm90_without_spills_and_with_int64_batch_offsets(python, tmp_path):
    """Triton compiles for sm_90a without a GPU (its wheel has ptxas): every configuration the launchers
    use fits the registers, and every batch and head offset is computed in int64."""
    (tmp_path / "mcat_kernels").symlink_to(REPO / "kernels")  # the package as setup.py installs it
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(tmp_path)])
    result = subprocess.run([python, "-c", COMPILE_SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(results) == sum(map(len, FORWARD_LAUNCHES.values())) + len(DKDV_LAUNCH) + len(DQ_LAUNCH) + 4
    for label, (registers, spill_bytes, batch_strides, widened) in results.items():
        assert 0 < registers <= 255, label
        if "dK dV | fp32" in label:  # IEEE fp32 dots spill in every dK/dV tile tried: these least
            assert spill_bytes <= 5000, label
        else:
            assert spill_bytes == 0, label
        assert batch_strides and widened == batch_strides, label

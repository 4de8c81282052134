"""Q-Former cross-attention from learned queries to variable-length encoder states.

``qformer_cross_attention(q, k, v, key_lengths)`` is softmax(q k^T * scale) v over the first
``key_lengths[b]`` keys of each sample. The Triton kernels make one pass over K/V per (sample, head)
with an online softmax in fp32, and never touch a key block that lies wholly past the sample's
length: for FLEURS-like utterances (10 s in a 30 s window) two thirds of the frames are skipped,
not computed and masked. The backward pass recomputes the probabilities from the saved
log-sum-exp.

Launch configuration (``FORWARD_LAUNCHES``, ``DKDV_LAUNCH``, ``DQ_LAUNCH``; the arithmetic is in
kernels/README.md):
- At 32 x 12 heads x 150 x 1500 x 64 in bf16 the forward pass is bound by its tensor-core and exp2
  work, not by its 150 MB of K/V: rows of a query block that hold no query cost as much as real ones.
  So BLOCK_M is 64 or 32 (22% or 6% of the rows idle for 150 queries, against 41% at 256), and
  ``triton.autotune`` picks among a few configurations, each free of register spills on sm_90a.
  The query blocks of one (sample, head) are neighbours in the grid, so their K/V reads hit L2.
- fp32 inputs take IEEE fp32 dots, which need far more registers: a tile of at most 32 x 32 or 16 x 64.
- Batch and head offsets are int64: varlen K/V (all cross-attention layers in one (B, T, 8 x 768)
  tensor) pass 2**31 elements from ~234 utterances at T = 1500.
- Backward: one program per key block computes dK, dV (reading Q, dO once per key block); one
  program per query block computes dQ. No atomics, so results are deterministic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from mcat_kernels.dispatch import IMPLEMENTATIONS, KERNEL_DTYPES, interpreter_active, use_triton


def key_padding_mask(key_lengths: torch.Tensor, num_keys: int) -> torch.Tensor:
    """(B, num_keys) bool, True where the key is a real frame."""
    return torch.arange(num_keys, device=key_lengths.device)[None, :] < key_lengths[:, None]


def cross_attention_reference(q, k, v, key_lengths, scale=None, dropout_p: float = 0.0):
    """The PyTorch path (any device): SDPA with the key padding mask."""
    mask = key_padding_mask(key_lengths, k.shape[2])[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)


@triton.jit
def _mma(a, b, FP32: tl.constexpr):
    """a @ b with fp32 accumulation; FP32 computes in fp32 (no TF32) for fp32 inputs, and for bf16 in
    Triton's interpreter, whose bf16 dot is wrong (bf16 products are exact in fp32: same result)."""
    if FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _cross_attention_forward(
    Q, K, V, O, LSE, LENGTHS,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    num_heads, num_queries, scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FP32_DOT: tl.constexpr,
):
    block_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # b * stride_kb passes 2**31 from ~234 utterances of varlen K/V
    b = bh // num_heads
    h = bh % num_heads
    length = tl.load(LENGTHS + b)
    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < num_queries
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + dims[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    # only key blocks that hold at least one real frame are visited
    for start in range(0, length, BLOCK_N):
        keys = start + cols
        key_ok = keys < length
        k = tl.load(k_base + keys[None, :] * stride_kn + dims[:, None] * stride_kd, mask=key_ok[None, :], other=0.0)
        scores = _mma(q, k, FP32_DOT)
        scores = tl.where(key_ok[None, :], scores * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        p = tl.exp2(scores - m_new[:, None])
        correction = tl.exp2(m_i - m_new)
        l_i = l_i * correction + tl.sum(p, 1)
        v = tl.load(v_base + keys[:, None] * stride_vn + dims[None, :] * stride_vd, mask=key_ok[:, None], other=0.0)
        acc = acc * correction[:, None] + _mma(p.to(v.dtype), v, FP32_DOT)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(O + b * stride_ob + h * stride_oh + rows[:, None] * stride_om + dims[None, :] * stride_od,
             out.to(O.dtype.element_ty), mask=row_ok[:, None])
    # log-sum-exp in base 2 of the scaled scores, what the backward pass recomputes from
    tl.store(LSE + bh * num_queries + rows, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit
def _cross_attention_backward_preprocess(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_gb, stride_gh, stride_gm, stride_gd,
    num_heads, num_queries,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    block_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # b * stride_kb passes 2**31 from ~234 utterances of varlen K/V
    b = bh // num_heads
    h = bh % num_heads
    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < num_queries
    o = tl.load(O + b * stride_ob + h * stride_oh + rows[:, None] * stride_om + dims[None, :] * stride_od,
                mask=row_ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_gb + h * stride_gh + rows[:, None] * stride_gm + dims[None, :] * stride_gd,
                 mask=row_ok[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + bh * num_queries + rows, tl.sum(o * do, 1), mask=row_ok)


@triton.jit
def _cross_attention_backward_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV, LENGTHS,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    num_heads, num_queries, num_keys, scale, scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FP32_DOT: tl.constexpr,
):
    block_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # b * stride_kb passes 2**31 from ~234 utterances of varlen K/V
    b = bh // num_heads
    h = bh % num_heads
    length = tl.load(LENGTHS + b)
    keys = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    key_ok = keys < length
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    if block_n * BLOCK_N < length:  # a block of padding only gets zero gradients
        k = tl.load(K + b * stride_kb + h * stride_kh + keys[:, None] * stride_kn + dims[None, :] * stride_kd,
                    mask=key_ok[:, None], other=0.0)
        v = tl.load(V + b * stride_vb + h * stride_vh + keys[:, None] * stride_vn + dims[None, :] * stride_vd,
                    mask=key_ok[:, None], other=0.0)
        for start in range(0, num_queries, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            row_ok = rows < num_queries
            q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + dims[None, :] * stride_qd,
                        mask=row_ok[:, None], other=0.0)
            do = tl.load(DO + b * stride_gb + h * stride_gh + rows[:, None] * stride_gm + dims[None, :] * stride_gd,
                         mask=row_ok[:, None], other=0.0)
            lse = tl.load(LSE + bh * num_queries + rows, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + bh * num_queries + rows, mask=row_ok, other=0.0)
            scores = _mma(q, tl.trans(k), FP32_DOT)
            p = tl.exp2(scores * scale_log2 - lse[:, None])
            p = tl.where(row_ok[:, None] & key_ok[None, :], p, 0.0)
            dv += _mma(tl.trans(p.to(do.dtype)), do, FP32_DOT)
            dp = _mma(do, tl.trans(v), FP32_DOT)
            ds = p * (dp - delta[:, None])
            dk += _mma(tl.trans(ds.to(q.dtype)), q, FP32_DOT)
    tl.store(DK + b * stride_dkb + h * stride_dkh + keys[:, None] * stride_dkn + dims[None, :] * stride_dkd,
             (dk * scale).to(DK.dtype.element_ty), mask=(keys < num_keys)[:, None])
    tl.store(DV + b * stride_dvb + h * stride_dvh + keys[:, None] * stride_dvn + dims[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=(keys < num_keys)[:, None])


@triton.jit
def _cross_attention_backward_dq(
    Q, K, V, DO, LSE, DELTA, DQ, LENGTHS,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    num_heads, num_queries, scale, scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FP32_DOT: tl.constexpr,
):
    block_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # b * stride_kb passes 2**31 from ~234 utterances of varlen K/V
    b = bh // num_heads
    h = bh % num_heads
    length = tl.load(LENGTHS + b)
    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < num_queries
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + dims[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * stride_gb + h * stride_gh + rows[:, None] * stride_gm + dims[None, :] * stride_gd,
                 mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + bh * num_queries + rows, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh * num_queries + rows, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start in range(0, length, BLOCK_N):
        keys = start + cols
        key_ok = keys < length
        k = tl.load(K + b * stride_kb + h * stride_kh + keys[:, None] * stride_kn + dims[None, :] * stride_kd,
                    mask=key_ok[:, None], other=0.0)
        v = tl.load(V + b * stride_vb + h * stride_vh + keys[:, None] * stride_vn + dims[None, :] * stride_vd,
                    mask=key_ok[:, None], other=0.0)
        scores = _mma(q, tl.trans(k), FP32_DOT)
        dp = _mma(do, tl.trans(v), FP32_DOT)
        p = tl.exp2(scores * scale_log2 - lse[:, None])
        p = tl.where(row_ok[:, None] & key_ok[None, :], p, 0.0)
        ds = p * (dp - delta[:, None])
        dq += _mma(ds.to(k.dtype), k, FP32_DOT)
    tl.store(DQ + b * stride_dqb + h * stride_dqh + rows[:, None] * stride_dqm + dims[None, :] * stride_dqd,
             (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class Launch:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int = 2

    def __str__(self) -> str:
        return f"{self.block_m}x{self.block_n}, {self.num_warps} warps, {self.num_stages} stages"


def _launch_key(fp32_dot: bool, head_dim: int) -> tuple[bool, int]:
    return fp32_dot, 64 if head_dim <= 64 else 128


# Every configuration below compiles for sm_90a without a register spill, with Triton 3.6 (the GPU
# image's) and 3.9 (CI's) alike (ptxas' counts, listed by `python -m mcat_kernels.compiled` and checked
# by tests/test_kernels.py; the register counts quoted are 3.9's), except the fp32 dK/dV
# ones: with IEEE fp32 dots every configuration tried spills there, these least (fp32 trains nowhere;
# it is the exact check). BLOCK_M = 64 leaves 22% of 150 queries' rows idle (192 computed), 32 leaves
# 6% (160); the old 256 left 41%, and the forward pass is bound by its tensor-core and exp2 work, not
# by memory (README, "Kernels"), so idle rows are time lost.
FORWARD_LAUNCHES: dict[tuple[bool, int], tuple[Launch, ...]] = {
    # (fp32 dots, head dim <= 64 or 128): the autotuner's choices on CUDA, the first one elsewhere
    (False, 64): (Launch(64, 64, 4), Launch(64, 64, 8), Launch(32, 64, 4), Launch(64, 32, 4)),  # 161-201 regs
    (False, 128): (Launch(64, 64, 8), Launch(64, 32, 4), Launch(32, 32, 4)),  # 168-191 regs
    (True, 64): (Launch(32, 32, 4), Launch(16, 64, 4)),  # 153, 184 regs; 32x64 and up spill
    (True, 128): (Launch(16, 64, 4),),  # 254 regs; 32x32 spills
}
DKDV_LAUNCH = {(False, 64): Launch(64, 64, 8), (False, 128): Launch(32, 32, 8),  # 32 x 32 x 4 spills on 3.6
               (True, 64): Launch(16, 16, 4), (True, 128): Launch(16, 16, 4)}  # spill 456 and 4,576 bytes
DQ_LAUNCH = {(False, 64): Launch(64, 64, 8), (False, 128): Launch(32, 32, 4),  # 154, 146 regs
             (True, 64): Launch(32, 32, 4), (True, 128): Launch(32, 32, 4)}  # 118, 128 regs
MAX_GRID_Y = 65_535
"""CUDA's limit on the second grid dimension: one program row per (sample, head)."""
_TUNED_FORWARD: dict[tuple[bool, int], object] = {}


def _tuned_forward(key: tuple[bool, int]):
    """The forward kernel under ``triton.autotune`` over FORWARD_LAUNCHES[key], timed once per number
    of queries, head dim and dtype (the first call at a new shape pays ~1 s per configuration)."""
    if key not in _TUNED_FORWARD:
        configs = [triton.Config({"BLOCK_M": launch.block_m, "BLOCK_N": launch.block_n}, num_warps=launch.num_warps,
                                 num_stages=launch.num_stages) for launch in FORWARD_LAUNCHES[key]]
        _TUNED_FORWARD[key] = triton.autotune(configs=configs, key=["num_queries", "HEAD_DIM"])(_cross_attention_forward)
    return _TUNED_FORWARD[key]


def forward_launch(q: torch.Tensor) -> tuple[Launch, bool]:
    """(launch, autotuned) the forward pass of inputs like ``q`` runs at: the autotuner's pick once it
    has run at such a shape on CUDA, else the first of FORWARD_LAUNCHES (the interpreter's)."""
    key = _launch_key(_fp32_dot(q), q.shape[-1])
    best = getattr(_TUNED_FORWARD.get(key), "best_config", None)
    if best is None:
        return FORWARD_LAUNCHES[key][0], False
    return Launch(best.kwargs["BLOCK_M"], best.kwargs["BLOCK_N"], best.num_warps, best.num_stages), True


def _fp32_dot(q: torch.Tensor) -> bool:
    return q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and interpreter_active())


def element_offset_bound(tensor: torch.Tensor) -> int:
    """The largest offset, in elements, within one (sample, head) of a (B, H, N, D) view: what the
    kernels add in int32 to the int64 base of the (sample, head)."""
    return sum((size - 1) * stride for size, stride in zip(tensor.shape[2:], tensor.stride()[2:]))


def check_launch_limits(batch: int, heads: int, *tensors: torch.Tensor) -> None:
    """Batches the kernels can take: (sample, head) programs within CUDA's grid, and offsets inside one
    (sample, head) within int32 (the batch and head offsets are int64 in the kernels)."""
    if batch * heads > MAX_GRID_Y:
        raise ValueError(f"{batch} samples x {heads} heads = {batch * heads} programs per row of the grid, more than "
                         f"CUDA's {MAX_GRID_Y}: split the batch into pieces of at most {MAX_GRID_Y // heads}")
    for tensor in tensors:
        if element_offset_bound(tensor) >= 2**31:
            raise ValueError(f"a (sample, head) slice of shape {tuple(tensor.shape[2:])} with strides "
                             f"{tensor.stride()[2:]} spans more than 2**31 elements")


def _check(q, k, v, key_lengths) -> None:
    if q.ndim != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"expected q (B, H, Nq, D) and k, v (B, H, Nk, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if key_lengths.shape != (q.shape[0],):
        raise ValueError(f"key_lengths must have shape ({q.shape[0]},), got {tuple(key_lengths.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")


KERNEL_HEAD_DIMS = (16, 32, 64, 128)


def _kernel_limitation(q) -> str | None:
    """Why the Triton kernel cannot take these inputs (None when it can)."""
    if q.shape[-1] not in KERNEL_HEAD_DIMS:
        return f"head dim {q.shape[-1]} is not one of {KERNEL_HEAD_DIMS}"
    if q.dtype not in KERNEL_DTYPES:
        return f"dtype {q.dtype} is not one of {KERNEL_DTYPES}"
    return None


def cross_attention_forward(q, k, v, key_lengths, scale: float, launch: Launch | None = None):
    """Host launcher: (output, lse, lengths) with output like q and lse (B*H*Nq,) fp32 in base 2.
    On CUDA the autotuner picks among FORWARD_LAUNCHES unless ``launch`` says which; elsewhere (the
    interpreter) the first of them runs."""
    batch, heads, num_queries, head_dim = q.shape
    check_launch_limits(batch, heads, q, k, v)
    lengths = key_lengths.to(device=q.device, dtype=torch.int32).clamp(0, k.shape[2]).contiguous()
    out = torch.empty_like(q)
    lse = torch.empty(batch * heads * num_queries, device=q.device, dtype=torch.float32)
    fp32_dot = _fp32_dot(q)
    key = _launch_key(fp32_dot, head_dim)
    arguments = (q, k, v, out, lse, lengths, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
                 heads, num_queries, scale * LOG2E)
    if launch is None and q.is_cuda and not interpreter_active():
        grid = lambda meta: (triton.cdiv(num_queries, meta["BLOCK_M"]), batch * heads)  # noqa: E731
        _tuned_forward(key)[grid](*arguments, HEAD_DIM=head_dim, FP32_DOT=fp32_dot)
    else:
        launch = launch or FORWARD_LAUNCHES[key][0]
        _cross_attention_forward[(triton.cdiv(num_queries, launch.block_m), batch * heads)](
            *arguments, HEAD_DIM=head_dim, BLOCK_M=launch.block_m, BLOCK_N=launch.block_n, FP32_DOT=fp32_dot,
            num_warps=launch.num_warps, num_stages=launch.num_stages,
        )
    return out, lse, lengths


def cross_attention_backward(q, k, v, out, lse, lengths, grad_out, scale: float):
    batch, heads, num_queries, head_dim = q.shape
    num_keys = k.shape[2]
    grad_out = grad_out.contiguous()
    check_launch_limits(batch, heads, grad_out)
    delta = torch.empty_like(lse)
    fp32_dot = _fp32_dot(q)
    dkdv, dq_launch = DKDV_LAUNCH[_launch_key(fp32_dot, head_dim)], DQ_LAUNCH[_launch_key(fp32_dot, head_dim)]
    _cross_attention_backward_preprocess[(triton.cdiv(num_queries, 64), batch * heads)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), heads, num_queries,
        HEAD_DIM=head_dim, BLOCK_M=64,
    )
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    _cross_attention_backward_dkdv[(triton.cdiv(num_keys, dkdv.block_n), batch * heads)](
        q, k, v, grad_out, lse, delta, dk, dv, lengths,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(), *dv.stride(),
        heads, num_queries, num_keys, scale, scale * LOG2E,
        HEAD_DIM=head_dim, BLOCK_M=dkdv.block_m, BLOCK_N=dkdv.block_n, FP32_DOT=fp32_dot,
        num_warps=dkdv.num_warps, num_stages=dkdv.num_stages,
    )
    _cross_attention_backward_dq[(triton.cdiv(num_queries, dq_launch.block_m), batch * heads)](
        q, k, v, grad_out, lse, delta, dq, lengths,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(),
        heads, num_queries, scale, scale * LOG2E,
        HEAD_DIM=head_dim, BLOCK_M=dq_launch.block_m, BLOCK_N=dq_launch.block_n, FP32_DOT=fp32_dot,
        num_warps=dq_launch.num_warps, num_stages=dq_launch.num_stages,
    )
    return dq, dk, dv


class QFormerCrossAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_lengths, scale):
        out, lse, lengths = cross_attention_forward(q, k, v, key_lengths, scale)
        ctx.save_for_backward(q, k, v, out, lse, lengths)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, lengths = ctx.saved_tensors
        dq, dk, dv = cross_attention_backward(q, k, v, out, lse, lengths, grad_out, ctx.scale)
        return dq, dk, dv, None, None


def qformer_cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_lengths: torch.Tensor,
    scale: float | None = None,
    dropout_p: float = 0.0,
    implementation: str = "auto",
) -> torch.Tensor:
    """softmax(q k^T * scale) v over the first ``key_lengths[b]`` keys of each sample.

    q: (B, H, Nq, D); k, v: (B, H, Nk, D); key_lengths: (B,) integers in [1, Nk]. Frames at or past
    ``key_lengths`` are padding and get no attention. ``implementation``: "triton", "torch", or
    "auto" (Triton where it runs, see ``mcat_kernels.dispatch``). Attention dropout runs on the
    PyTorch path.
    """
    _check(q, k, v, key_lengths)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown kernel implementation {implementation!r}; choose one of {', '.join(IMPLEMENTATIONS)}")
    limitation = _kernel_limitation(q)
    if implementation == "triton" and limitation:
        raise ValueError(f"the Triton cross-attention kernel cannot run this: {limitation}")
    if dropout_p > 0.0 or limitation or not use_triton(implementation, q):
        return cross_attention_reference(q, k, v, key_lengths, scale=scale, dropout_p=dropout_p)
    return QFormerCrossAttentionFunction.apply(q, k, v, key_lengths, scale)

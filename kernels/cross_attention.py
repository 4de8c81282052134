"""Q-Former cross-attention from learned queries to variable-length encoder states.

``qformer_cross_attention(q, k, v, key_lengths)`` is softmax(q k^T * scale) v over the first
``key_lengths[b]`` keys of each sample. The Triton kernels make one pass over K/V per (sample, head)
with an online softmax in fp32, and never touch a key block that lies wholly past the sample's
length: for FLEURS-like utterances (10 s in a 30 s window) two thirds of the frames are skipped,
not computed and masked. The backward pass recomputes the probabilities from the saved
log-sum-exp.

Launch configuration, chosen from the H100's numbers (no GPU was available to tune on):
- The op is memory bound: at 32 x 12 heads x 150 x 1500 x 64 in bf16 it reads 160 MB of K/V and
  does 22 GFLOP, i.e. ~48 us at 3.35 TB/s against ~22 us at 989 TFLOP/s. So the forward pass
  covers all queries of a (sample, head) in one program (BLOCK_M = the next power of two >= Nq,
  at most 256): K and V are read from HBM exactly once. 150 queries in a 256-row block leave 41%
  of the rows idle, which costs tensor-core time the op has to spare.
- BLOCK_N = 64 keys per step keeps the fp32 score tile (256 x 64) and the accumulator (256 x D)
  in registers with 8 warps for D = 64; D = 128 halves BLOCK_M to stay within registers.
- Backward: one program per key block computes dK, dV (reading Q, dO once per key block); one
  program per query block computes dQ. No atomics, so results are deterministic.
"""

from __future__ import annotations

import math

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
    bh = tl.program_id(1)
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
    bh = tl.program_id(1)
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
    bh = tl.program_id(1)
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
    bh = tl.program_id(1)
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


def _forward_blocks(num_queries: int, head_dim: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for the forward pass (see the module docstring)."""
    cap = 256 if head_dim <= 64 else 128
    block_m = min(cap, max(16, triton.next_power_of_2(num_queries)))
    return block_m, 64, 8 if block_m >= 128 else 4


def _fp32_dot(q: torch.Tensor) -> bool:
    return q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and interpreter_active())


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


def cross_attention_forward(q, k, v, key_lengths, scale: float):
    """Host launcher: (output, lse) with output like q and lse (B*H*Nq,) fp32 in base 2."""
    batch, heads, num_queries, head_dim = q.shape
    lengths = key_lengths.to(device=q.device, dtype=torch.int32).clamp(0, k.shape[2]).contiguous()
    out = torch.empty_like(q)
    lse = torch.empty(batch * heads * num_queries, device=q.device, dtype=torch.float32)
    block_m, block_n, warps = _forward_blocks(num_queries, head_dim)
    grid = (triton.cdiv(num_queries, block_m), batch * heads)
    _cross_attention_forward[grid](
        q, k, v, out, lse, lengths,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        heads, num_queries, scale * LOG2E,
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, FP32_DOT=_fp32_dot(q),
        num_warps=warps,
    )
    return out, lse, lengths


def cross_attention_backward(q, k, v, out, lse, lengths, grad_out, scale: float):
    batch, heads, num_queries, head_dim = q.shape
    num_keys = k.shape[2]
    grad_out = grad_out.contiguous()
    delta = torch.empty_like(lse)
    block_m = 64 if head_dim <= 64 else 32
    block_n = 64 if head_dim <= 64 else 32
    fp32_dot = _fp32_dot(q)
    _cross_attention_backward_preprocess[(triton.cdiv(num_queries, block_m), batch * heads)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), heads, num_queries,
        HEAD_DIM=head_dim, BLOCK_M=block_m,
    )
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    _cross_attention_backward_dkdv[(triton.cdiv(num_keys, block_n), batch * heads)](
        q, k, v, grad_out, lse, delta, dk, dv, lengths,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(), *dv.stride(),
        heads, num_queries, num_keys, scale, scale * LOG2E,
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, FP32_DOT=fp32_dot, num_warps=4,
    )
    _cross_attention_backward_dq[(triton.cdiv(num_queries, block_m), batch * heads)](
        q, k, v, grad_out, lse, delta, dq, lengths,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(),
        heads, num_queries, scale, scale * LOG2E,
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, FP32_DOT=fp32_dot, num_warps=4,
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

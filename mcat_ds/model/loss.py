"""The LM head and cross-entropy fused over the label positions, never materialising the logits.

Gemma's vocabulary is 256k: the fp32 logits of 1,000 label tokens and their gradient are 2 GB,
more than a LoRA step's activations. Both implementations compute the loss chunk by chunk of label
tokens, each chunk's logits living only while that chunk is processed:

- ``liger``: liger-kernel's fused linear cross-entropy (Triton, CUDA): gradients computed in the
  forward pass, no recomputation. Its own chunking follows the hidden width, not the token count:
  chunks of ~BT / (V / H) rows, each multiplying by the whole LM head, so at small-9b's ~560 label
  tokens (V / H = 72) it would make 70 chunks of 8 rows and read the 1.8 GB head 70 times (~130 GB a
  step, ~30 ms of HBM on an H100, against 2-3 reads for ours). We ask it for chunks of CHUNK_ROWS
  (its ``chunk_mem_const``) with fp32 gradient accumulation; a liger without that argument is used
  only where its chunking reads the head no more often than ours would;
- ``chunked``: PyTorch, any device: each chunk's head matmul, soft-cap and cross-entropy run under
  activation checkpointing, so backward recomputes one chunk at a time (one extra head matmul).

Both apply Gemma2's final logit soft-capping (``cap * tanh(logits / cap)``) before the softmax.
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from mcat_ds.optional import require

LossImplementation = Literal["auto", "liger", "chunked"]

CHUNK_ROWS = 512
"""Label tokens per chunk: 512 x 256k fp32 logits = 0.5 GB alive at a time."""


def resolve_loss_implementation(requested: LossImplementation, device: torch.device) -> str:
    """``auto``: liger-kernel on CUDA when it is installed, else the chunked PyTorch path."""
    if requested != "auto":
        return requested
    if device.type == "cuda" and importlib.util.find_spec("liger_kernel") is not None:
        return "liger"
    return "chunked"


def liger_chunk_rows(rows: int, vocab: int, hidden: int, chunk_mem_const: int = 1) -> int:
    """The rows of each chunk liger's fused linear cross-entropy cuts ``rows`` label tokens into (its
    rule: transient logits bounded by chunk_mem_const x BT x H elements, chunks a power of two)."""
    increase = -(-vocab // (chunk_mem_const * hidden))
    return min(1 << max(0, (-(-rows // increase)) - 1).bit_length(), rows)


def liger_default_chunks(rows: int, vocab: int, hidden: int, chunk_mem_const: int = 1) -> int:
    return -(-rows // liger_chunk_rows(rows, vocab, hidden, chunk_mem_const))


def liger_arguments(function: Callable, rows: int, vocab: int, hidden: int, chunk_rows: int = CHUNK_ROWS) -> dict | None:
    """Keyword arguments that make liger's ``function`` cut ``rows`` tokens into the fewest chunks of at
    most ``chunk_rows`` and accumulate in fp32; None where this liger cannot be told its chunk and its
    own rule would read the LM head more often than the chunked path (which reads it ~3 times a chunk:
    forward, recomputation, gradient)."""
    parameters = inspect.signature(function).parameters
    arguments = {"accum_dtype": torch.float32} if "accum_dtype" in parameters else {}
    if "chunk_mem_const" in parameters:
        arguments["chunk_mem_const"] = next(
            (constant for constant in range(-(-vocab // hidden), 0, -1)
             if liger_chunk_rows(rows, vocab, hidden, constant) <= chunk_rows), 1)
        return arguments
    return arguments if liger_default_chunks(rows, vocab, hidden) <= 3 * -(-rows // chunk_rows) else None


def _chunk_loss(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], targets: torch.Tensor,
                softcap: float | None, class_weights: torch.Tensor | None = None) -> torch.Tensor:
    logits = head(hidden).float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, targets, weight=class_weights, reduction="sum")


def chunked_head_cross_entropy(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
                               targets: torch.Tensor, softcap: float | None = None,
                               chunk_rows: int = CHUNK_ROWS, class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The chunked path with any ``head`` (hidden -> logits): a weight's matmul, or the head module
    itself where only its own forward can produce its weight (ZeRO-3 gathers a partitioned weight
    in the module's hooks, again when backward recomputes the chunk)."""
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, hidden[rows], head, targets[rows], softcap, class_weights,
                                       use_reentrant=False)
        else:
            total = total + _chunk_loss(hidden[rows], head, targets[rows], softcap, class_weights)
    return total


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         softcap: float | None = None, implementation: LossImplementation = "auto",
                         chunk_rows: int = CHUNK_ROWS, class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Summed fp32 cross-entropy of ``softcap(hidden @ weight.T)`` against ``targets``; with
    ``class_weights`` (V,) each token's loss counts ``class_weights[target]`` times.

    hidden: (N, H) final hidden states at the positions that predict a label; weight: (V, H) the LM
    head; targets: (N,) label ids (no ignored entries: callers select the label positions)."""
    implementation = resolve_loss_implementation(implementation, hidden.device)
    if implementation == "liger":
        require("liger_kernel")
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy as fused

        arguments = liger_arguments(fused, hidden.shape[0], weight.shape[0], weight.shape[1], chunk_rows)
        if arguments is not None:
            return fused(hidden, weight, targets, ce_weight=class_weights, reduction="sum", softcap=softcap,
                         **arguments).float()
        implementation = "chunked"
    if implementation != "chunked":
        raise ValueError(f"unknown loss implementation {implementation!r}; use auto, liger or chunked")
    return chunked_head_cross_entropy(hidden, lambda rows: rows @ weight.t(), targets, softcap, chunk_rows,
                                      class_weights)

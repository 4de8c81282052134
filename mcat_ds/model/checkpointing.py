"""Activation checkpointing of the LLM's decoder layers: full or selective.

``full`` keeps only each layer's input and recomputes the whole layer in backward: least memory, one
extra forward pass of the LLM (~+33% step FLOPs with a frozen base).

``selective`` keeps what is expensive to recompute and cheap to hold relative to its cost: the outputs
of matrix multiplications and of the fused attention kernels. Everything else in the layer (Gemma's
RMSNorms, which upcast to fp32 and so hold fp32 copies of the hidden states, rotary embeddings, GELU,
soft-capping, residual adds, dtype casts) is recomputed from those in backward. That recomputation is
elementwise work, a few percent of the layer's time, while the tensors it frees are as many and as
wide as the matmul outputs themselves.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

CheckpointingPolicy = Literal["full", "selective"]

_aten = torch.ops.aten
_SAVED_OPS_NAMES = (
    "mm", "addmm", "bmm", "baddbmm",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_flash_attention_forward", "_efficient_attention_forward",
)
SAVED_OPS = frozenset(
    getattr(_aten, name).default for name in _SAVED_OPS_NAMES if hasattr(_aten, name)
)
"""Ops whose outputs selective checkpointing keeps (those absent from this torch build are skipped)."""


def _keep_matmul_outputs(context, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_arguments(policy: CheckpointingPolicy) -> dict:
    """Keyword arguments for ``torch.utils.checkpoint.checkpoint`` that implement ``policy``."""
    arguments = {"use_reentrant": False}
    if policy == "selective":
        arguments["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _keep_matmul_outputs)
    elif policy != "full":
        raise ValueError(f"unknown activation checkpointing policy {policy!r}; use 'full' or 'selective'")
    return arguments


def enable_activation_checkpointing(llm, policy: CheckpointingPolicy) -> None:
    """Checkpoint every decoder layer of ``llm`` (an HF causal LM, PEFT-wrapped or not) under ``policy``."""
    arguments = checkpoint_arguments(policy)
    if hasattr(llm, "activation_checkpointing_enable"):  # transformers >= 5; 4.x has only the old name
        llm.activation_checkpointing_enable(activation_checkpointing_kwargs=arguments)
    else:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=arguments)

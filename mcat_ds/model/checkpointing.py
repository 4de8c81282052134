"""Activation checkpointing of the LLM's decoder layers: full or selective.

``full`` keeps only each layer's input and recomputes the whole layer in backward: least memory, one
extra forward pass of the LLM (~+33% step FLOPs with a frozen base).

``selective`` keeps what is expensive to recompute and cheap to hold relative to its cost: the outputs
of matrix multiplications and of the fused attention kernels (SDPA's, flash-attn's, FlexAttention's,
the last as the compiled region transformers makes of it). Everything else in the layer (Gemma's
RMSNorms, which upcast to fp32 and so hold fp32 copies of the hidden states, rotary embeddings, GELU,
soft-capping, residual adds, dtype casts) is recomputed from those in backward. That recomputation is
elementwise work, a few percent of the layer's time, while the tensors it frees are as many and as
wide as the matmul outputs themselves.
"""

from __future__ import annotations

import functools
import warnings
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
SAVED_OP_NAMES = frozenset({
    # FlexAttention, eager or as the region torch.compile made of it (inductor_compiled_code: the only
    # compiled region inside a decoder layer is the attention call transformers compiles)
    "flex_attention", "inductor_compiled_code",
    # flash-attn's kernels, registered as torch custom ops once flash_attn is imported
    "flash_attn::_flash_attn_forward", "flash_attn::_flash_attn_varlen_forward",
    "flash_attn_3::_flash_attn_forward", "flash_attn_3::fwd",
})
"""The same, for ops known by name: higher-order ops and ops of packages that may not be installed."""


def _op_name(op) -> str:
    name = getattr(op, "name", None)
    return name() if callable(name) else str(op)


def keeps_output(op) -> bool:
    """Whether selective checkpointing keeps ``op``'s output instead of recomputing it."""
    return op in SAVED_OPS or _op_name(op) in SAVED_OP_NAMES


def _keep_matmul_outputs(context, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if keeps_output(op) else CheckpointPolicy.PREFER_RECOMPUTE


def _make_compiled_regions_visible() -> None:
    """A torch.compile'd call (FlexAttention's, compiled by transformers) runs as one opaque function
    that the selective-checkpointing dispatch mode cannot see, so it can neither keep nor recompute
    its output as one op; torch's inductor option wraps every compiled region in the
    ``inductor_compiled_code`` higher-order op, which the policy keeps (what torchtitan does)."""
    import torch._inductor.config as inductor_config

    if hasattr(inductor_config, "wrap_inductor_compiled_regions"):
        inductor_config.wrap_inductor_compiled_regions = True
    else:
        warnings.warn(f"torch {torch.__version__} cannot wrap compiled regions for selective checkpointing: "
                      "FlexAttention under runtime.checkpointing_policy=selective may be recomputed", stacklevel=3)


def checkpoint_arguments(policy: CheckpointingPolicy) -> dict:
    """Keyword arguments for ``torch.utils.checkpoint.checkpoint`` that implement ``policy``."""
    arguments = {"use_reentrant": False}
    if policy == "selective":
        _make_compiled_regions_visible()
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

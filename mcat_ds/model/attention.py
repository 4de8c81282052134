"""Which attention implementation the LLM runs, for training on packed rows and for decoding."""

from __future__ import annotations

import contextlib
import importlib.util

import torch
import transformers

from mcat_ds.batching import LLMBatch

FLEX_BLOCK = 128
"""FlexAttention's block size (its block masks tile rows in 128 x 128 blocks)."""


def resolve_attn_implementation(requested: str, llm_config: transformers.PretrainedConfig) -> str:
    """``auto`` picks, for training on packed sequences, the fastest implementation that never attends
    across sequences and honours Gemma's logit soft-capping and sliding windows:

    - CUDA with the flash-attn package: its varlen kernels (``flash_attention_2``);
    - CUDA without it: FlexAttention, whose block mask (document + causal + sliding window, built by
      transformers from the restarting position ids) skips every block between sequences, with the
      soft-cap as a score modifier;
    - CPU: FlexAttention has no backward there, so SDPA where the architecture supports it (Gemma3;
      not Gemma2, whose soft-capping SDPA cannot do), else eager; both get a dense document mask.

    Decoding switches FlexAttention back to SDPA/eager (``use_decoding_attention``)."""
    if requested != "auto":
        return requested
    model_class = transformers.AutoModelForCausalLM._model_mapping[type(llm_config)]
    if torch.cuda.is_available():
        if importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
        if getattr(model_class, "_supports_flex_attn", False):
            return "flex_attention"
    return _dense_attn_implementation(model_class, llm_config)


def _dense_attn_implementation(model_class: type, llm_config: transformers.PretrainedConfig) -> str:
    # Some transformers versions let Gemma2 run SDPA and silently drop its attention soft-cap.
    soft_capped = getattr(llm_config, "attn_logit_softcapping", None) is not None
    return "sdpa" if getattr(model_class, "_supports_sdpa", False) and not soft_capped else "eager"


def use_decoding_attention(llm: transformers.PreTrainedModel) -> None:
    """FlexAttention pays off on packed training rows; in step-by-step decoding with a growing KV
    cache its block mask would be rebuilt (and its kernel recompiled) for every new length, so the
    LLM decodes with SDPA or eager instead. Other implementations are kept."""
    if llm.config._attn_implementation == "flex_attention":
        llm.set_attn_implementation(_dense_attn_implementation(type(llm), llm.config))


def dense_attn_implementation(llm: transformers.PreTrainedModel) -> str:
    """The implementation to decode (or serve through transformers) with: SDPA where it keeps the
    architecture's numerics, else eager."""
    return _dense_attn_implementation(type(llm), llm.config)


def packed_length_multiple(llm: transformers.PreTrainedModel) -> int:
    """What a packed row's length is padded to a multiple of: FlexAttention's block (its block masks
    then tile the row exactly, and the kernels never mask a partial block), else 1 (no padding)."""
    return FLEX_BLOCK if llm.config._attn_implementation == "flex_attention" else 1


def packed_attention_arguments(llm: transformers.PreTrainedModel, batch: LLMBatch) -> dict:
    """Keyword arguments for the LLM's forward on ``batch``: for flash-attn on a packed row, its
    sequence offsets and longest sequence, counted once on the host (otherwise every layer derives
    them from the position ids, with a device-to-host sync each)."""
    if batch.is_packed and llm.config._attn_implementation.startswith("flash_attention"):
        return batch.flash_varlen_arguments()
    return {}


def compiled_attention_context(llm: transformers.PreTrainedModel, device: torch.device):
    """FlexAttention on CUDA is compiled by transformers with torch.compile's defaults: static at the
    first packed length, then again with dynamic shapes at the second, per mask kind and for backward
    apart. Compiling with dynamic shapes from the first call makes one compile serve every length.
    (Only on CUDA: Inductor's CPU FlexAttention template does not build with dynamic shapes in torch
    2.13, and training never runs FlexAttention on CPU, which has no backward for it.)"""
    if device.type == "cuda" and llm.config._attn_implementation == "flex_attention":
        return torch._dynamo.config.patch(assume_static_by_default=False)
    return contextlib.nullcontext()

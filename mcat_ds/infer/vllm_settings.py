"""How a vLLM engine is started, with defaults that start on the machine they run on.

Two of vLLM's own defaults fail on MCAT's models where they matter most: ``max_model_len`` is the
model's whole context (131,072 positions for Gemma-3 27B: a KV cache no GPU holds beside the
weights; and a fixed 2,048 is above the tiny preset's 1,024, which vLLM refuses), and on the CPU
build ``gpu_memory_utilization`` is a fraction of the host's *total* memory that must be free at
start (0.9 of a shared machine seldom is). So: the length defaults to what MCAT's requests need, at
most what the model allows; on CPU the KV cache gets an explicit size, what the requests can use and
at most half of the memory free now. A flag (or ``VLLM_CPU_KVCACHE_SPACE``) still wins.

This module does not import vLLM: the settings are checked before any engine starts.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

DEFAULT_MAX_MODEL_LEN = 2048
"""Speech rows (30), tags, an SMT transcript and up to the release's 400 new tokens fit with room."""
GPU_MEMORY_UTILIZATION = 0.9
CPU_KV_SHARE_OF_FREE = 0.5
"""On CPU, the KV cache takes at most this share of the memory free at start (the rest is for the
weights, vLLM's processes and whatever else runs)."""
CPU_KV_ENV = "VLLM_CPU_KVCACHE_SPACE"
"""vLLM's own setting of the CPU KV cache (GiB); where it is set, it is used as is."""


@dataclass(frozen=True)
class VllmSettings:
    """How the engine is started; None: chosen for this machine and model (:func:`resolve_settings`)."""

    tensor_parallel: int = 1
    """GPUs one engine spans (27B in bf16 fits one 80 GB GPU only with little KV cache: use 2)."""
    gpu_memory_utilization: float | None = None
    """vLLM's fraction of GPU memory (0.9 by default); on the CPU build a fraction of host memory,
    which when given replaces the explicit KV cache size."""
    max_model_len: int | None = None
    """Prompt (speech rows, tags, an SMT transcript) plus new tokens, at most; default
    DEFAULT_MAX_MODEL_LEN or the model's own limit where that is lower."""
    max_num_seqs: int = 256
    """Sequences in one step of continuous batching."""
    kv_cache_memory_bytes: int | None = None
    """An explicit KV cache size (the default on CPU; None on GPU: vLLM sizes it from the fraction)."""
    enforce_eager: bool = False
    """True skips CUDA graph capture (faster start, slower decode); always on for the CPU build."""
    seed: int = 0
    load_tokenizer: bool = True
    """False for an LLM folder without a tokenizer (vLLM then warns at start that it has none)."""


def model_length_limit(llm_config: dict) -> int | None:
    """The positions the LLM's config allows (Gemma-3 keeps its text config inside)."""
    config = llm_config.get("text_config", llm_config)
    limit = config.get("max_position_embeddings")
    return int(limit) if isinstance(limit, int) and limit > 0 else None


def kv_bytes_per_token(llm_config: dict, dtype_bytes: int) -> int:
    """Keys and values of one position over all layers (every layer counted as global attention:
    an upper bound for Gemma's sliding-window layers)."""
    config = llm_config.get("text_config", llm_config)
    heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return 2 * config["num_hidden_layers"] * heads * head_dim * dtype_bytes


def free_memory_bytes() -> int:
    """Memory the host can give now (MemAvailable: free plus reclaimable cache)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def resolve_settings(settings: VllmSettings, llm_dir: str | Path, dtype_bytes: int, on_cpu: bool,
                     free_bytes: int | None = None, environ=os.environ) -> VllmSettings:
    """``settings`` with every None chosen for this model (``llm_dir``'s config.json) and machine.

    Raises ValueError when an explicit ``max_model_len`` is above the model's limit (vLLM's own
    refusal is a pydantic trace)."""
    llm_config = json.loads((Path(llm_dir) / "config.json").read_text(encoding="utf-8"))
    limit = model_length_limit(llm_config)
    length = settings.max_model_len
    if length is None:
        length = min(DEFAULT_MAX_MODEL_LEN, limit or DEFAULT_MAX_MODEL_LEN)
    elif limit is not None and length > limit:
        raise ValueError(f"--max-model-len {length} is above the {limit} positions this model allows "
                         f"({Path(llm_dir) / 'config.json'}: max_position_embeddings)")
    resolved = replace(settings, max_model_len=length)
    if not on_cpu:
        if settings.gpu_memory_utilization is None:
            resolved = replace(resolved, gpu_memory_utilization=GPU_MEMORY_UTILIZATION)
        return resolved
    if settings.gpu_memory_utilization is not None or environ.get(CPU_KV_ENV, "") != "" \
            or settings.kv_cache_memory_bytes is not None:
        # the user sized it: vLLM applies the fraction, or the environment's GiB over it
        return replace(resolved, gpu_memory_utilization=settings.gpu_memory_utilization or GPU_MEMORY_UTILIZATION)
    wanted = kv_bytes_per_token(llm_config, dtype_bytes) * length * settings.max_num_seqs
    cap = int(CPU_KV_SHARE_OF_FREE * (free_memory_bytes() if free_bytes is None else free_bytes))
    # vLLM needs room for one whole sequence at least; below that its own error says how much
    one_sequence = kv_bytes_per_token(llm_config, dtype_bytes) * length
    return replace(resolved, gpu_memory_utilization=GPU_MEMORY_UTILIZATION,
                   kv_cache_memory_bytes=max(min(wanted, cap), one_sequence))

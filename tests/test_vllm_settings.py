"""vLLM's start settings chosen for the model and machine (mcat_ds.infer.vllm_settings): no vLLM
needed, the choices are checked before an engine starts. tests/test_vllm.py starts engines on them."""

import json

import pytest

from mcat_ds.infer.vllm_settings import (
    CPU_KV_ENV,
    DEFAULT_MAX_MODEL_LEN,
    VllmSettings,
    kv_bytes_per_token,
    resolve_settings,
)

TINY = {"max_position_embeddings": 1024, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "hidden_size": 64}
GEMMA3_27B = {"model_type": "gemma3", "text_config": {
    "max_position_embeddings": 131072, "num_hidden_layers": 62, "num_attention_heads": 32,
    "num_key_value_heads": 16, "head_dim": 128, "hidden_size": 5376}}
GiB = 1 << 30


def llm_dir(tmp_path, config):
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_length_defaults_to_what_requests_need_at_most_the_models_limit(tmp_path):
    tiny = resolve_settings(VllmSettings(), llm_dir(tmp_path, TINY), 4, on_cpu=False)
    assert tiny.max_model_len == 1024  # vLLM refuses 2048 here (the old default)
    large = resolve_settings(VllmSettings(), llm_dir(tmp_path, GEMMA3_27B), 2, on_cpu=False)
    assert large.max_model_len == DEFAULT_MAX_MODEL_LEN  # not the 131,072 of vLLM's own default
    assert resolve_settings(VllmSettings(max_model_len=512), tmp_path, 2, on_cpu=False).max_model_len == 512
    with pytest.raises(ValueError, match="--max-model-len 200000 is above the 131072 positions"):
        resolve_settings(VllmSettings(max_model_len=200000), tmp_path, 2, on_cpu=False)


def test_gpu_keeps_vllms_memory_fraction(tmp_path):
    settings = resolve_settings(VllmSettings(), llm_dir(tmp_path, TINY), 2, on_cpu=False)
    assert settings.gpu_memory_utilization == 0.9 and settings.kv_cache_memory_bytes is None
    assert resolve_settings(VllmSettings(gpu_memory_utilization=0.5), tmp_path, 2,
                            on_cpu=False).gpu_memory_utilization == 0.5


def test_cpu_sizes_the_kv_cache_from_the_requests_and_the_free_memory(tmp_path):
    directory = llm_dir(tmp_path, TINY)
    per_token = kv_bytes_per_token(TINY, 4)
    assert per_token == 2 * 2 * 2 * 16 * 4
    small = resolve_settings(VllmSettings(max_num_seqs=8), directory, 4, on_cpu=True, free_bytes=8 * GiB, environ={})
    assert small.kv_cache_memory_bytes == per_token * 1024 * 8  # what 8 full sequences take: far below the cap
    big = resolve_settings(VllmSettings(), llm_dir(tmp_path, GEMMA3_27B), 2, on_cpu=True, free_bytes=8 * GiB,
                           environ={})
    assert big.kv_cache_memory_bytes == 4 * GiB  # half of what is free
    starved = resolve_settings(VllmSettings(), tmp_path, 2, on_cpu=True, free_bytes=1 << 20, environ={})
    assert starved.kv_cache_memory_bytes == kv_bytes_per_token(GEMMA3_27B, 2) * DEFAULT_MAX_MODEL_LEN


def test_cpu_leaves_memory_to_the_user_where_they_sized_it(tmp_path):
    directory = llm_dir(tmp_path, TINY)
    fraction = resolve_settings(VllmSettings(gpu_memory_utilization=0.2), directory, 4, on_cpu=True, environ={})
    assert (fraction.gpu_memory_utilization, fraction.kv_cache_memory_bytes) == (0.2, None)
    environment = resolve_settings(VllmSettings(), directory, 4, on_cpu=True, environ={CPU_KV_ENV: "2"})
    assert environment.kv_cache_memory_bytes is None  # vLLM reads its variable itself

"""Built-in architecture descriptions (HF config values) of the models MCAT is built on.

They serve two purposes: parameter counts of the real presets on the meta device without any
checkpoint at hand (``mcat describe``), and the shapes of the tiny random models that tests and the
demo write with ``save_pretrained`` and then load through the same path as real checkpoints.
Values are the public ``config.json`` files of the named checkpoints.
"""

from __future__ import annotations

from typing import Any

import transformers

WHISPER_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "whisper-large-v3": dict(
        d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
        decoder_layers=32, decoder_attention_heads=20, decoder_ffn_dim=5120,
        num_mel_bins=128, max_source_positions=1500, max_target_positions=448, vocab_size=51866,
    ),
    # 5 s windows (250 encoder frames); enough for the demo corpus's short utterances.
    "tiny-whisper": dict(
        d_model=64, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=256,
        decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=64,
        num_mel_bins=80, max_source_positions=250, max_target_positions=32, vocab_size=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
    ),
}

LLM_ARCHITECTURES: dict[str, dict[str, Any]] = {
    # GemmaX2-28-9B is Gemma2-9B continued-pretrained on 28 languages; same shapes.
    "gemmax2-9b": dict(
        model_type="gemma2", hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
        num_attention_heads=16, num_key_value_heads=8, head_dim=256, vocab_size=256000,
        sliding_window=4096, query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0, max_position_embeddings=8192, tie_word_embeddings=True,
        pad_token_id=0, eos_token_id=1, bos_token_id=2,
    ),
    # The text model inside gemma-3-27b-it (a Gemma3ForConditionalGeneration checkpoint).
    "gemma-3-27b-it": dict(
        model_type="gemma3_text", hidden_size=5376, intermediate_size=21504, num_hidden_layers=62,
        num_attention_heads=32, num_key_value_heads=16, head_dim=128, vocab_size=262208,
        sliding_window=1024, query_pre_attn_scalar=168, rope_theta=1_000_000.0,
        rope_local_base_freq=10_000.0, max_position_embeddings=131072, tie_word_embeddings=True,
        pad_token_id=0, eos_token_id=1, bos_token_id=2,
    ),
    "tiny-gemma2": dict(
        model_type="gemma2", hidden_size=128, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=2048,
        sliding_window=256, query_pre_attn_scalar=32, max_position_embeddings=1024,
        tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    ),
    "tiny-gemma3": dict(
        model_type="gemma3_text", hidden_size=128, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=2048,
        sliding_window=256, query_pre_attn_scalar=32, max_position_embeddings=1024,
        tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    ),
}

TOKENIZER_SIZES: dict[str, int] = {"gemmax2-9b": 256000, "gemma-3-27b-it": 262145}
"""Tokenizer lengths of the real checkpoints: language tags get the ids that follow."""


def _lookup(table: dict[str, dict[str, Any]], name: str, kind: str) -> dict[str, Any]:
    if name not in table:
        raise KeyError(f"unknown {kind} architecture {name!r}; built-in ones are {', '.join(table)}")
    return dict(table[name])


def whisper_config(name: str, **overrides: Any) -> transformers.WhisperConfig:
    return transformers.WhisperConfig(**{**_lookup(WHISPER_ARCHITECTURES, name, "encoder"), **overrides})


def llm_config(name: str, **overrides: Any) -> transformers.PretrainedConfig:
    values = {**_lookup(LLM_ARCHITECTURES, name, "LLM"), **overrides}
    model_type = values.pop("model_type")
    return transformers.AutoConfig.for_model(model_type, **values)

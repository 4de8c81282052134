"""Tiny random checkpoints in the real checkpoints' formats, for tests and the CPU demo.

They are written with ``save_pretrained`` (a Whisper checkpoint, a causal-LM checkpoint with its
tokenizer) and then loaded through exactly the path users take with whisper-large-v3 and GemmaX2.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from torch import nn

from mcat_ds.architectures import llm_config, whisper_config

# Gemma's special-token ids, so that tiny models exercise the same ids as the real ones.
SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>")


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (any script) that starts sequences with <bos> like Gemma's."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    bos = SPECIAL_TOKENS[2]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tokenizer.token_to_id(bos))]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )


def _pytorch_default_init(model: nn.Module) -> None:
    # HF's N(0, 0.02) leaves a tiny random encoder's output almost independent of its input.
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv1d)):
            module.reset_parameters()


def write_tiny_whisper(directory: Path, architecture: str = "tiny-whisper", seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = transformers.WhisperForConditionalGeneration(whisper_config(architecture))
    _pytorch_default_init(model.model.encoder)
    with torch.no_grad():
        # The sinusoidal position table would otherwise dominate a 64-wide encoder's output.
        model.model.encoder.embed_positions.weight.mul_(0.1)
    model.save_pretrained(directory)
    return directory


def write_tiny_llm(
    directory: Path,
    texts: Iterable[str],
    architecture: str = "tiny-gemma2",
    vocab_size: int = 2048,
    seed: int = 0,
    **config_overrides,
) -> Path:
    """A random causal LM with a tokenizer trained on ``texts``; its vocabulary is the tokenizer's."""
    tokenizer = train_tokenizer(texts, vocab_size)
    torch.manual_seed(seed)
    config = llm_config(
        architecture,
        **config_overrides,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_tiny_multimodal_gemma3(directory: Path, texts: Iterable[str], seed: int = 0) -> Path:
    """A tiny Gemma3ForConditionalGeneration (vision tower included) laid out like gemma-3-27b-it: the
    image tokens are the tokenizer's last ids and the embedding has a few spare rows beyond them."""
    tokenizer = train_tokenizer(texts, 2048)
    boi, eoi, image = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
    tokenizer.add_special_tokens({"additional_special_tokens": [boi, eoi, image]})
    torch.manual_seed(seed)
    text = llm_config("tiny-gemma3", vocab_size=len(tokenizer) + 5).to_dict()
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=28, patch_size=14)
    config = transformers.Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4,
        boi_token_index=tokenizer.convert_tokens_to_ids(boi),
        eoi_token_index=tokenizer.convert_tokens_to_ids(eoi),
        image_token_index=tokenizer.convert_tokens_to_ids(image),
    )
    transformers.Gemma3ForConditionalGeneration(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_random_checkpoint(root: Path) -> Path:
    """An MCAT checkpoint of the tiny preset over a tiny Whisper and Gemma-2 in ``root`` (random
    weights, seed 0; the tokenizer trained on the demo sentences, so that it writes non-ASCII text):
    what the fault campaign and the long-recording benchmark decode with."""
    from mcat_ds.build import build_model
    from mcat_ds.checkpoint import save_checkpoint
    from mcat_ds.data.demo import demo_texts
    from mcat_ds.presets import get_preset

    config = get_preset("tiny")
    config.model.encoder.checkpoint = str(write_tiny_whisper(root / "whisper"))
    config.model.llm.checkpoint = str(write_tiny_llm(root / "gemma2", demo_texts(), architecture="tiny-gemma2"))
    torch.manual_seed(0)
    model, tokenizer = build_model(config)
    return save_checkpoint(model, tokenizer, config, root / "checkpoint")

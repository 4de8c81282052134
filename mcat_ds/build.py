"""Build an :class:`MCATModel` from a config: real checkpoints from local directories, or the
built-in architectures on the meta device (parameter counts without allocating weights)."""

from __future__ import annotations

import contextlib

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from torch import nn
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from mcat_ds.architectures import TOKENIZER_SIZES, llm_config, whisper_config
from mcat_ds.config import MCATConfig, ModelConfig
from mcat_ds.languages import LANGUAGES
from mcat_ds.model.adapter import SpeechAdapter
from mcat_ds.model.attention import resolve_attn_implementation
from mcat_ds.model.encoder import SpeechEncoder
from mcat_ds.model.mcat import MCATModel

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Where a multimodal checkpoint keeps its language model, for each layout transformers has saved.
_MULTIMODAL_TEXT_PREFIXES = {
    "gemma3": ((r"^language_model\.model\.", "model."), (r"^model\.language_model\.", "model."),
               (r"^language_model\.lm_head\.", "lm_head."), (r"^lm_head\.", "lm_head.")),
}
_WHISPER_ENCODER_PREFIXES = ((r"^model\.encoder\.", ""), (r"^encoder\.", ""))


class CheckpointError(ValueError):
    pass


def _require_dir(path: str, what: str) -> Path:
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"{what} checkpoint directory {directory} does not exist")
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{what} checkpoint directory {directory} has no config.json")
    return directory


def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / shard for shard in shards]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory} holds no .safetensors weights (only safetensors are read)")
    return files


def _read_renamed(directory: Path, renames: tuple[tuple[str, str], ...]) -> dict[str, torch.Tensor]:
    """The tensors whose names match one of ``renames``' patterns, renamed; nothing else is read."""
    state = {}
    for file in _safetensors_files(directory):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                for pattern, replacement in renames:
                    if re.match(pattern, key):
                        state[re.sub(pattern, replacement, key, count=1)] = handle.get_tensor(key)
                        break
    return state


def _from_state(model_class, config, state: dict[str, torch.Tensor], dtype: torch.dtype, source: Path, **kwargs):
    """Instantiate through transformers (buffers, tied weights, attention implementation) from an
    already selected state dict, and refuse to run with weights missing."""
    model, info = model_class.from_pretrained(
        None, config=config, state_dict=state, dtype=dtype, output_loading_info=True, **kwargs
    )
    missing = [key for key in info["missing_keys"] if not key.startswith("lm_head.")]
    if missing:
        raise CheckpointError(f"{source}: weights missing for {len(missing)} parameters, e.g. {sorted(missing)[:3]}")
    return model


def load_whisper_encoder(path: str, dtype: torch.dtype) -> WhisperEncoder:
    """Only the encoder of a Whisper checkpoint (the decoder is never read)."""
    directory = _require_dir(path, "Whisper")
    config = transformers.AutoConfig.from_pretrained(directory)
    if config.model_type != "whisper":
        raise CheckpointError(f"{directory} is a {config.model_type!r} checkpoint, not Whisper")
    state = _read_renamed(directory, _WHISPER_ENCODER_PREFIXES)
    return _from_state(WhisperEncoder, config, state, dtype, directory)


def load_causal_lm(path: str, dtype: torch.dtype, attn_implementation: str) -> transformers.PreTrainedModel:
    """A causal LM; from a multimodal checkpoint (gemma-3-27b-it) only its language model is read."""
    directory = _require_dir(path, "LLM")
    config = transformers.AutoConfig.from_pretrained(directory)
    text_config = getattr(config, "text_config", None)
    attn_implementation = resolve_attn_implementation(attn_implementation, text_config or config)
    if text_config is None:
        return transformers.AutoModelForCausalLM.from_pretrained(
            directory, dtype=dtype, attn_implementation=attn_implementation, use_safetensors=True
        )
    if config.model_type not in _MULTIMODAL_TEXT_PREFIXES:
        raise CheckpointError(
            f"{directory} is a multimodal {config.model_type!r} checkpoint; the language model can be "
            f"extracted from {', '.join(_MULTIMODAL_TEXT_PREFIXES)} checkpoints"
        )
    model_class = transformers.AutoModelForCausalLM._model_mapping[type(text_config)]
    state = _read_renamed(directory, _MULTIMODAL_TEXT_PREFIXES[config.model_type])
    return _from_state(model_class, text_config, state, dtype, directory, attn_implementation=attn_implementation)


def language_tag_ids(tokenizer) -> dict[str, int]:
    return {language.code: tokenizer.convert_tokens_to_ids(language.tag) for language in LANGUAGES}


def add_language_tags(tokenizer) -> dict[str, int]:
    """Add the 70 tags as single, non-special tokens (decoding keeps them) in table order, so that
    their ids are the same for every checkpoint of one base tokenizer."""
    tokens = [transformers.AddedToken(language.tag, normalized=False, special=False) for language in LANGUAGES]
    tokenizer.add_tokens(tokens)
    return language_tag_ids(tokenizer)


def _tag_text_pieces(tokenizer) -> dict[str, list[int]]:
    return {language.code: tokenizer(language.tag, add_special_tokens=False)["input_ids"] for language in LANGUAGES}


def _initialise_tag_rows(llm: nn.Module, tag_ids: dict[str, int], text_pieces: dict[str, list[int]],
                         how: str = "pieces") -> None:
    """``pieces``: a new tag row starts as the mean embedding of the tag's text pieces, a point the
    LLM already reads as that string rather than noise. ``random``: a Gaussian row whose norm is the
    mean norm of the existing rows (drawn from torch's global generator, seeded by the trainer)."""
    weight = llm.get_input_embeddings().weight
    with torch.no_grad():
        if how == "random":
            existing = [row for row in range(weight.shape[0]) if row not in set(tag_ids.values())]
            norm = weight[existing].float().norm(dim=1).mean()
            rows = torch.randn(len(tag_ids), weight.shape[1])
            rows = rows / rows.norm(dim=1, keepdim=True) * norm
            for index, row in enumerate(tag_ids.values()):
                weight[row] = rows[index].to(weight.device, weight.dtype)
            return
        for code, row in tag_ids.items():
            weight[row] = weight[text_pieces[code]].float().mean(dim=0).to(weight.dtype)


class _ProbeDone(Exception):
    pass


def inputs_embeds_scale(llm: nn.Module, width: int) -> float:
    """The factor the LLM applies to ``inputs_embeds`` before its first decoder layer, measured."""
    first_layer = next(m for name, m in llm.named_modules() if re.search(r"\blayers\.0$", name))
    captured = {}

    def capture(module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]
        raise _ProbeDone

    probe = torch.ones(1, 1, width, dtype=next(llm.parameters()).dtype, device=next(llm.parameters()).device)
    handle = first_layer.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            llm(inputs_embeds=probe, use_cache=False)
    except _ProbeDone:
        pass
    finally:
        handle.remove()
    return float(captured["hidden"].float().mean())


def _embedding_module_scale(llm: nn.Module) -> float:
    scale = getattr(llm.get_input_embeddings(), "embed_scale", 1.0)
    return float(scale)


@dataclass
class Tokenizer:
    """The LLM's tokenizer with the language tags resolved."""

    hf: transformers.PreTrainedTokenizerBase
    tag_ids: dict[str, int]


def _wrap_with_lora(llm: nn.Module, config: ModelConfig, tag_ids: dict[str, int]):
    trainable_rows = {
        "none": None,
        "tags": sorted(set(tag_ids.values())) if config.llm.language_tags == "special" else None,
        "all": list(range(llm.get_input_embeddings().weight.shape[0])),
    }[config.llm.train_embeddings]
    lora = LoraConfig(
        task_type="CAUSAL_LM",
        r=config.lora.rank,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=list(config.lora.target_modules),
        trainable_token_indices=trainable_rows,
    )
    with warnings.catch_warnings():
        # peft (0.21) reads the attribute transformers 5.x deprecated; the warning is peft's to fix
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(llm, lora)


def _resize_for_tags(llm: nn.Module, tag_ids: dict[str, int]) -> None:
    needed = max(tag_ids.values(), default=-1) + 1
    if needed > llm.get_input_embeddings().weight.shape[0]:
        llm.resize_token_embeddings(needed, mean_resizing=False)


def _speech_input_scale(llm: nn.Module, speech_scale: str) -> float:
    width = llm.get_input_embeddings().weight.shape[1]
    internal = inputs_embeds_scale(llm, width)
    wanted = _embedding_module_scale(llm) * internal if speech_scale == "token" else 1.0
    return wanted / internal


def build_model(config: MCATConfig) -> tuple[MCATModel, Tokenizer]:
    """The model from local checkpoints, with a fresh adapter and fresh LoRA, on CPU."""
    model_config = config.model
    if model_config.encoder.checkpoint is None:
        raise CheckpointError("model.encoder.checkpoint is not set (a local Whisper checkpoint directory)")
    if model_config.llm.checkpoint is None:
        raise CheckpointError("model.llm.checkpoint is not set (a local causal-LM checkpoint directory)")
    whisper = load_whisper_encoder(model_config.encoder.checkpoint, DTYPES[model_config.encoder.dtype])
    llm = load_causal_lm(
        model_config.llm.checkpoint, DTYPES[model_config.llm.dtype], model_config.llm.attn_implementation
    )
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(model_config.llm.checkpoint)
    tag_ids = {}
    if model_config.llm.language_tags == "special":
        text_pieces = _tag_text_pieces(hf_tokenizer)
        tag_ids = add_language_tags(hf_tokenizer)
        _resize_for_tags(llm, tag_ids)
        _initialise_tag_rows(llm, tag_ids, text_pieces, model_config.llm.tag_init)
    speech_input_scale = _speech_input_scale(llm, model_config.llm.speech_scale)
    model = _assemble(model_config, whisper, llm, speech_input_scale, tag_ids,
                      hf_tokenizer.pad_token_id, hf_tokenizer.eos_token_id, config.optim.tag_loss_weight)
    return model, Tokenizer(hf_tokenizer, tag_ids)


def build_meta_model(config: MCATConfig) -> MCATModel:
    """The model on the meta device: shapes and parameter counts; no weights are read or allocated. The
    built-in architectures stand in for checkpoints that are not given; tags take the ids after the
    base tokenizer's."""
    return build_model_skeleton(config)


def build_model_skeleton(config: MCATConfig, device: str | torch.device = "meta", llm_layers: int | None = None,
                         encoder_layers: int | None = None, dtype: torch.dtype | None = None) -> MCATModel:
    """``build_meta_model`` on any device: on a real one the weights are freshly initialized there
    (random models of real sizes for benchmarks, allocated straight on the GPU), optionally with only
    the first ``llm_layers`` / ``encoder_layers`` layers, and in ``dtype`` from the start (a 27B
    model built in fp32 and then cast would need twice its bf16 memory, and the time to fill it)."""
    model_config = config.model
    with torch.device(device), _default_dtype(dtype):
        if model_config.encoder.checkpoint is None:
            encoder_config = whisper_config(model_config.encoder.architecture)
        else:
            encoder_config = transformers.AutoConfig.from_pretrained(_require_dir(model_config.encoder.checkpoint, "Whisper"))
        if encoder_layers:
            encoder_config.encoder_layers = encoder_layers
        whisper = WhisperEncoder(encoder_config)
        if model_config.llm.checkpoint is None:
            config_for_llm = llm_config(model_config.llm.architecture)
            base_size = TOKENIZER_SIZES.get(model_config.llm.architecture, config_for_llm.vocab_size)
        else:
            directory = _require_dir(model_config.llm.checkpoint, "LLM")
            loaded = transformers.AutoConfig.from_pretrained(directory)
            config_for_llm = getattr(loaded, "text_config", None) or loaded
            base_size = len(transformers.AutoTokenizer.from_pretrained(directory))
        if llm_layers:
            config_for_llm.num_hidden_layers = llm_layers
            if getattr(config_for_llm, "layer_types", None):
                config_for_llm.layer_types = config_for_llm.layer_types[:llm_layers]
        llm = transformers.AutoModelForCausalLM.from_config(
            config_for_llm, attn_implementation=resolve_attn_implementation(model_config.llm.attn_implementation, config_for_llm))
        tag_ids = {}
        if model_config.llm.language_tags == "special":
            tag_ids = {language.code: base_size + index for index, language in enumerate(LANGUAGES)}
            _resize_for_tags(llm, tag_ids)
        return _assemble(model_config, whisper, llm, 1.0, tag_ids,
                         llm.config.pad_token_id, llm.config.eos_token_id)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype | None):
    if dtype is None:
        yield
        return
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _assemble(model_config: ModelConfig, whisper: nn.Module, llm: nn.Module, speech_input_scale: float,
              tag_ids: dict[str, int], pad_token_id: int, eos_token_id: int, tag_loss_weight: float = 1.0) -> MCATModel:
    encoder = SpeechEncoder(whisper)
    width = llm.get_input_embeddings().weight.shape[1]
    adapter = SpeechAdapter(model_config.adapter, encoder.width, width)
    return MCATModel(
        encoder,
        adapter,
        _wrap_with_lora(llm, model_config, tag_ids),
        speech_input_scale=speech_input_scale,
        mask_padding_frames=model_config.adapter.mask_padding_frames,
        loss_implementation=model_config.llm.loss_implementation,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        tag_token_ids=tuple(sorted(set(tag_ids.values()))),
        tag_loss_weight=tag_loss_weight,
    )


@dataclass(frozen=True)
class ParameterCounts:
    total: int
    trainable: int
    encoder: int
    adapter: int
    llm: int
    """The base LLM's own weights (embedding rows added for tags included), frozen."""
    lora: int
    """Everything peft adds and trains: LoRA matrices and trainable embedding rows."""


def count_parameters(model: MCATModel) -> ParameterCounts:
    def numel(parameters) -> int:
        return sum(p.numel() for p in parameters)

    encoder = numel(model.encoder.parameters())
    adapter = numel(model.adapter.parameters())
    llm_all = list(model.llm.parameters())
    lora = numel(p for p in llm_all if p.requires_grad)
    llm = numel(p for p in llm_all if not p.requires_grad)
    trainable = numel(p for p in model.parameters() if p.requires_grad)
    return ParameterCounts(encoder + adapter + llm + lora, trainable, encoder, adapter, llm, lora)

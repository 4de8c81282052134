"""Typed configuration: one dataclass per concern, composed into :class:`MCATConfig`.

Presets (``mcat_ds.presets``) build an :class:`MCATConfig` in code; users change it with
``key=value`` overrides (``model.lora.rank=32``) or a JSON/TOML file holding the same nested keys.
Both reject unknown keys and values of the wrong type, naming the key and what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Task = Literal["asr", "smt", "srt"]


@dataclass
class EncoderConfig:
    """The frozen Whisper encoder."""

    checkpoint: str | None = None
    """Local Whisper checkpoint directory (e.g. whisper-large-v3). Only its encoder is loaded."""
    architecture: str = "whisper-large-v3"
    """Built-in architecture used when no checkpoint is given (parameter counts, random tiny models)."""
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"


@dataclass
class AdapterConfig:
    """Speech adapter: Q-Former over the encoder states, average pooling, MLP, LayerNorm.

    The defaults are the release's "qqm" adapter: a BLIP-2 Q-Former (default config, 8 layers,
    cross-attention every 2nd layer) with 150 learned queries, pooled by 5 into 30 tokens.
    """

    num_queries: int = 150
    hidden_size: int = 768
    num_layers: int = 8
    num_heads: int = 12
    intermediate_size: int = 3072
    cross_attention_every: int = 2
    """A layer has cross-attention to the speech when ``layer_index % cross_attention_every == 0``."""
    pool_stride: int = 5
    """Queries averaged per speech token; a remainder (num_queries % stride) is dropped."""
    mlp_hidden_size: int = 2560
    dropout: float = 0.1
    """Dropout on the Q-Former's hidden states (BLIP-2's hidden_dropout_prob)."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities. BLIP-2 (and so the release) trains with 0.1; the fused
    kernels have none, so a non-zero value runs cross-attention on the PyTorch path."""
    layer_norm_eps: float = 1e-12
    output_norm_eps: float = 1e-5
    init: Literal["blip2", "torch"] = "blip2"
    """``blip2``: BLIP-2's N(0, 0.02) for the Q-Former linears; ``torch``: PyTorch's default init."""
    query_init_std: float = 1.0
    kernels: Literal["auto", "triton", "torch"] = "auto"
    """Cross-attention and the pooling epilogue: the Triton kernels (``auto``: on CUDA) or PyTorch."""
    kv_projection: Literal["varlen", "per_layer"] = "varlen"
    """``varlen``: the K/V projections of all cross-attention layers as one GEMM over the valid encoder
    frames only; ``per_layer``: each layer projects every frame of the window, padding included."""
    mask_padding_frames: bool = True
    """Mask encoder frames past the audio's end in cross-attention. The release passes an all-ones
    mask (every utterance is padded to 30 s first), so set False to reproduce release checkpoints
    exactly."""


@dataclass
class LLMConfig:
    """The language model, tuned with LoRA."""

    checkpoint: str | None = None
    """Local HF causal-LM directory (Gemma2, Gemma3 text or multimodal, ...)."""
    architecture: str = "gemmax2-9b"
    """Built-in architecture used when no checkpoint is given (parameter counts, random tiny models)."""
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    attn_implementation: str = "auto"
    """``auto``: flash-attn when installed on CUDA, else FlexAttention on CUDA, else SDPA where it
    keeps the architecture's numerics, else eager (see ``mcat_ds.model.attention``); or any
    transformers implementation name."""
    loss_implementation: Literal["auto", "liger", "chunked"] = "auto"
    """LM head + cross-entropy fused over label tokens without materialising the logits (see
    ``mcat_ds.model.loss``): ``auto`` is liger-kernel on CUDA when installed, else chunked PyTorch."""
    language_tags: Literal["special", "text"] = "special"
    """``special``: each ``<|xxx|>`` tag is one new token whose embedding trains; ``text``: tags are
    ordinary text split by the tokenizer, as in the release (needed to load release checkpoints)."""
    tag_init: Literal["pieces", "random"] = "pieces"
    """How a new tag row starts: ``pieces``, the mean embedding of the tag's text pieces (a point a
    pretrained LLM already reads as that string); ``random``, a random row of the embedding's own
    scale, the tags nearly orthogonal to each other (for random base models, whose pieces mean
    nothing: their means leave the 70 tags ~0.7 cosine-similar, one more thing to unlearn)."""
    train_embeddings: Literal["none", "tags", "all"] = "tags"
    """Which token-embedding rows train (tied with the LM head): none, only the new tag rows, or every
    row (tiny random models cannot learn with frozen random embeddings)."""
    speech_scale: Literal["token", "none"] = "token"
    """How speech embeddings are scaled on entry to the LLM. ``token``: like token embeddings
    (Gemma multiplies by sqrt(hidden)), as the release did on Gemma2 under transformers 4.x;
    ``none``: unscaled, as the release did on Gemma3."""


@dataclass
class LoRAConfig:
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")


@dataclass
class ModelConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    languages: str = "L28"
    """Languages the model serves: a named set (L2/L28/L44/L70), codes ``eng,deu``, or ``@file``."""


@dataclass
class DataConfig:
    path: str | None = None
    """Prepared training shards (``mcat prepare``); the built-in demo corpus when None."""
    validation: str | None = None
    """Prepared held-out shards for the periodic validation loss (the demo's dev split when None and
    training on the demo corpus)."""
    num_workers: int = 4
    features: Literal["worker", "device"] = "device"
    """Where log-mel features are computed: in the DataLoader workers, or batched on the model's device."""
    packing: bool = True
    """Training micro-batches as one padding-free row of sequences (attention stays within each);
    False pads every sequence to the longest of the micro-batch."""
    seed: int = 0


@dataclass
class OptimConfig:
    """AdamW over the trainable parameters; the release's values."""

    lr: float = 5e-5
    warmup_steps: int = 1000
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    schedule: Literal["constant", "cosine"] = "constant"
    """After warmup: keep lr, or (cosine) decay it to ``min_lr_ratio * lr`` by the end of the stage,
    starting at ``decay_start`` (a fraction of the stage's steps)."""
    min_lr_ratio: float = 0.05
    decay_start: float = 0.0
    tag_loss_weight: float = 1.0
    """How many tokens' worth a language-tag label counts in the training loss (a weighted mean;
    validation is unweighted). SRT's target tag decides the whole translation's language while
    being one token of a long target; weighting it makes that decision a real part of the loss."""


@dataclass
class StageConfig:
    """One curriculum phase (paper Algorithm 1); ``mcat_ds.curriculum`` defines the stages."""

    name: str = "srt"
    task: Task = "srt"
    languages: str = "L28"
    max_per_language: int | None = None
    """Balanced ASR: at most this many samples per language (seeded choice)."""
    max_per_direction: int | None = None
    """Balanced SRT: at most this many samples per translation direction (seeded choice)."""
    targets_per_utterance: int = 1
    """SMT/SRT without a direction cap: target languages drawn per utterance and epoch."""
    init_from: str | None = None
    """The stage whose final checkpoint this one starts from (None: from the base models)."""
    max_steps: int | None = None
    """Optimizer steps in the stage; None: ``epochs`` passes over the stage's plan."""
    epochs: float = 1.0
    micro_batch_size: int = 3
    """Examples per rank per forward pass (the release trained with 3 per GPU)."""
    grad_accum_steps: int = 1
    save_every: int = 500
    """Optimizer steps between resumable checkpoints."""
    eval_every: int = 500
    """Optimizer steps between validation losses (0: never)."""
    min_tag_accuracy: float | None = None
    """SRT: the stage fails (exit code 3, its state saved) when its final ``val_tag_accuracy`` (the
    copied target tag, teacher-forced on the validation data) is below this fraction, rather than
    handing a model that ignores the target language to the next stage."""


@dataclass
class RuntimeConfig:
    """How the stage runs: engine, memory trade-offs, checkpoint retention."""

    engine: str = "zero2_bf16"
    """A file in ds_configs/ (name without .json) or a path to a DeepSpeed JSON of engine settings."""
    gradient_checkpointing: bool = True
    """Recompute the LLM's activations in backward (memory for compute)."""
    checkpointing_policy: Literal["selective", "full"] = "selective"
    """With gradient_checkpointing: ``selective`` keeps matmul and attention outputs and recomputes
    the elementwise rest; ``full`` keeps only each layer's input (see ``mcat_ds.model.checkpointing``)."""
    precision_on_cpu: Literal["fp32", "engine"] = "fp32"
    """Without a GPU: ``fp32`` turns the engine file's bf16 off (what CPU runs want); ``engine`` keeps
    it, so a CPU run has the GPU's dtypes (bf16 engine and weights, fp32 masters): what the tests use
    to exercise the GPU configuration without a GPU."""
    keep_checkpoints: int = 2
    accept_changed_data: bool = False
    """Resume a stage although the data its checkpoint's position counts in changed (another index,
    seed, selection or batch size): the position is kept as a count of examples. Off, such a resume
    stops and names what changed."""
    seed: int = 0
    threads_per_rank: int = 1
    """PyTorch math threads per rank. Fixed rather than derived from the host's core count: the
    thread count splits reductions, so it is part of what makes two runs bit-identical. On a GPU the
    ranks do little CPU math; a CPU-only run with cores to spare may raise it (and records it)."""


@dataclass
class GenerationConfig:
    """How ``mcat translate`` decodes with this checkpoint unless its flags say otherwise. Kept in the
    checkpoint, so that a model is decoded the way it was meant to be (an imported release checkpoint
    carries the release's settings)."""

    beams: int = 1
    max_new_tokens: int = 256
    no_repeat_ngram_size: int = 0
    """0: plain greedy / beam search; the release decodes with 5."""


@dataclass
class MCATConfig:
    preset: str = "small-9b"
    curriculum: tuple[str, ...] = (
        "asr-l2", "asr-l28", "asr-l44", "asr-l70", "asr-balanced", "smt", "srt", "srt-balanced",
    )
    """The stages this run goes through, in order (``mcat_ds.curriculum.STAGES``)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


class ConfigError(ValueError):
    pass


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def from_dict(cls: type, values: dict[str, Any], *, where: str = "") -> Any:
    """Build ``cls`` from a nested dict, as strict as overrides are."""
    config = cls()
    apply_mapping(config, values, where=where)
    return config


def apply_overrides(config: Any, overrides: list[str]) -> Any:
    """Apply ``dotted.key=value`` strings in order; values are parsed by the field's type."""
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {override!r} is not of the form key=value (e.g. model.lora.rank=32)")
        set_value(config, key.strip(), raw.strip(), parse_text=True)
    return config


def apply_file(config: Any, path: str | Path) -> Any:
    """Apply a JSON or TOML file of nested keys."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        values = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as error:
        raise ConfigError(f"{path}: not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: {error}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config sections")
    return apply_mapping(config, values, where=f"{path}: ")


def apply_mapping(config: Any, values: dict[str, Any], *, where: str = "", prefix: str = "") -> Any:
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        try:
            if isinstance(value, dict) and _is_section(config, dotted):
                apply_mapping(config, value, where=where, prefix=f"{dotted}.")
            else:
                set_value(config, dotted, value, parse_text=False)
        except ConfigError as error:
            message = str(error)
            raise ConfigError(message if message.startswith(where) else f"{where}{message}") from None
    return config


def _is_section(config: Any, dotted: str) -> bool:
    parent, name = _resolve_parent(config, dotted)
    return dataclasses.is_dataclass(getattr(parent, name))


def _resolve_parent(config: Any, dotted: str) -> tuple[Any, str]:
    """The dataclass holding the last part of ``dotted`` and that part's name."""
    parts = dotted.split(".")
    node = config
    for depth, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(node)]
        if part not in names:
            where = ".".join(parts[:depth]) or "the top level"
            close = difflib.get_close_matches(part, names, n=3)
            hint = f"; did you mean {', '.join('.'.join(parts[:depth] + [c]) for c in close)}?" if close else ""
            raise ConfigError(f"unknown config key {dotted!r}: {where} has {', '.join(names)}{hint}")
        if depth == len(parts) - 1:
            return node, part
        node = getattr(node, part)
        if not dataclasses.is_dataclass(node):
            raise ConfigError(f"unknown config key {dotted!r}: {'.'.join(parts[:depth + 1])} is a value, not a section")
    raise AssertionError("unreachable")


def set_value(config: Any, dotted: str, value: Any, *, parse_text: bool) -> None:
    parent, name = _resolve_parent(config, dotted)
    hints = typing.get_type_hints(type(parent))
    expected = hints[name]
    if dataclasses.is_dataclass(expected):
        raise ConfigError(f"config key {dotted!r} is a section; set one of its fields ({dotted}.<field>=...)")
    setattr(parent, name, _coerce(value, expected, dotted, parse_text))


def _coerce(value: Any, expected: Any, key: str, parse_text: bool) -> Any:
    origin = typing.get_origin(expected)
    args = typing.get_args(expected)
    if origin in (typing.Union, types.UnionType):
        if value is None or (parse_text and isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, key, parse_text)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {_describe(expected)}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{key}: expected one of {', '.join(map(repr, args))}, got {value!r}")
    if origin is tuple:
        items = value
        if parse_text and isinstance(value, str):
            items = [item.strip() for item in value.split(",") if item.strip()]
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{key}: expected a list ({_describe(expected)}), got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(item, args[0], key, parse_text) for item in items)
        if len(items) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values ({_describe(expected)}), got {len(items)}")
        return tuple(_coerce(item, arg, key, parse_text) for item, arg in zip(items, args))
    if expected is bool:
        if isinstance(value, bool):
            return value
        if parse_text and isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if parse_text and isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if expected is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if parse_text and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if expected is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported config type {expected!r}")


def _describe(expected: Any) -> str:
    origin = typing.get_origin(expected)
    if origin is tuple:
        args = typing.get_args(expected)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"comma-separated {args[0].__name__} values"
        return ", ".join(a.__name__ for a in args)
    return getattr(expected, "__name__", str(expected))

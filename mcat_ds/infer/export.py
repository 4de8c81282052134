"""``mcat export``: an MCAT checkpoint as plain Hugging Face checkpoints, for serving engines.

    DIR/llm/       the LLM with LoRA merged into its weights and the 70 tag rows in its (tied)
                   embedding, and the tokenizer with the tags: AutoModelForCausalLM.from_pretrained
                   loads it (for gemma-3-27b-it a text-only Gemma3ForCausalLM, no vision tower)
    DIR/speech/    encoder/ (the Whisper encoder, save_pretrained), adapter.safetensors, speech.json
    DIR/           config.json, generation_config.json, the tokenizer and chat_template.jinja: what
                   vLLM reads to serve the export as one native audio-in model
                   (``mcat_ds.infer.vllm_model``)

vLLM loads ``DIR`` itself as an ``MCATForConditionalGeneration`` (``vllm.LLM(model=DIR)``, ``vllm
serve DIR``): ``config.json`` is the LLM's config with that architecture and the speech side's facts
under ``mcat_speech`` (:class:`NativeSpeechConfig`). The weights are not copied to the root, where
vLLM looks by default: the model class points vLLM's loader at ``llm/`` and ``speech/`` (27B of
weights exist once). ``generation_config.json`` names only the tokenizer's end-of-sequence, so vLLM
stops where our engines stop and not at another id the base model's generation config lists.

``speech.json`` says how the speech rows join the prompt: the adapter's config, the number of speech
tokens, the scale for transformers' ``inputs_embeds`` in this environment and the scale the first
decoder layer must see (vLLM merges speech rows at the first layer as given), the tag
ids, the end-of-sequence id, the checkpoint's generation settings, and the fingerprint of the
checkpoint's content (``mcat_ds.checkpoint.checkpoint_fingerprint``), by which a later run tells
whether the export still is of the checkpoint at that path. ``mcat translate --engine vllm`` serves
an export (see ``mcat_ds.infer.vllm_engine``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from mcat_ds.build import inputs_embeds_scale
from mcat_ds.checkpoint import checkpoint_fingerprint, load_checkpoint
from mcat_ds.config import AdapterConfig, GenerationConfig, from_dict
from mcat_ds.files import building_directory, read_json_object
from mcat_ds.languages import LANGUAGES
from mcat_ds.model.adapter import SpeechAdapter
from mcat_ds.model.attention import dense_attn_implementation
from mcat_ds.model.encoder import SpeechEncoder

LLM_DIR = "llm"
SPEECH_DIR = "speech"
SPEECH_FILE = "speech.json"
ENCODER_DIR = "encoder"
ADAPTER_FILE = "adapter.safetensors"
FORMAT = "mcat-export"
FORMAT_VERSION = 1
NATIVE_ARCHITECTURE = "MCATForConditionalGeneration"
"""The architecture name the root ``config.json`` gives vLLM (registered by ``mcat_ds.infer.vllm_plugin``)."""
NATIVE_LLM_ARCHITECTURES = ("Gemma2ForCausalLM", "Gemma3ForCausalLM")
"""vLLM classes the native model builds its LLM half with (the merged LLM's own architecture)."""
NATIVE_CONFIG_KEY = "mcat_speech"
"""The key of :class:`NativeSpeechConfig` in the root ``config.json``."""
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# what readers of speech.json look up; eos_token_id and checkpoint_fingerprint came later and may be absent
DESCRIPTION_KEYS = ("exported_from", "dtype", "adapter", "encoder_width", "llm_width", "num_speech_tokens",
                    "mask_padding_frames", "speech_input_scale", "speech_first_layer_scale", "language_tags",
                    "language_tag_ids", "generation")
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{% if message['content'] is string %}"
                 "{{ message['content'] }}{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}"
                 "{{ part['text'] }}{% endif %}{% endfor %}{% endif %}{% endfor %}")
"""For vLLM's chat endpoint (``--chat-template DIR/chat_template.jinja``): MCAT's prompt is BOS and the
tags, no turns, so the user's text parts and nothing else (the speech positions go before BOS by
themselves). Gemma's own template would wrap them in turns MCAT never saw."""


@dataclass(frozen=True)
class NativeSpeechConfig:
    """What the native vLLM model needs beyond the LLM's own config, kept in the root ``config.json``
    (vLLM hands a model its config, not the export's other files)."""

    llm_architecture: str
    """vLLM's class for the LLM half: ``Gemma2ForCausalLM`` or ``Gemma3ForCausalLM``."""
    encoder: dict[str, Any]
    """The Whisper encoder's config (``WhisperConfig.to_dict()``)."""
    adapter: dict[str, Any]
    encoder_width: int
    llm_width: int
    num_speech_tokens: int
    mask_padding_frames: bool
    speech_first_layer_scale: float
    """vLLM multiplies token embeddings by Gemma's normaliser but merges speech rows as given, so
    they must come at the scale the first decoder layer sees (as for ``--engine vllm``)."""
    placeholder_token_id: int
    """The id the speech positions carry (the pad id, as in training); vLLM overwrites their rows."""
    languages: list[str]
    """The ISO 639-3 codes the model has tags for."""
    no_repeat_ngram_size: int = 0
    """The checkpoint's decoding setting, which vLLM's no-repeat processor applies to requests that do
    not set their own (``mcat_ds.infer.vllm_no_repeat``)."""
    llm_weights: str = f"{LLM_DIR}/*.safetensors"
    """Glob under the export root of the LLM's weights."""
    encoder_weights: str = f"{SPEECH_DIR}/{ENCODER_DIR}"
    """Folder under the export root of the encoder's safetensors."""
    adapter_weights: str = f"{SPEECH_DIR}/{ADAPTER_FILE}"

    @classmethod
    def read(cls, export_dir: str | Path) -> NativeSpeechConfig:
        """From an export's root ``config.json``."""
        config_file = Path(export_dir) / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{export_dir}: no config.json at its root, so vLLM cannot serve it: exports of "
                                    f"{' or '.join(NATIVE_LLM_ARCHITECTURES)} models by this version have one; "
                                    "export the checkpoint again")
        return cls.from_hf_config(SimpleNamespace(**json.loads(config_file.read_text(encoding="utf-8"))))

    @classmethod
    def from_hf_config(cls, hf_config) -> NativeSpeechConfig:
        facts = getattr(hf_config, NATIVE_CONFIG_KEY, None)
        if not isinstance(facts, dict):
            raise ValueError(f"the model's config.json has no {NATIVE_CONFIG_KEY!r}: not an mcat export's root")
        names = {field.name for field in fields(cls)}
        missing = sorted(name for name in names if name not in facts and getattr(cls, name, None) is None)
        if missing:
            raise ValueError(f"config.json: {NATIVE_CONFIG_KEY}: damaged, {', '.join(missing)} missing")
        return cls(**{key: value for key, value in facts.items() if key in names})


@contextlib.contextmanager
def _export_lock(out: Path):
    """Hold ``<out>.lock`` exclusively: one export to ``out`` at a time on this host (and across hosts
    where the filesystem honours flock). The lock file stays; it holds nothing."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(f"{out.name}.lock"), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"mcat export: another export to {out} is running; waiting for it", file=sys.stderr, flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def export_checkpoint(checkpoint: str | Path, out: str | Path, dtype: str = "bfloat16", *,
                      encoder_checkpoint: str | None = None, llm_checkpoint: str | None = None) -> Path:
    """Write ``out`` (see the module docstring) from an MCAT checkpoint; written to a sibling first
    and renamed, so a failed export never leaves a half directory under ``out``. Exports to one
    ``out`` take turns; one that finds ``out`` written by the export it waited for returns it when it
    matches the checkpoint and dtype (see :func:`export_matches`)."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: one of {', '.join(DTYPES)}")
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; export writes a new directory")
    with _export_lock(out):
        if out.exists():
            difference = export_matches(out, checkpoint, dtype) if is_export(out) else f"{out} is not an mcat export"
            if difference is None:
                return out
            raise FileExistsError(f"{out} was written while this export waited for it, and differs: {difference}")
        # hashed before loading: a checkpoint rewritten meanwhile then fails to match, never the reverse
        fingerprint = checkpoint_fingerprint(checkpoint)
        model, tokenizer, config = load_checkpoint(checkpoint, encoder_checkpoint=encoder_checkpoint,
                                                   llm_checkpoint=llm_checkpoint)
        model.eval()
        width = model.llm.get_input_embeddings().weight.shape[1]
        first_layer_scale = inputs_embeds_scale(model.llm, width) * model.speech_input_scale
        # under the lock no other export to out runs on this host, but one on another host may
        # (flock need not reach across nodes): only this host's dead writers' folders go
        with building_directory(out) as staging:  # a failed export leaves no tens of GB behind
            _write_export(model, tokenizer, config, checkpoint, fingerprint, staging, dtype, first_layer_scale, width)
    return out


def export_matches(export_dir: str | Path, checkpoint: str | Path, dtype: str) -> str | None:
    """None when ``export_dir`` is an export of the checkpoint's current content in ``dtype``; else
    what differs, in words. Exports made before speech.json recorded the checkpoint's fingerprint
    never match: whether the checkpoint was retrained since is unknown."""
    description = read_export_description(export_dir)
    exported_from = str(description["exported_from"])
    if description["dtype"] != dtype:
        return f"{export_dir} holds an export in {description['dtype']}, not {dtype}"
    stored = description.get("checkpoint_fingerprint")
    if stored is None:
        same_path = Path(exported_from).resolve() == Path(checkpoint).resolve()
        return (f"{export_dir} was exported from {exported_from}"
                f"{' (this path)' if same_path else f', not {checkpoint}'} by a version that did not record the "
                "checkpoint's fingerprint, so whether it holds the checkpoint's current weights is unknown: "
                "export again")
    current = checkpoint_fingerprint(checkpoint)
    if stored != current:
        return (f"{export_dir} was exported from {exported_from} with content fingerprint {stored}, but "
                f"{checkpoint} now has {current} (retrained, or another checkpoint): export again")
    return None


def _write_export(model, tokenizer, config, checkpoint, fingerprint: str, staging: Path, dtype: str,
                  first_layer_scale: float, width: int) -> None:
    llm = _write_weights(model, staging, dtype)
    tokenizer.hf.save_pretrained(staging / LLM_DIR)
    speech = staging / SPEECH_DIR
    description: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "exported_from": str(checkpoint),
        "checkpoint_fingerprint": fingerprint,
        "dtype": dtype,
        "llm_architectures": llm.config.architectures,
        # what to pass as attn_implementation when loading llm/ with transformers: some versions
        # run Gemma2 under SDPA by default and silently drop its attention soft-cap
        "hf_attn_implementation": dense_attn_implementation(llm),
        "adapter": asdict(config.model.adapter),
        "encoder_width": model.encoder.width,
        "llm_width": width,
        "num_speech_tokens": model.num_speech_tokens,
        "mask_padding_frames": model.mask_padding_frames,
        "speech_input_scale": model.speech_input_scale,
        "speech_first_layer_scale": first_layer_scale,
        "language_tags": config.model.llm.language_tags,
        "language_tag_ids": tokenizer.tag_ids,
        "eos_token_id": tokenizer.hf.eos_token_id,
        "generation": asdict(config.generation),
    }
    (speech / SPEECH_FILE).write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
    _write_native_vllm_files(llm, model, staging, first_layer_scale=first_layer_scale,
                             languages=list(tokenizer.tag_ids), generation=config.generation,
                             bos_token_id=tokenizer.hf.bos_token_id, eos_token_id=tokenizer.hf.eos_token_id,
                             hf_tokenizer=tokenizer.hf)


def _write_weights(model, staging: Path, dtype: str):
    """llm/ (LoRA merged into the base weights; peft writes the trained tag rows into the tied
    embedding), speech/encoder/ and speech/adapter.safetensors; returns the merged LLM."""
    llm = model.llm.merge_and_unload() if hasattr(model.llm, "merge_and_unload") else model.llm
    llm = llm.to(DTYPES[dtype])
    llm.save_pretrained(staging / LLM_DIR, safe_serialization=True)
    speech = staging / SPEECH_DIR
    model.encoder.whisper.to(DTYPES[dtype]).save_pretrained(speech / ENCODER_DIR, safe_serialization=True)
    adapter = {name: tensor.detach().to(DTYPES[dtype]).contiguous() for name, tensor in model.adapter.state_dict().items()}
    save_file(adapter, str(speech / ADAPTER_FILE), metadata={"format": "pt"})
    return llm


def write_untrained_export(model, out: str | Path, dtype: str, generation: GenerationConfig = GenerationConfig()) -> Path:
    """A folder vLLM serves natively (``vllm.LLM(model=out)``, what ``--engine vllm`` starts) from an
    in-memory model without a checkpoint (benchmarks' random weights at a preset's sizes): the
    weights and the root files of an export, but no tokenizer (start the engine with
    ``load_tokenizer=False`` and hand it prompt ids) and no ``speech.json`` (nothing to match it to
    a checkpoint by). The model's LLM is merged into its base weights (in place, when it has LoRA)
    and cast to ``dtype``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        llm = _write_weights(model, out, dtype)
        width = llm.get_input_embeddings().weight.shape[1]
        first_layer_scale = inputs_embeds_scale(llm, width) * model.speech_input_scale
    eos = model.eos_token_id
    if not _write_native_vllm_files(llm, model, out, first_layer_scale=first_layer_scale,
                                    languages=[language.code for language in LANGUAGES], generation=generation,
                                    bos_token_id=llm.config.bos_token_id,
                                    eos_token_id=eos[0] if isinstance(eos, (list, tuple)) else eos):
        raise ValueError(f"{llm.config.architectures[0]}: vLLM's native MCAT model wraps only "
                         f"{', '.join(NATIVE_LLM_ARCHITECTURES)}")
    return out


def _write_native_vllm_files(llm, model, staging: Path, *, first_layer_scale: float, languages: list[str],
                             generation: GenerationConfig, bos_token_id: int | None, eos_token_id: int,
                             hf_tokenizer=None) -> bool:
    """The root files by which vLLM serves the export as one audio-in model (module docstring), with
    the tokenizer where one is given; False (and nothing written) for an LLM the native model does
    not wrap."""
    llm_architecture = llm.config.architectures[0]
    if llm_architecture not in NATIVE_LLM_ARCHITECTURES:
        # the rest of the export serves as before (--engine vllm, transformers)
        print(f"mcat export: {llm_architecture} is not one the native vLLM model wraps "
              f"({', '.join(NATIVE_LLM_ARCHITECTURES)}): no vLLM files at the export's root", file=sys.stderr)
        return False
    native = NativeSpeechConfig(
        llm_architecture=llm_architecture,
        encoder=model.encoder.whisper.config.to_dict(),
        adapter=asdict(model.adapter.config),
        encoder_width=model.encoder.width,
        llm_width=llm.get_input_embeddings().weight.shape[1],
        num_speech_tokens=model.num_speech_tokens,
        mask_padding_frames=model.mask_padding_frames,
        speech_first_layer_scale=first_layer_scale,
        placeholder_token_id=model.pad_token_id,
        languages=list(languages),
        no_repeat_ngram_size=generation.no_repeat_ngram_size,
    )
    config = llm.config.to_dict()
    config["architectures"] = [NATIVE_ARCHITECTURE]
    config[NATIVE_CONFIG_KEY] = asdict(native)
    (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    generation_config = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": model.pad_token_id,
                         "max_new_tokens": generation.max_new_tokens}
    (staging / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n", encoding="utf-8")
    if hf_tokenizer is not None:
        hf_tokenizer.save_pretrained(staging)
    (staging / CHAT_TEMPLATE_FILE).write_text(CHAT_TEMPLATE, encoding="utf-8")
    return True


def read_export_description(directory: str | Path) -> dict[str, Any]:
    """An export's ``speech.json``, checked to be one this version reads."""
    description_file = Path(directory) / SPEECH_DIR / SPEECH_FILE
    if not description_file.is_file():
        raise FileNotFoundError(f"{directory} is not an mcat export: {description_file} is missing")
    description = read_json_object(description_file)
    if description.get("format") != FORMAT or description.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{description_file}: format {description.get('format')!r} "
                         f"version {description.get('format_version')!r}, expected {FORMAT!r} version {FORMAT_VERSION}")
    missing = [key for key in DESCRIPTION_KEYS if key not in description]
    if missing:
        raise ValueError(f"{description_file}: damaged, {', '.join(missing)} missing")
    return description


def load_exported_speech(directory: str | Path, dtype: torch.dtype = torch.float32
                         ) -> tuple[SpeechEncoder, SpeechAdapter, dict[str, Any]]:
    """The speech side of an export: encoder, adapter (eval mode) and ``speech.json``."""
    speech = Path(directory) / SPEECH_DIR
    description_file = speech / SPEECH_FILE
    description = read_export_description(directory)
    encoder = SpeechEncoder(WhisperEncoder.from_pretrained(speech / ENCODER_DIR, dtype=dtype))
    adapter = SpeechAdapter(from_dict(AdapterConfig, description["adapter"], where=f"{description_file}: adapter: "),
                            description["encoder_width"], description["llm_width"])
    with safe_open(str(speech / ADAPTER_FILE), framework="pt") as handle:
        adapter.load_state_dict({key: handle.get_tensor(key) for key in handle.keys()})
    return encoder, adapter.to(dtype).eval(), description


def is_export(directory: str | Path) -> bool:
    return (Path(directory) / SPEECH_DIR / SPEECH_FILE).is_file()


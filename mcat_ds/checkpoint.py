"""The MCAT checkpoint: what training produces and inference loads.

A checkpoint directory holds only what trained, never the frozen base weights::

    mcat_config.json        resolved config, base checkpoint paths, tag ids, code version
    adapter.safetensors     the speech adapter (Q-Former, pooling MLP, norm)
    lora/                   peft adapter (LoRA + trainable embedding rows), loadable by
                            peft.PeftModel.from_pretrained(base_llm_with_tags, "lora")

It is written to a temporary sibling and renamed into place, so a crash never leaves a half
checkpoint under the final name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file

import mcat_ds
from mcat_ds.build import CheckpointError, Tokenizer, build_model
from mcat_ds.config import MCATConfig, from_dict
from mcat_ds.environment import describe_environment
from mcat_ds.files import building_directory, read_json_object
from mcat_ds.model import MCATModel

CONFIG_FILE = "mcat_config.json"
ADAPTER_FILE = "adapter.safetensors"
LORA_DIR = "lora"
LORA_WEIGHTS_FILE = "adapter_model.safetensors"
FORMAT = "mcat-checkpoint"
FORMAT_VERSION = 1


def code_version() -> dict[str, Any]:
    """The package version and, when it runs from a git checkout, the commit."""
    version: dict[str, Any] = {"mcat_ds": mcat_ds.__version__}
    source = Path(mcat_ds.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            # benchmark CSVs are results, not code: appending a row must not mark the code dirty
            ["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        version.update(git_commit=commit, git_dirty=bool(dirty))
    except (OSError, subprocess.SubprocessError):
        pass
    return version


def run_environment(config: MCATConfig) -> dict[str, Any]:
    """This process's environment record (``mcat_ds.environment``) for metadata written now."""
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    return describe_environment(world_size=world_size, threads_per_rank=torch.get_num_threads(),
                                seeds={"runtime": config.runtime.seed, "data": config.data.seed})


def _replace_directory(staging: Path, final: Path) -> None:
    """``staging`` becomes ``final``; an existing ``final`` stays whole until then."""
    previous = final.with_name(final.name + ".previous")
    if previous.exists():
        shutil.rmtree(previous)
    if final.exists():
        os.replace(final, previous)
    os.replace(staging, final)
    if previous.exists():
        shutil.rmtree(previous)


def save_checkpoint(
    model: MCATModel,
    tokenizer: Tokenizer,
    config: MCATConfig,
    directory: str | Path,
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the trainable weights: the model's own, or ``weights`` (trainable parameter name ->
    tensor, e.g. the fp32 masters a bf16 engine keeps) where given."""
    final = Path(directory)
    with building_directory(final, _replace_directory) as staging:
        weights = weights or {}
        adapter_state = {name: weights.get(f"adapter.{name}", tensor) for name, tensor in model.adapter.state_dict().items()}
        adapter_state = {name: tensor.detach().cpu().contiguous() for name, tensor in adapter_state.items()}
        save_file(adapter_state, str(staging / ADAPTER_FILE), metadata={"format": "pt"})
        llm_state = model.llm.state_dict()
        llm_state.update({name[len("llm."):]: tensor for name, tensor in weights.items() if name.startswith("llm.")})
        model.llm.save_pretrained(str(staging / LORA_DIR), state_dict=llm_state, save_embedding_layers=False)
        write_checkpoint_metadata(staging, config, tokenizer.tag_ids)
    return final


def write_checkpoint_metadata(
    directory: Path, config: MCATConfig, tag_ids: dict[str, int], **extra: Any
) -> None:
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "code_version": code_version(),
        "environment": run_environment(config),
        "base_checkpoints": {"encoder": config.model.encoder.checkpoint, "llm": config.model.llm.checkpoint},
        "language_tag_ids": tag_ids,
        **extra,
        "config": config.to_dict(),
    }
    (directory / CONFIG_FILE).write_text(json.dumps(metadata, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def read_checkpoint_metadata(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} is not an MCAT checkpoint: {CONFIG_FILE} is missing")
    try:
        metadata = read_json_object(path)
    except ValueError as error:
        raise CheckpointError(str(error)) from None
    if metadata.get("format") != FORMAT or metadata.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format {metadata.get('format')!r} version {metadata.get('format_version')!r}, "
            f"expected {FORMAT!r} version {FORMAT_VERSION}"
        )
    missing = sorted({"config", "language_tag_ids"} - set(metadata))
    if missing:
        raise CheckpointError(f"{path}: damaged, {' and '.join(missing)} missing")
    return metadata


def read_checkpoint_config(directory: str | Path) -> MCATConfig:
    return from_dict(MCATConfig, read_checkpoint_metadata(directory)["config"], where=f"{directory}/{CONFIG_FILE}: ")


def checkpoint_fingerprint(directory: str | Path) -> str:
    """What a checkpoint holds, as 32 hex digits: a sha256 over its config and trained weights, so
    that something derived from it (an export) can tell a retrained checkpoint at the same path
    from the one it was made of. Only the trained weights are read (at most a few hundred MB);
    each file's name and size go into the hash so that bytes cannot move between files unnoticed."""
    directory = Path(directory)
    digest = hashlib.sha256()
    for name in (CONFIG_FILE, ADAPTER_FILE, f"{LORA_DIR}/{LORA_WEIGHTS_FILE}"):
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{directory} is not an MCAT checkpoint: {name} is missing")
        digest.update(f"{name}\0{path.stat().st_size}\0".encode("utf-8"))
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:32]


# The model settings a checkpoint's weights were trained under: their shapes, and how they are read
# (tags as tokens or text, the speech scale, the encoder mask). A run that starts from a checkpoint
# (--init-from) takes these from it; the rest (kernels, attention, dtypes, base paths) stay the run's.
TRAINED_MODEL_SETTINGS = (
    "adapter.num_queries", "adapter.hidden_size", "adapter.num_layers", "adapter.num_heads",
    "adapter.intermediate_size", "adapter.cross_attention_every", "adapter.pool_stride", "adapter.mlp_hidden_size",
    "adapter.dropout", "adapter.attention_dropout", "adapter.layer_norm_eps", "adapter.output_norm_eps",
    "adapter.mask_padding_frames",
    "llm.language_tags", "llm.train_embeddings", "llm.speech_scale",
    "lora.rank", "lora.alpha", "lora.dropout", "lora.target_modules",
)


def adopt_trained_settings(config: MCATConfig, checkpoint: MCATConfig) -> list[str]:
    """Set ``config``'s :data:`TRAINED_MODEL_SETTINGS` and generation settings to the checkpoint's;
    returns ``key=value (was ...)`` for each one that changed."""
    changed = []
    pairs = [(f"model.{key}", config.model, checkpoint.model, key) for key in TRAINED_MODEL_SETTINGS]
    pairs += [(f"generation.{f}", config, checkpoint, f"generation.{f}") for f in ("beams", "max_new_tokens", "no_repeat_ngram_size")]
    for name, ours, theirs, key in pairs:
        *parents, leaf = key.split(".")
        for part in parents:
            ours, theirs = getattr(ours, part), getattr(theirs, part)
        before, after = getattr(ours, leaf), getattr(theirs, leaf)
        if before != after:
            setattr(ours, leaf, after)
            changed.append(f"{name}={after} (was {before})")
    return changed


def _check_shapes(file: Path, expected: dict[str, torch.Size], what: str) -> None:
    with safe_open(str(file), framework="pt") as handle:
        stored = {key: torch.Size(handle.get_slice(key).get_shape()) for key in handle.keys()}
    problems = []
    for key in sorted(set(stored) | set(expected)):
        if key not in expected:
            problems.append(f"{key} is in the checkpoint but not in the model")
        elif key not in stored:
            problems.append(f"{key} is missing from the checkpoint")
        elif stored[key] != expected[key]:
            problems.append(
                f"{key} has shape {tuple(stored[key])} in the checkpoint but {tuple(expected[key])} in the model"
            )
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise CheckpointError(f"{file} does not fit the {what} built from the base checkpoints: {shown}")


def load_trainable_weights(model: MCATModel, tokenizer: Tokenizer, directory: str | Path) -> None:
    """Load adapter and LoRA weights into a model built with the checkpoint's architecture."""
    directory = Path(directory)
    metadata = read_checkpoint_metadata(directory)
    stored_tags = metadata["language_tag_ids"]
    if stored_tags != tokenizer.tag_ids:
        differing = sorted(code for code in set(stored_tags) | set(tokenizer.tag_ids)
                           if stored_tags.get(code) != tokenizer.tag_ids.get(code))
        code = differing[0]
        raise CheckpointError(
            f"{directory}: language tag ids differ from the base tokenizer's for {len(differing)} languages, "
            f"e.g. {code}: {stored_tags.get(code)} in the checkpoint, {tokenizer.tag_ids.get(code)} now"
        )
    adapter_file = directory / ADAPTER_FILE
    adapter_expected = {name: tensor.shape for name, tensor in model.adapter.state_dict().items()}
    _check_shapes(adapter_file, adapter_expected, "speech adapter")
    lora_file = directory / LORA_DIR / LORA_WEIGHTS_FILE
    lora_expected = {name: tensor.shape for name, tensor in get_peft_model_state_dict(model.llm, save_embedding_layers=False).items()}
    _check_shapes(lora_file, lora_expected, "LLM's LoRA")
    with safe_open(str(adapter_file), framework="pt") as handle:
        model.adapter.load_state_dict({key: handle.get_tensor(key) for key in handle.keys()})
    with safe_open(str(lora_file), framework="pt") as handle:
        result = set_peft_model_state_dict(model.llm, {key: handle.get_tensor(key) for key in handle.keys()})
    if result.unexpected_keys:
        raise CheckpointError(f"{lora_file}: weights not used by the model: {sorted(result.unexpected_keys)[:3]}")


def load_checkpoint(
    directory: str | Path, *, encoder_checkpoint: str | None = None, llm_checkpoint: str | None = None
) -> tuple[MCATModel, Tokenizer, MCATConfig]:
    """Rebuild the model from the base checkpoints the checkpoint names (or the ones given, when they
    have moved) and load the trained weights."""
    config = read_checkpoint_config(directory)
    if encoder_checkpoint is not None:
        config.model.encoder.checkpoint = encoder_checkpoint
    if llm_checkpoint is not None:
        config.model.llm.checkpoint = llm_checkpoint
    model, tokenizer = build_model(config)
    load_trainable_weights(model, tokenizer, directory)
    return model, tokenizer, config

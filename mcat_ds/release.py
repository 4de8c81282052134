"""Import checkpoints trained with the paper's release (yxduir/m2m-70, SLAM-LLM).

The release saves ``model.pt``: a pickled state dict of the trainable parameters, with the adapter
("qqm": queries -> ``Blip2QFormerModel`` -> pool -> linear1 / ReLU / linear2 -> norm) under
``encoder_projector.`` and peft LoRA under ``llm.``. Its model differs from our defaults in ways a
faithful import must keep: tags are plain text, the encoder mask passed to the Q-Former is all ones
(audio padded to 30 s first), speech enters Gemma2 scaled like tokens and Gemma3 unscaled, and it
decodes with ``no_repeat_ngram_size=5`` and up to 400 new tokens (recorded in the checkpoint's
``generation`` settings, which ``mcat translate`` uses). For gemma-3-27b-it the release's LLM is the
multimodal ``Gemma3ForConditionalGeneration``: its LoRA keys name the language model inside it, and
LoRA on q_proj/v_proj also reached the vision tower; those matrices are dropped and counted.
model.pt stores LoRA's rank and targets (in its shapes and keys) but not alpha: it comes from
``--lora-alpha``, the run's config, or the release's default (32), and the import says which.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from peft import LoraConfig
from safetensors.torch import save_file

from mcat_ds.checkpoint import ADAPTER_FILE, LORA_DIR, LORA_WEIGHTS_FILE, write_checkpoint_metadata
from mcat_ds.config import MCATConfig
from mcat_ds.files import building_directory

_QFORMER_RENAMES = (
    (r"^query$", "queries"),
    (r"^qformer\.layernorm\.", "input_norm."),
    (r"^qformer\.encoder\.layer\.(\d+)\.attention\.attention\.query\.", r"layers.\1.self_attn.q_proj."),
    (r"^qformer\.encoder\.layer\.(\d+)\.attention\.attention\.key\.", r"layers.\1.self_attn.k_proj."),
    (r"^qformer\.encoder\.layer\.(\d+)\.attention\.attention\.value\.", r"layers.\1.self_attn.v_proj."),
    (r"^qformer\.encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"layers.\1.self_attn.out_proj."),
    (r"^qformer\.encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.", r"layers.\1.self_attn.norm."),
    (r"^qformer\.encoder\.layer\.(\d+)\.crossattention\.attention\.query\.", r"layers.\1.cross_attn.q_proj."),
    (r"^qformer\.encoder\.layer\.(\d+)\.crossattention\.attention\.key\.", r"layers.\1.cross_attn.k_proj."),
    (r"^qformer\.encoder\.layer\.(\d+)\.crossattention\.attention\.value\.", r"layers.\1.cross_attn.v_proj."),
    (r"^qformer\.encoder\.layer\.(\d+)\.crossattention\.output\.dense\.", r"layers.\1.cross_attn.out_proj."),
    (r"^qformer\.encoder\.layer\.(\d+)\.crossattention\.output\.LayerNorm\.", r"layers.\1.cross_attn.norm."),
    (r"^qformer\.encoder\.layer\.(\d+)\.intermediate_query\.dense\.", r"layers.\1.ffn.fc1."),
    (r"^qformer\.encoder\.layer\.(\d+)\.output_query\.dense\.", r"layers.\1.ffn.fc2."),
    (r"^qformer\.encoder\.layer\.(\d+)\.output_query\.LayerNorm\.", r"layers.\1.ffn.norm."),
    (r"^linear1\.", "fc1."),
    (r"^linear2\.", "fc2."),
    (r"^norm\.", "output_norm."),
)
# The Q-Former's text branch (and its position ids) exist in some transformers versions but never
# run for query-only input; they are dropped.
_UNUSED = re.compile(r"^qformer\.(embeddings\.|encoder\.layer\.\d+\.(intermediate|output)\.)")


class ReleaseCheckpointError(ValueError):
    pass


def release_adapter_state(release_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``encoder_projector.*`` entries of a release state dict, renamed to SpeechAdapter's names."""
    adapter = {}
    for key, tensor in release_state.items():
        if not key.startswith("encoder_projector."):
            continue
        name = key[len("encoder_projector."):]
        if _UNUSED.match(name):
            continue
        for pattern, replacement in _QFORMER_RENAMES:
            if re.match(pattern, name):
                adapter[re.sub(pattern, replacement, name, count=1)] = tensor
                break
        else:
            raise ReleaseCheckpointError(f"release adapter parameter {key!r} has no counterpart in SpeechAdapter")
    if not adapter:
        raise ReleaseCheckpointError("no encoder_projector.* parameters: not a release MCAT checkpoint")
    return adapter


# Where the release's LLM keeps its language model, per layout: AutoModelForCausalLM (GemmaX2),
# Gemma3ForConditionalGeneration as transformers >= 4.52 nests it (``model.language_model``) and as
# earlier 4.x did (``language_model.model``). Keys are those after peft's ``base_model.model.``.
_LANGUAGE_MODEL_RENAMES = (
    (r"^model\.language_model\.", "model."),
    (r"^language_model\.model\.", "model."),
    (r"^language_model\.lm_head\.", "lm_head."),
)
# The rest of a multimodal checkpoint: q_proj/v_proj also name the vision tower's attention, so a
# release LoRA on gemma-3-27b-it trained matrices there too. Our LLM is text-only: they are dropped.
_OTHER_TOWERS = re.compile(r"^(model\.)?(vision_tower|multi_modal_projector)\.")
_PEFT_PREFIX = "base_model.model."
# The release's LoRA defaults (examples/st_covost2/asr_config.py, PeftConfig); model.pt stores
# neither alpha nor dropout.
RELEASE_LORA_DEFAULTS = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}
# The release's decoding (slam_model_st.py generate): greedy, no repeated 5-grams, 400 new tokens.
RELEASE_GENERATION = {"beams": 1, "max_new_tokens": 400, "no_repeat_ngram_size": 5}


@dataclass
class ReleaseLoRA:
    state: dict[str, torch.Tensor]
    """LoRA matrices in the key format peft saves for our text-only LLM."""
    dropped: dict[str, int]
    """Matrices of other towers that were dropped, counted per tower."""


def release_lora_state(release_state: dict[str, torch.Tensor]) -> ReleaseLoRA:
    """The ``llm.*lora_*`` entries, in the key format peft saves (``base_model.model...lora_A.weight``),
    the language model's only."""
    lora, dropped = {}, defaultdict(int)
    for key, tensor in release_state.items():
        if not (key.startswith("llm.") and ".lora_" in key):
            continue
        name = key[len("llm."):].replace(".default.", ".")
        if not name.startswith(_PEFT_PREFIX):
            raise ReleaseCheckpointError(f"release LoRA parameter {key!r} is not under llm.{_PEFT_PREFIX}")
        inner = name[len(_PEFT_PREFIX):]
        tower = _OTHER_TOWERS.match(inner)
        if tower:
            dropped[tower.group(2)] += 1
            continue
        for pattern, replacement in _LANGUAGE_MODEL_RENAMES:
            if re.match(pattern, inner):
                inner = re.sub(pattern, replacement, inner, count=1)
                break
        lora[_PEFT_PREFIX + inner] = tensor
    return ReleaseLoRA(lora, dict(dropped))


def read_release_train_config(path: str | Path) -> dict[str, Any]:
    """The LoRA settings of a release run from its config: the hydra dump (``.hydra/config.yaml``,
    ``train_config.peft_config``) or any YAML/JSON with a ``peft_config`` mapping. Keys it does not
    set take the release's defaults, as they did in its run."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise ReleaseCheckpointError(f"{path}: not a readable YAML/JSON config ({error})") from None
    if not isinstance(values, dict):
        raise ReleaseCheckpointError(f"{path}: expected a mapping at the top level")
    peft = (values.get("train_config") or {}).get("peft_config", values.get("peft_config"))
    if peft is None:
        peft = {}
    if not isinstance(peft, dict):
        raise ReleaseCheckpointError(f"{path}: peft_config is not a mapping")
    unknown = sorted(set(peft) - {"peft_method", "r", "lora_alpha", "target_modules", "bias", "task_type",
                                  "lora_dropout", "inference_mode"})
    if unknown:
        raise ReleaseCheckpointError(f"{path}: peft_config has keys the release's PeftConfig has not: {unknown}")
    return {**RELEASE_LORA_DEFAULTS, **{k: v for k, v in peft.items() if k in RELEASE_LORA_DEFAULTS}}


@dataclass
class ImportReport:
    """What an import did and assumed; printed by ``mcat import-release``."""

    adapter_tensors: int = 0
    lora_tensors: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    lora: dict[str, Any] = field(default_factory=dict)
    lora_sources: dict[str, str] = field(default_factory=dict)
    """Per LoRA setting: where its value came from (model.pt shapes, flag, release config, assumed)."""
    speech_scale: str = ""
    generation: dict[str, int] = field(default_factory=dict)

    def lines(self) -> list[str]:
        lines = [f"adapter: {self.adapter_tensors} tensors; LoRA: {self.lora_tensors} matrices of the language model"]
        for tower, count in sorted(self.dropped.items()):
            lines.append(f"dropped {count} LoRA matrices of the {tower} (q_proj/v_proj there too; our LLM is text-only)")
        for key, value in self.lora.items():
            lines.append(f"lora {key} = {value} ({self.lora_sources[key]})")
        lines.append(f"speech embeddings enter the LLM scaled as the release did: model.llm.speech_scale={self.speech_scale}")
        lines.append("generation (used by mcat translate unless its flags say otherwise): "
                     + ", ".join(f"{k}={v}" for k, v in self.generation.items()))
        return lines


def _llm_model_type(config: MCATConfig) -> str | None:
    if config.model.llm.checkpoint is None:
        return None
    config_file = Path(config.model.llm.checkpoint) / "config.json"
    if not config_file.is_file():
        return None
    return json.loads(config_file.read_text(encoding="utf-8")).get("model_type")


def release_model_config(config: MCATConfig, lora_state: dict[str, torch.Tensor], *,
                         lora_alpha: int | None = None, train_config: dict[str, Any] | None = None,
                         report: ImportReport | None = None) -> MCATConfig:
    """The release's model settings on top of a preset: text tags, an all-ones encoder mask, no new
    embedding rows, speech scaled as the release's LLM class did, LoRA shaped as stored, the
    release's decoding."""
    report = report if report is not None else ImportReport()
    config.model.llm.language_tags = "text"
    config.model.llm.train_embeddings = "none"
    config.model.adapter.mask_padding_frames = False
    config.model.adapter.attention_dropout = 0.1
    # Gemma3's embedding module scales token ids only, so the release's speech rows entered unscaled;
    # Gemma2 under transformers 4.x scaled all of inputs_embeds, speech included.
    model_type = _llm_model_type(config)
    if model_type is not None:
        config.model.llm.speech_scale = "none" if model_type.startswith("gemma3") else "token"
    report.speech_scale = config.model.llm.speech_scale
    for key, value in RELEASE_GENERATION.items():
        setattr(config.generation, key, value)
    report.generation = dict(RELEASE_GENERATION)
    ranks = {tensor.shape[0] for key, tensor in lora_state.items() if ".lora_A." in key}
    if len(ranks) > 1:
        raise ReleaseCheckpointError(f"LoRA matrices of several ranks {sorted(ranks)}: not a single LoRA config")
    if not ranks:
        return config
    rank = ranks.pop()
    targets = sorted({key.split(".lora_A.")[0].rsplit(".", 1)[-1] for key in lora_state if ".lora_A." in key})
    if train_config is not None and int(train_config["r"]) != rank:
        raise ReleaseCheckpointError(f"the release config says LoRA r={train_config['r']} but model.pt holds rank {rank}")
    if lora_alpha is not None:
        alpha, alpha_source = lora_alpha, "--lora-alpha"
    elif train_config is not None:
        alpha, alpha_source = int(train_config["lora_alpha"]), "release config"
    else:
        alpha = RELEASE_LORA_DEFAULTS["lora_alpha"]
        alpha_source = ("ASSUMED: model.pt does not store it; the release's default. Pass --lora-alpha or "
                        "--release-config if the run set another")
    dropout = float(train_config["lora_dropout"]) if train_config is not None else RELEASE_LORA_DEFAULTS["lora_dropout"]
    config.model.lora.rank = rank
    config.model.lora.alpha = alpha
    config.model.lora.dropout = dropout
    config.model.lora.target_modules = tuple(targets)
    report.lora = {"r": rank, "alpha": alpha, "dropout": dropout, "target_modules": ",".join(targets)}
    report.lora_sources = {
        "r": "model.pt shapes", "alpha": alpha_source,
        "dropout": "release config" if train_config is not None else "the release's default (training only)",
        "target_modules": "model.pt keys",
    }
    return config


def _refuse_existing(out: Path) -> None:
    if out.exists():
        raise FileExistsError(f"--out {out} exists; import-release writes a new checkpoint directory and never "
                              "writes into an existing one: pick a new directory or remove it")


def import_release_checkpoint(model_pt: str | Path, config: MCATConfig, out: str | Path, *,
                              lora_alpha: int | None = None, release_config: str | Path | None = None) -> ImportReport:
    """Write a new MCAT checkpoint directory ``out`` from a release ``model.pt`` and the preset it was
    trained as (base checkpoint paths set in ``config``). Shapes are checked when the checkpoint is
    loaded. Written to a sibling and renamed, so ``out`` is complete or absent, never a mix of
    files that loads."""
    out = Path(out)
    _refuse_existing(out)
    release_state = torch.load(model_pt, map_location="cpu", weights_only=True)
    if not isinstance(release_state, dict):
        raise ReleaseCheckpointError(f"{model_pt} does not hold a state dict")
    trained_encoder = [key for key in release_state if key.startswith("encoder.")]
    if trained_encoder:
        raise ReleaseCheckpointError(
            f"{model_pt} holds {len(trained_encoder)} trained encoder parameters (e.g. {trained_encoder[0]}); "
            "MCAT keeps the Whisper encoder frozen, so importing them is not supported")
    adapter = release_adapter_state(release_state)
    lora = release_lora_state(release_state)
    train_config = read_release_train_config(release_config) if release_config is not None else None
    report = ImportReport(adapter_tensors=len(adapter), lora_tensors=len(lora.state), dropped=lora.dropped)
    config = release_model_config(config, lora.state, lora_alpha=lora_alpha, train_config=train_config, report=report)
    def publish(staging: Path, final: Path) -> None:
        _refuse_existing(final)  # created while this import ran: os.replace would take an empty one's place
        os.replace(staging, final)

    with building_directory(out, publish) as staging:
        (staging / LORA_DIR).mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in adapter.items()}, str(staging / ADAPTER_FILE), metadata={"format": "pt"})
        save_file({k: v.contiguous() for k, v in lora.state.items()}, str(staging / LORA_DIR / LORA_WEIGHTS_FILE),
                  metadata={"format": "pt"})
        LoraConfig(
            task_type="CAUSAL_LM",
            r=config.model.lora.rank,
            lora_alpha=config.model.lora.alpha,
            lora_dropout=config.model.lora.dropout,
            target_modules=list(config.model.lora.target_modules),
            base_model_name_or_path=config.model.llm.checkpoint,
        ).save_pretrained(str(staging / LORA_DIR))
        write_checkpoint_metadata(staging, config, {}, imported_from=str(model_pt),
                                  import_report={"dropped_lora": lora.dropped, "lora_sources": report.lora_sources})
    return report

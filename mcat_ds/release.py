"""Import checkpoints trained with the paper's release (yxduir/m2m-70, SLAM-LLM).

The release saves ``model.pt``: a pickled state dict of the trainable parameters, with the adapter
("qqm": queries -> ``Blip2QFormerModel`` -> pool -> linear1 / ReLU / linear2 -> norm) under
``encoder_projector.`` and peft LoRA under ``llm.``. Its model differs from our defaults in ways a
faithful import must keep: tags are plain text, the encoder mask passed to the Q-Former is all ones
(audio padded to 30 s first), and LoRA has dropout 0.05 on q_proj/v_proj.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import save_file

from mcat_ds.checkpoint import ADAPTER_FILE, LORA_DIR, LORA_WEIGHTS_FILE, write_checkpoint_metadata
from mcat_ds.config import MCATConfig

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


def release_lora_state(release_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``llm.*lora_*`` entries, in the key format peft saves (``base_model.model...lora_A.weight``)."""
    lora = {}
    for key, tensor in release_state.items():
        if key.startswith("llm.") and ".lora_" in key:
            lora[key[len("llm."):].replace(".default.", ".")] = tensor
    return lora


def release_model_config(config: MCATConfig, lora_state: dict[str, torch.Tensor]) -> MCATConfig:
    """The release's model settings on top of a preset: text tags, an all-ones encoder mask, no new
    embedding rows, LoRA shaped as stored."""
    config.model.llm.language_tags = "text"
    config.model.llm.train_embeddings = "none"
    config.model.adapter.mask_padding_frames = False
    config.model.adapter.attention_dropout = 0.1
    ranks = {tensor.shape[0] for key, tensor in lora_state.items() if ".lora_A." in key}
    if len(ranks) > 1:
        raise ReleaseCheckpointError(f"LoRA matrices of several ranks {sorted(ranks)}: not a single LoRA config")
    if ranks:
        config.model.lora.rank = ranks.pop()
        config.model.lora.alpha = 2 * config.model.lora.rank
        config.model.lora.dropout = 0.05
        targets = sorted({key.split(".lora_A.")[0].rsplit(".", 1)[-1] for key in lora_state if ".lora_A." in key})
        config.model.lora.target_modules = tuple(targets)
    return config


def import_release_checkpoint(model_pt: str | Path, config: MCATConfig, out: str | Path) -> Path:
    """Write an MCAT checkpoint directory from a release ``model.pt`` and the preset it was trained as
    (base checkpoint paths set in ``config``). Shapes are checked when the checkpoint is loaded."""
    release_state = torch.load(model_pt, map_location="cpu", weights_only=True)
    if not isinstance(release_state, dict):
        raise ReleaseCheckpointError(f"{model_pt} does not hold a state dict")
    adapter = release_adapter_state(release_state)
    lora = release_lora_state(release_state)
    config = release_model_config(config, lora)
    out = Path(out)
    (out / LORA_DIR).mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in adapter.items()}, str(out / ADAPTER_FILE), metadata={"format": "pt"})
    save_file({k: v.contiguous() for k, v in lora.items()}, str(out / LORA_DIR / LORA_WEIGHTS_FILE),
              metadata={"format": "pt"})
    LoraConfig(
        task_type="CAUSAL_LM",
        r=config.model.lora.rank,
        lora_alpha=config.model.lora.alpha,
        lora_dropout=config.model.lora.dropout,
        target_modules=list(config.model.lora.target_modules),
        base_model_name_or_path=config.model.llm.checkpoint,
    ).save_pretrained(str(out / LORA_DIR))
    write_checkpoint_metadata(out, config, {}, imported_from=str(model_pt))
    return out

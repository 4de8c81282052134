"""Test helpers: the release's model rebuilt (BLIP-2 reference adapter, its peft LLM) and its model.pt."""

from __future__ import annotations

import torch
import transformers
from peft import LoraConfig, get_peft_model
from torch import nn

from mcat_ds.model.blip2_reference import ReleaseQFormerPoolAdapter  # noqa: F401  (re-exported for the tests)


def randomize(module: nn.Module, seed: int) -> None:
    """Every parameter random (LayerNorms included), so no term of the computation hides."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            scale = 0.5 if parameter.ndim == 1 else 1 / max(parameter.shape[-1], 1) ** 0.5
            offset = 1.0 if name.endswith("weight") and parameter.ndim == 1 else 0.0
            parameter.copy_(offset + scale * torch.randn(parameter.shape, generator=generator))


RELEASE_LORA = dict(r=8, lora_alpha=24, lora_dropout=0.05, target_modules=["q_proj", "v_proj"])


def release_llm(directory, multimodal: bool):
    """The release's LLM: loaded as its class (Gemma3ForConditionalGeneration for gemma-3-27b-it),
    LoRA through peft on q_proj/v_proj, random B matrices so that LoRA changes the output."""
    model_class = transformers.Gemma3ForConditionalGeneration if multimodal else transformers.AutoModelForCausalLM
    llm = get_peft_model(model_class.from_pretrained(directory, dtype=torch.float32),
                         LoraConfig(task_type="CAUSAL_LM", **RELEASE_LORA))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, parameter in llm.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    return llm.eval()


def release_model_pt(adapter, llm, path):
    """The release's save (save_model_checkpoint_peft): every parameter that requires grad, named as
    in its model (``encoder_projector.*``, ``llm.*`` with peft's ``.default.``)."""
    state = {f"encoder_projector.{name}": p.detach().clone() for name, p in adapter.named_parameters()}
    state.update({f"llm.{name}": p.detach().clone() for name, p in llm.named_parameters() if p.requires_grad})
    torch.save(state, path)
    return state

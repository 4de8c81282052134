"""A model.pt trained with the paper's release imports into an MCAT checkpoint and runs the same."""

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from blip2_reference import ReleaseQFormerPoolAdapter, randomize
from conftest import random_features
from mcat_ds.checkpoint import load_checkpoint
from mcat_ds.cli import main
from mcat_ds.presets import get_preset


def test_import_release_checkpoint(tiny_dirs, tmp_path):
    adapter_config = get_preset("tiny").model.adapter
    torch.manual_seed(0)
    reference_adapter = ReleaseQFormerPoolAdapter(adapter_config, 64, 128)
    randomize(reference_adapter, seed=1)
    release_llm = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_dirs["gemma2"]),
        LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    )
    with torch.no_grad():
        for name, parameter in release_llm.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1)
    state = {f"encoder_projector.{k}": v for k, v in reference_adapter.state_dict().items()}
    state.update({f"llm.{k}": v for k, v in release_llm.state_dict().items() if "lora_" in k})
    torch.save(state, tmp_path / "model.pt")

    assert main([
        "import-release", "--preset", "tiny", "--model-pt", str(tmp_path / "model.pt"), "--out", str(tmp_path / "ckpt"),
        "--set", f"model.encoder.checkpoint={tiny_dirs['whisper']}",
        "--set", f"model.llm.checkpoint={tiny_dirs['gemma2']}",
    ]) == 0
    model, tokenizer, config = load_checkpoint(tmp_path / "ckpt")
    assert config.model.llm.language_tags == "text" and tokenizer.tag_ids == {}
    assert config.model.lora.rank == 8 and config.model.lora.target_modules == ("q_proj", "v_proj")
    assert not config.model.adapter.mask_padding_frames
    model.eval()

    features, lengths = random_features(2, [500, 90])
    states, _ = model.encoder(features, lengths)
    all_frames = torch.ones(states.shape[:2], dtype=torch.long)  # what the release passes
    expected = reference_adapter.eval()(states, all_frames) * model.speech_input_scale
    # fp32 rounding differs (eager vs fused attention, one K/V GEMM vs several): a few 1e-5
    torch.testing.assert_close(model.speech_embeddings(features, lengths), expected, atol=1e-4, rtol=1e-4)

    ids = tokenizer.hf("<|eng|><|deu|>Regnet es morgen?", return_tensors="pt")["input_ids"]
    assert ids.shape[1] > 4  # tags are text here, several tokens each
    torch.testing.assert_close(model.llm(input_ids=ids).logits, release_llm.eval()(input_ids=ids).logits)

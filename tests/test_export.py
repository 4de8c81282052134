"""mcat export: the merged LLM loads with AutoModelForCausalLM and computes what the peft model does;
the speech side reloads and embeds speech the same."""

import json

import pytest
import torch
import transformers
from safetensors import safe_open

from conftest import random_features, write_trained_checkpoint
from mcat_ds.checkpoint import load_checkpoint
from mcat_ds.cli import main
from mcat_ds.infer.export import load_exported_speech


def trained_checkpoint(tiny_config, llm, directory):
    return write_trained_checkpoint(tiny_config(llm, "model.llm.train_embeddings=tags"), directory)


@pytest.mark.parametrize("llm", ["gemma2", "gemma3_multimodal"])
def test_the_merged_llm_computes_what_the_peft_model_does(tiny_config, tmp_path, llm):
    checkpoint = trained_checkpoint(tiny_config, llm, tmp_path / "ckpt")
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "export"), "--dtype", "float32"]) == 0
    model, tokenizer, _ = load_checkpoint(checkpoint)
    model.eval()
    description = json.loads((tmp_path / "export" / "speech" / "speech.json").read_text())
    merged = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "export" / "llm", attn_implementation=description["hf_attn_implementation"]).eval()
    exported_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "export" / "llm")
    if llm == "gemma3_multimodal":
        assert merged.config.architectures == ["Gemma3ForCausalLM"]  # text only: no vision tower
    assert not any("lora" in name for name, _ in merged.named_parameters())
    text = "Regnet es morgen?<|deu|><|eng|>Will it rain"
    ids = exported_tokenizer(text, return_tensors="pt")["input_ids"]
    assert ids.tolist() == tokenizer.hf(text, return_tensors="pt")["input_ids"].tolist()
    assert exported_tokenizer.convert_tokens_to_ids("<|deu|>") == tokenizer.tag_ids["deu"]
    with torch.no_grad():
        expected = model.llm(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    # merging sums LoRA into the weights once instead of adding its product per call: fp32 rounding
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert (got - expected).abs().max() < 1e-3 * expected.abs().max()

    # the speech side: the same speech embeddings, and how they enter the first layer
    encoder, adapter, description = load_exported_speech(tmp_path / "export")
    features, lengths = random_features(2, [500, 90])
    with torch.no_grad():
        states, state_lengths = encoder(features, lengths)
        speech = adapter(states, state_lengths) * description["speech_input_scale"]
        torch.testing.assert_close(speech, model.speech_embeddings(features, lengths), atol=1e-6, rtol=1e-6)
    assert description["num_speech_tokens"] == model.num_speech_tokens
    assert description["language_tag_ids"] == tokenizer.tag_ids
    assert description["generation"] == {"beams": 1, "max_new_tokens": 256, "no_repeat_ngram_size": 0}


def test_export_defaults_to_bf16_and_never_overwrites(tiny_config, tmp_path, capsys):
    checkpoint = trained_checkpoint(tiny_config, "gemma2", tmp_path / "ckpt")
    out = tmp_path / "export"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    with safe_open(str(out / "llm" / "model.safetensors"), framework="pt") as handle:
        assert {handle.get_tensor(key).dtype for key in handle.keys()} == {torch.bfloat16}
    assert json.loads((out / "speech" / "speech.json").read_text())["dtype"] == "bfloat16"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err

"""model.pt files written the way the paper's release writes them import into MCAT checkpoints that
compute what the release computes: GemmaX2-style (Gemma2 causal LM) and gemma-3-27b-it-style
(multimodal Gemma3, the vision tower's attention also under LoRA)."""

import json
import math

import pytest
import torch

from blip2_reference import ReleaseQFormerPoolAdapter, randomize, release_llm, release_model_pt
from conftest import random_features
from mcat_ds import release
from mcat_ds.batching import collate_examples, tokenize_example
from mcat_ds.build import inputs_embeds_scale
from mcat_ds.checkpoint import load_checkpoint, read_checkpoint_config
from mcat_ds.cli import main
from mcat_ds.presets import get_preset
from mcat_ds.release import ReleaseCheckpointError, release_lora_state

def release_embeddings(llm, input_ids, speech_mask, speech, model_type):
    """What the release hands its LLM as inputs_embeds (slam_model_st.py), expressed as what reaches
    the first decoder layer: token embeddings from the LLM's ``embed_tokens`` with the adapter output
    written into the speech positions. Gemma2 under transformers 4.x then scales all of it by
    sqrt(hidden); Gemma3's embedding module scales the tokens only."""
    embed = llm.get_input_embeddings()
    tokens = embed(input_ids)
    if model_type == "gemma2":
        tokens = tokens / float(getattr(embed, "embed_scale", 1.0))  # the 4.x module: unscaled rows
    mixed = tokens.masked_scatter(speech_mask[..., None], speech)
    if model_type == "gemma2":
        # 4.x multiplied inputs_embeds by sqrt(hidden) inside the model; give this transformers what
        # makes the first layer see the same
        width = mixed.shape[-1]
        mixed = mixed * math.sqrt(width) / inputs_embeds_scale(llm, width)
    return mixed


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3"])
def test_release_checkpoint_imports_and_computes_what_the_release_computes(tiny_dirs, tmp_path, model_type, capsys):
    multimodal = model_type == "gemma3"
    llm_dir = tiny_dirs["gemma3_multimodal" if multimodal else "gemma2"]
    adapter_config = get_preset("tiny").model.adapter
    llm = release_llm(llm_dir, multimodal)
    width = llm.get_input_embeddings().weight.shape[1]
    torch.manual_seed(0)
    reference_adapter = ReleaseQFormerPoolAdapter(adapter_config, 64, width)
    randomize(reference_adapter, seed=1)
    state = release_model_pt(reference_adapter, llm, tmp_path / "model.pt")
    if multimodal:
        vision = [key for key in state if "vision_tower" in key and "lora_" in key]
        assert vision, "the release's q_proj/v_proj LoRA reaches the vision tower too"
    (tmp_path / "config.yaml").write_text(
        "train_config:\n  use_peft: true\n  peft_config:\n    r: 8\n    lora_alpha: 24\n", encoding="utf-8")

    assert main([
        "import-release", "--preset", "tiny", "--model-pt", str(tmp_path / "model.pt"), "--out", str(tmp_path / "ckpt"),
        "--release-config", str(tmp_path / "config.yaml"),
        "--set", f"model.encoder.checkpoint={tiny_dirs['whisper']}", "--set", f"model.llm.checkpoint={llm_dir}",
    ]) == 0
    printed = capsys.readouterr().out
    assert "lora alpha = 24 (release config)" in printed
    if multimodal:
        assert f"dropped {len(vision)} LoRA matrices of the vision_tower" in printed
    model, tokenizer, config = load_checkpoint(tmp_path / "ckpt")
    assert config.model.llm.language_tags == "text" and tokenizer.tag_ids == {}
    assert config.model.lora.rank == 8 and config.model.lora.alpha == 24
    assert config.model.lora.target_modules == ("q_proj", "v_proj")
    assert config.model.llm.speech_scale == ("none" if multimodal else "token")
    assert not config.model.adapter.mask_padding_frames
    assert (config.generation.max_new_tokens, config.generation.no_repeat_ngram_size) == (400, 5)
    model.eval()

    # adapter output over encoder states, with the release's all-ones mask
    features, lengths = random_features(2, [500, 90])
    states, _ = model.encoder(features, lengths)
    all_frames = torch.ones(states.shape[:2], dtype=torch.long)
    with torch.no_grad():
        reference_speech = reference_adapter.eval()(states, all_frames)
        ours_speech = model.speech_embeddings(features, lengths) / model.speech_input_scale
    torch.testing.assert_close(ours_speech, reference_speech, atol=1e-5, rtol=1e-5)

    # the whole forward: speech + SRT prompt (tags as text, several tokens each) -> logits
    prompts = collate_examples([tokenize_example(tokenizer.hf, text) for text in ("<|eng|><|deu|>", "<|deu|><|fra|>")],
                               model.num_speech_tokens, tokenizer.hf.pad_token_id, padding_side="left")
    assert prompts.input_ids.shape[1] > model.num_speech_tokens + 4
    with torch.no_grad():
        speech = model.speech_embeddings(features, lengths)
        ours = model.llm(inputs_embeds=model.input_embeddings(prompts, speech), attention_mask=prompts.attention_mask).logits
        mixed = release_embeddings(llm, prompts.input_ids, prompts.speech_mask, reference_speech, model_type)
        theirs = llm(inputs_embeds=mixed, attention_mask=prompts.attention_mask).logits
        text_ids = tokenizer.hf("<|eng|><|deu|>Regnet es morgen?", return_tensors="pt")["input_ids"]
        text_ours, text_theirs = model.llm(input_ids=text_ids).logits, llm(input_ids=text_ids).logits
    assert ours.shape[-1] <= theirs.shape[-1]  # the multimodal embedding has spare rows past the tokenizer's
    real = prompts.attention_mask.bool()  # left padding's logits mean nothing
    torch.testing.assert_close(ours[real], theirs[..., :ours.shape[-1]][real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(text_ours, text_theirs[..., :text_ours.shape[-1]], atol=1e-5, rtol=1e-5)


def test_gemma3_layouts_of_older_transformers_and_what_is_dropped():
    a, b = torch.zeros(8, 32), torch.zeros(32, 8)
    state = {
        # transformers >= 4.52: Gemma3ForConditionalGeneration.model.language_model
        "llm.base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.default.weight": a,
        # earlier 4.x: Gemma3ForConditionalGeneration.language_model.model
        "llm.base_model.model.language_model.model.layers.1.self_attn.v_proj.lora_B.default.weight": b,
        "llm.base_model.model.model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.lora_A.default.weight": a,
        "llm.base_model.model.vision_tower.vision_model.encoder.layers.0.self_attn.v_proj.lora_B.default.weight": b,
    }
    lora = release_lora_state(state)
    assert sorted(lora.state) == [
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight",
    ]
    assert lora.dropped == {"vision_tower": 2}
    with pytest.raises(ReleaseCheckpointError, match="not under llm.base_model.model."):
        release_lora_state({"llm.model.layers.0.q_proj.lora_A.default.weight": a})


def gemma2_release_arguments(tiny_dirs, tmp_path) -> list[str]:
    """import-release's arguments, all but --out, for a GemmaX2-style model.pt written into tmp_path."""
    llm = release_llm(tiny_dirs["gemma2"], multimodal=False)
    torch.manual_seed(0)
    adapter = ReleaseQFormerPoolAdapter(get_preset("tiny").model.adapter, 64, 128)
    release_model_pt(adapter, llm, tmp_path / "model.pt")
    return ["--preset", "tiny", "--model-pt", str(tmp_path / "model.pt"),
            "--set", f"model.encoder.checkpoint={tiny_dirs['whisper']}", "--set", f"model.llm.checkpoint={tiny_dirs['gemma2']}"]


def test_lora_alpha_flag_wins_and_a_guess_is_said(tiny_dirs, tmp_path, capsys):
    common = gemma2_release_arguments(tiny_dirs, tmp_path)
    assert main(["import-release", *common, "--out", str(tmp_path / "guessed")]) == 0
    assert "lora alpha = 32 (ASSUMED" in capsys.readouterr().out
    assert read_checkpoint_config(tmp_path / "guessed").model.lora.alpha == 32
    assert main(["import-release", *common, "--out", str(tmp_path / "given"), "--lora-alpha", "24"]) == 0
    assert "lora alpha = 24 (--lora-alpha)" in capsys.readouterr().out
    metadata = json.loads((tmp_path / "given" / "mcat_config.json").read_text())
    assert metadata["import_report"]["lora_sources"]["alpha"] == "--lora-alpha"
    (tmp_path / "wrong.yaml").write_text("train_config:\n  peft_config:\n    r: 32\n", encoding="utf-8")
    assert main(["import-release", *common, "--out", str(tmp_path / "bad"), "--release-config", str(tmp_path / "wrong.yaml")]) == 2
    assert "says LoRA r=32 but model.pt holds rank 8" in capsys.readouterr().err


def test_import_never_writes_into_an_existing_directory_nor_leaves_a_half_one(tiny_dirs, tmp_path, capsys, monkeypatch):
    common = gemma2_release_arguments(tiny_dirs, tmp_path)
    trained = tmp_path / "trained"
    trained.mkdir()
    (trained / "adapter.safetensors").write_bytes(b"weights that took a week")
    assert main(["import-release", *common, "--out", str(trained)]) == 2
    error = capsys.readouterr().err
    assert f"{trained} exists" in error and "pick a new directory or remove it" in error
    assert [p.name for p in trained.iterdir()] == ["adapter.safetensors"]
    assert (trained / "adapter.safetensors").read_bytes() == b"weights that took a week"

    def disk_full(*args, **kwargs):
        raise RuntimeError("no space left on device")

    with monkeypatch.context() as patched:  # the last file fails: nothing is left under --out or beside it
        patched.setattr(release, "write_checkpoint_metadata", disk_full)
        assert main(["import-release", *common, "--out", str(tmp_path / "failed")]) == 2
    assert "no space left" in capsys.readouterr().err
    assert not (tmp_path / "failed").exists() and not list(tmp_path.glob("failed.partial-*"))

    assert main(["import-release", *common, "--out", str(tmp_path / "runs" / "imported")]) == 0
    assert read_checkpoint_config(tmp_path / "runs" / "imported").model.lora.rank == 8
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["imported"]

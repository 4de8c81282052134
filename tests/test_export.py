"""mcat export: the merged LLM loads with AutoModelForCausalLM and computes what the peft model does;
the speech side reloads and embeds speech the same."""

import fcntl
import json
import shutil
import socket
import subprocess
import threading
import time

import pytest
import torch
import transformers
from safetensors import safe_open

from conftest import random_features, write_trained_checkpoint
from mcat_ds.build import CheckpointError
from mcat_ds.checkpoint import checkpoint_fingerprint, load_checkpoint
from mcat_ds.cli import main
from mcat_ds.infer import export
from mcat_ds.infer.export import FORMAT, FORMAT_VERSION, export_checkpoint, export_matches, load_exported_speech

CHECKPOINT_FILES = ("mcat_config.json", "adapter.safetensors", "lora/adapter_model.safetensors")


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


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_export_defaults_to_bf16_and_never_overwrites(tiny_config, tmp_path, capsys):
    checkpoint = trained_checkpoint(tiny_config, "gemma2", tmp_path / "ckpt")
    out = tmp_path / "export"
    host = socket.gethostname()
    # staging folders of other exports to the same directory: one killed here, one running here,
    # one on another node of a shared filesystem
    dead, running, elsewhere = (tmp_path / f"export.partial-{writer}"
                                for writer in (f"{host}-{dead_pid()}", f"{host}-1", "other-node-1"))
    for folder in (dead, running, elsewhere):
        folder.mkdir()
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    assert not dead.exists() and running.is_dir() and elsewhere.is_dir()
    with safe_open(str(out / "llm" / "model.safetensors"), framework="pt") as handle:
        assert {handle.get_tensor(key).dtype for key in handle.keys()} == {torch.bfloat16}
    description = json.loads((out / "speech" / "speech.json").read_text())
    assert description["dtype"] == "bfloat16" and description["exported_from"] == str(checkpoint)
    assert description["checkpoint_fingerprint"] == checkpoint_fingerprint(checkpoint)
    assert export_matches(out, checkpoint, "bfloat16") is None
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err


def write_fake_checkpoint(directory):
    """The files a checkpoint's fingerprint covers, with stand-in bytes."""
    (directory / "lora").mkdir(parents=True)
    for name in CHECKPOINT_FILES:
        (directory / name).write_bytes(name.encode() * 3)
    return directory


def write_fake_export(directory, checkpoint, dtype, fingerprint):
    """An export's speech.json (the rest of an export plays no part in whether it matches)."""
    description = {"format": FORMAT, "format_version": FORMAT_VERSION, "exported_from": str(checkpoint),
                   "checkpoint_fingerprint": fingerprint, "dtype": dtype, "adapter": {"num_queries": 4},
                   "encoder_width": 64, "llm_width": 128, "num_speech_tokens": 2, "mask_padding_frames": True,
                   "speech_input_scale": 1.0, "speech_first_layer_scale": 11.3, "language_tags": "tokens",
                   "language_tag_ids": {"eng": 7}, "eos_token_id": 1, "generation": {"beams": 1}}
    if fingerprint is None:  # written before exports recorded it
        del description["checkpoint_fingerprint"]
    (directory / "speech").mkdir(parents=True)
    (directory / "speech" / "speech.json").write_text(json.dumps(description, indent=2), encoding="utf-8")
    return directory / "speech" / "speech.json"


def test_checkpoint_fingerprint_follows_the_content_not_the_path(tmp_path):
    checkpoint = write_fake_checkpoint(tmp_path / "ckpt")
    fingerprint = checkpoint_fingerprint(checkpoint)
    assert len(fingerprint) == 32 and int(fingerprint, 16) >= 0
    assert checkpoint_fingerprint(shutil.copytree(checkpoint, tmp_path / "copy")) == fingerprint
    for name in CHECKPOINT_FILES:
        changed = shutil.copytree(checkpoint, tmp_path / f"changed-{name.replace('/', '-')}")
        (changed / name).write_bytes((changed / name).read_bytes()[:-1] + b"!")
        assert checkpoint_fingerprint(changed) != fingerprint, name
    moved = shutil.copytree(checkpoint, tmp_path / "moved")  # one byte moved from one file to the next
    config, adapter = (moved / name for name in CHECKPOINT_FILES[:2])
    config_bytes = config.read_bytes()
    config.write_bytes(config_bytes[:-1])
    adapter.write_bytes(config_bytes[-1:] + adapter.read_bytes())
    assert checkpoint_fingerprint(moved) != fingerprint
    (moved / "adapter.safetensors").unlink()
    with pytest.raises(CheckpointError, match="adapter.safetensors is missing"):
        checkpoint_fingerprint(moved)


def test_export_matches_the_checkpoint_content_and_dtype(tmp_path):
    checkpoint = write_fake_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "export"
    write_fake_export(out, checkpoint, "bfloat16", checkpoint_fingerprint(checkpoint))
    assert export_matches(out, checkpoint, "bfloat16") is None
    assert export_matches(out, shutil.copytree(checkpoint, tmp_path / "copy"), "bfloat16") is None
    assert "in bfloat16, not float16" in export_matches(out, checkpoint, "float16")
    (checkpoint / "adapter.safetensors").write_bytes(b"retrained")  # same path, new weights
    difference = export_matches(out, checkpoint, "bfloat16")
    assert f"now has {checkpoint_fingerprint(checkpoint)}" in difference and "export again" in difference

    old = tmp_path / "old-export"
    write_fake_export(old, checkpoint, "bfloat16", None)
    difference = export_matches(old, checkpoint, "bfloat16")
    assert "(this path)" in difference and "unknown" in difference and "export again" in difference
    assert f"not {tmp_path / 'copy'}" in export_matches(old, tmp_path / "copy", "bfloat16")


@pytest.mark.parametrize("finished_dtype", ["bfloat16", "float32"])
def test_an_export_waits_for_another_to_the_same_directory_and_takes_its_result(tmp_path, monkeypatch, capsys,
                                                                               finished_dtype):
    checkpoint = write_fake_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "export"

    def no_second_export(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded to export it again")

    monkeypatch.setattr(export, "load_checkpoint", no_second_export)
    outcome = {}

    def export_in_turn():
        try:
            outcome["out"] = export_checkpoint(checkpoint, out, "bfloat16")
        except Exception as error:
            outcome["error"] = error

    with open(tmp_path / "export.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another export to the same directory is running
        waiting = threading.Thread(target=export_in_turn)
        waiting.start()
        printed, deadline = "", time.monotonic() + 60
        while "waiting for it" not in printed and time.monotonic() < deadline and waiting.is_alive():
            time.sleep(0.05)
            printed += capsys.readouterr().err
        assert "another export to" in printed, outcome
        write_fake_export(out, checkpoint, finished_dtype, checkpoint_fingerprint(checkpoint))  # it finishes
        fcntl.flock(lock, fcntl.LOCK_UN)
    waiting.join(timeout=60)
    if finished_dtype == "bfloat16":
        assert outcome == {"out": out}
    else:
        assert isinstance(outcome["error"], FileExistsError)
        assert "while this export waited" in str(outcome["error"]) and "not bfloat16" in str(outcome["error"])

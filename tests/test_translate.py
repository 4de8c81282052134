"""mcat translate: the fast decoder equals HF generate, one encoder pass per utterance, resume, ranks."""

import json
import subprocess
import sys

import pytest
import torch

from mcat_ds.batching import collate_examples, tokenize_example
from mcat_ds.build import build_model
from mcat_ds.checkpoint import save_checkpoint
from mcat_ds.cli import main
from mcat_ds.data.shards import load_index
from mcat_ds.inference import DecodeCounters, TranslateConfig, greedy_decode, parse_directions, plan_requests
from mcat_ds.model.mcat import GenerationOptions
from mcat_ds.train.distributed import free_port


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_dirs, tmp_path_factory):
    from mcat_ds.config import apply_overrides
    from mcat_ds.presets import get_preset

    config = get_preset("tiny")
    config.model.encoder.checkpoint = str(tiny_dirs["whisper"])
    config.model.llm.checkpoint = str(tiny_dirs["gemma2"])
    config = apply_overrides(config, ["model.llm.train_embeddings=tags"])
    torch.manual_seed(0)
    model, tokenizer = build_model(config)
    directory = tmp_path_factory.mktemp("translate") / "ckpt"
    save_checkpoint(model, tokenizer, config, directory)
    return directory


def prompts_and_speech(model, tokenizer, count=6):
    texts = ["<|eng|><|deu|>", "<|deu|><|fra|>", "<|fra|><|eng|>", "hello<|eng|><|cmn|>", "<|cmn|>", "<|eng|>"][:count]
    tokenized = [tokenize_example(tokenizer.hf, text) for text in texts]
    prompts = collate_examples(tokenized, model.num_speech_tokens, tokenizer.hf.pad_token_id, padding_side="left")
    generator = torch.Generator().manual_seed(0)
    speech = torch.randn(len(texts), model.num_speech_tokens, model.llm.config.hidden_size, generator=generator)
    return prompts, speech


@pytest.mark.parametrize("llm", ["gemma2", "gemma3"])
@pytest.mark.parametrize("no_repeat", [0, 3])
def test_fast_greedy_decoder_equals_hf_generate(tiny_config, llm, no_repeat):
    torch.manual_seed(0)
    model, tokenizer = build_model(tiny_config(llm))
    model.eval()
    prompts, speech = prompts_and_speech(model, tokenizer)
    options = GenerationOptions(max_new_tokens=12, no_repeat_ngram_size=no_repeat)
    reference = model.generate_from_speech(speech, prompts, options)
    # make sequences end at different steps: the 'eos' is a token some rows produce early
    model.eos_token_id = reference[1][3]
    reference = model.generate_from_speech(speech, prompts, options)
    assert len({len(ids) for ids in reference}) > 1, "rows should finish at different steps"
    counters = DecodeCounters()
    fast = greedy_decode(model.llm, model.input_embeddings(prompts, speech), prompts.attention_mask, 12,
                         model.eos_token_id, no_repeat, counters)
    assert fast == reference
    # finished rows left the batch: fewer rows computed than batch x steps
    assert counters.token_rows < len(reference) * counters.decode_steps
    assert counters.output_tokens == sum(len(ids) for ids in reference)


def test_directions_and_requests(small_shards):
    entries = load_index(small_shards)
    everything = plan_requests(entries, TranslateConfig(task="srt"))
    assert everything and all(r.tgt != r.src for r in everything)
    into_english = plan_requests(entries, TranslateConfig(task="srt", directions="x-eng"))
    assert into_english and {r.tgt for r in into_english} == {"eng"}
    pair = plan_requests(entries, TranslateConfig(task="srt", directions="deu-fra"))
    assert pair and {(r.src, r.tgt) for r in pair} == {("deu", "fra")}
    assert len(plan_requests(entries, TranslateConfig(task="asr"))) == len(entries)
    with pytest.raises(ValueError, match="not SRC-TGT"):
        parse_directions("deu")
    with pytest.raises(ValueError, match="unknown language code 'xyz'"):
        parse_directions("deu-xyz")


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_translate_encodes_each_utterance_once_and_resumes(tiny_checkpoint, small_shards, tmp_path):
    out = tmp_path / "hyps.jsonl"
    args = ["translate", "--checkpoint", str(tiny_checkpoint), "--data", str(small_shards), "--out", str(out),
            "--task", "srt", "--batch", "8", "--max-new-tokens", "6"]
    assert main(args) == 0
    records = read_jsonl(out)
    entries = load_index(small_shards)
    requests = plan_requests(entries, TranslateConfig(task="srt"))
    assert [r["id"] for r in records] == [r.id for r in requests]  # all of them, in input order
    for record in records:
        assert {"id", "src", "tgt", "hyp", "hyp_transcript", "ref", "src_ref"} <= set(record)
        assert record["ref"] and record["src_ref"]
    summary = json.loads((tmp_path / "hyps.jsonl.summary.json").read_text())
    assert summary["utterances_encoded"] == len(entries) and summary["written"] == len(requests)
    assert summary["srt_malformed"] == sum(not r["well_formed"] for r in records)

    # kill mid-way: keep the first half as a part file, drop the output; the rerun does the rest only
    out.unlink()
    half = records[: len(records) // 2]
    (tmp_path / "hyps.jsonl.part0").write_text("".join(json.dumps(r) + "\n" for r in half) + '{"id": "cut', encoding="utf-8")
    assert main(args) == 0
    summary = json.loads((tmp_path / "hyps.jsonl.summary.json").read_text())
    assert summary["already_done"] == len(half) and summary["written"] == len(records) - len(half)
    again = read_jsonl(out)
    assert [r["id"] for r in again] == [r["id"] for r in records]
    assert [r["output"] for r in again] == [r["output"] for r in records]  # the same model decodes the same
    assert not list(tmp_path.glob("*.part*"))


def test_translate_two_ranks_merge_in_input_order(tiny_checkpoint, small_shards, tmp_path):
    out = tmp_path / "hyps.jsonl"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
               "-m", "mcat_ds.cli", "translate", "--checkpoint", str(tiny_checkpoint), "--data", str(small_shards),
               "--out", str(out), "--task", "asr", "--batch", "4", "--max-new-tokens", "4"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    single = tmp_path / "single.jsonl"
    assert main(["translate", "--checkpoint", str(tiny_checkpoint), "--data", str(small_shards), "--out", str(single),
                 "--task", "asr", "--batch", "4", "--max-new-tokens", "4"]) == 0
    assert [(r["id"], r["output"]) for r in read_jsonl(out)] == [(r["id"], r["output"]) for r in read_jsonl(single)]

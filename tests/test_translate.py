"""mcat translate: the fast decoder equals HF generate, one encoder pass per utterance, resume, ranks."""

import json
import subprocess
import sys
import warnings

import pytest
import torch

from mcat_ds.batching import collate_examples, tokenize_example
from mcat_ds.build import build_model
from mcat_ds.cli import main
from mcat_ds.data.shards import load_index
from mcat_ds.infer.decoding import DecodeCounters, greedy_decode
from mcat_ds.infer.requests import TranslateConfig, parse_directions, plan_requests
from mcat_ds.model.mcat import GenerationOptions
from mcat_ds.train.distributed import free_port


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


@pytest.mark.parametrize("llm", ["gemma2", "gemma3"])
def test_building_and_decoding_raise_no_deprecation_warnings(tiny_config, llm):
    """On transformers 5.x the KV cache argument is ``cache`` and peft's gradient-checkpointing probe
    warns: neither reaches a user of ours (4.x: the same calls, nothing deprecated)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        warnings.simplefilter("error", FutureWarning)
        torch.manual_seed(0)
        model, tokenizer = build_model(tiny_config(llm))
        model.eval()
        prompts, speech = prompts_and_speech(model, tokenizer, count=3)
        ids = greedy_decode(model.llm, model.input_embeddings(prompts, speech), prompts.attention_mask, 4,
                            model.eos_token_id)
    assert len(ids) == 3


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


def test_translate_checks_its_arguments_before_loading_weights(tiny_checkpoint, small_shards, tmp_path, capsys):
    # the base LLM "moved": a model load would fail, so each error below comes from the checks before it
    moved = ["--llm-checkpoint", str(tmp_path / "moved")]
    base = ["translate", "--checkpoint", str(tiny_checkpoint), *moved]
    cases = [
        (["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "h.jsonl")], "no such shard directory or manifest"),
        (["--data", str(small_shards), "--out", str(tmp_path / "no" / "h.jsonl")], "does not exist"),
        (["--data", str(small_shards), "--out", str(tmp_path)], "is a directory"),
        (["--data", str(small_shards), "--out", str(tmp_path / "h.jsonl"), "--directions", "deu-xyz"],
         "unknown language code 'xyz'"),
        (["--data", str(small_shards), "--out", str(tmp_path / "h.jsonl"), "--directions", "khm-x"], "no srt requests"),
        (["--data", str(tmp_path), "--out", str(tmp_path / "h.jsonl")], "holds no index.jsonl"),
    ]
    for extra, message in cases:
        assert main([*base, *extra]) == 2
        assert message in capsys.readouterr().err, extra
    assert main([*base, "--data", str(small_shards), "--out", str(tmp_path / "h.jsonl")]) == 2
    assert "LLM checkpoint directory" in capsys.readouterr().err  # the checks passed; the load is what fails


def test_the_checkpoint_generation_settings_reach_translate(tiny_checkpoint, small_shards, tmp_path, capsys):
    import shutil

    checkpoint = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, checkpoint)
    metadata = json.loads((checkpoint / "mcat_config.json").read_text())
    metadata["config"]["generation"] = {"beams": 1, "max_new_tokens": 40, "no_repeat_ngram_size": 2}
    (checkpoint / "mcat_config.json").write_text(json.dumps(metadata))

    def outputs(name, *flags):
        out = tmp_path / f"{name}.jsonl"
        assert main(["translate", "--checkpoint", str(checkpoint), "--data", str(small_shards), "--out", str(out),
                     "--task", "asr", "--directions", "eng-x,deu-x", *flags]) == 0
        return [r["output"] for r in read_jsonl(out)]

    stored = outputs("stored")
    assert "max_new_tokens=40, no_repeat_ngram_size=2" in capsys.readouterr().out
    assert stored == outputs("explicit", "--max-new-tokens", "40", "--no-repeat-ngram-size", "2")
    assert stored != outputs("plain", "--no-repeat-ngram-size", "0")  # a random model repeats itself


def write_fleurs_16k(root, seconds_by_id, window_samples=None):
    """A two-language FLEURS-style folder of 16 kHz 16-bit noise; ``window_samples`` trims every file."""
    import numpy as np
    import soundfile

    from mcat_ds.languages import get_language

    for number, code in enumerate(("eng", "deu")):
        folder = root / get_language(code).fleurs
        (folder / "audio" / "test").mkdir(parents=True)
        rows = []
        for sentence, seconds in seconds_by_id.items():
            samples = (0.1 * np.random.default_rng(10 * number + sentence).standard_normal(int(seconds * 16000)))
            samples = samples[:window_samples] if window_samples else samples
            soundfile.write(folder / "audio" / "test" / f"{sentence}.wav", samples.astype("float32"), 16000, subtype="PCM_16")
            rows.append("\t".join([str(sentence), f"{sentence}.wav", f"{code} {sentence}", f"{code} {sentence}", "x", "0", "MALE"]))
        (folder / "test.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return root


def test_long_audio_is_trimmed_to_the_window_and_counted_or_skipped(tiny_checkpoint, tmp_path):
    from mcat_ds.data.prepare import prepare_shards
    from mcat_ds.data.sources import read_fleurs

    window = 5 * 16000  # the tiny Whisper's 500 mel frames
    prepare_shards(read_fleurs(write_fleurs_16k(tmp_path / "long", {0: 7.5, 1: 2.0}), "test"), tmp_path / "long_shards",
                   max_seconds=float("inf"), workers=1)
    prepare_shards(read_fleurs(write_fleurs_16k(tmp_path / "cut", {0: 7.5, 1: 2.0}, window), "test"),
                   tmp_path / "cut_shards", max_seconds=float("inf"), workers=1)
    common = ["translate", "--checkpoint", str(tiny_checkpoint), "--task", "srt", "--max-new-tokens", "6"]

    def run(name, data, *flags):
        out = tmp_path / f"{name}.jsonl"
        assert main([*common, "--data", str(tmp_path / data), "--out", str(out), *flags]) == 0
        return read_jsonl(out), json.loads((tmp_path / f"{name}.jsonl.summary.json").read_text())

    trimmed, summary = run("trimmed", "long_shards")
    long_keys = {key for key, entry in ((e.key, e) for e in load_index(tmp_path / "long_shards")) if entry.seconds > 5}
    assert len(long_keys) == 2 and set(summary["trimmed_audio"]) == long_keys
    assert all(seconds == 7.5 for seconds in summary["trimmed_audio"].values())
    assert len(trimmed) == 4 and not summary["skipped_audio"]  # every utterance scored
    cut, _ = run("cut", "cut_shards")
    assert [r["output"] for r in trimmed] == [r["output"] for r in cut]  # = decoding the first window

    skipped, summary = run("skipped", "long_shards", "--long-audio", "skip")
    assert set(summary["long_audio_skipped"]) == long_keys and set(summary["skipped_audio"]) == long_keys
    assert len(skipped) == 2 and not summary["trimmed_audio"]


def test_each_vllm_rank_sees_its_own_gpus():
    from mcat_ds.rendezvous import RendezvousError, rank_gpus

    assert rank_gpus({}, local_rank=3, local_world_size=4, gpus_per_rank=2) == "6,7"
    assert rank_gpus({"CUDA_VISIBLE_DEVICES": "4,5,6,7"}, local_rank=1, local_world_size=2, gpus_per_rank=2) == "6,7"
    # srun with GPU binding gave this task its GPU: kept
    bound = {"CUDA_VISIBLE_DEVICES": "5", "SLURM_LOCALID": "1"}
    assert rank_gpus(bound, local_rank=1, local_world_size=8, gpus_per_rank=1) == "5"
    # torchrun, two GPUs visible, two ranks of two GPUs each: refused, not one pair shared by both
    with pytest.raises(RendezvousError, match="need 4 GPUs"):
        rank_gpus({"CUDA_VISIBLE_DEVICES": "0,1", "TORCHELASTIC_RUN_ID": "x"}, local_rank=0, local_world_size=2,
                  gpus_per_rank=2)
    with pytest.raises(RendezvousError, match="GPUs / --tensor-parallel"):
        rank_gpus({"CUDA_VISIBLE_DEVICES": "0,1,2"}, local_rank=1, local_world_size=2, gpus_per_rank=2)


def test_vllm_refuses_beams_before_loading_anything(tiny_checkpoint, small_shards, tmp_path, capsys):
    assert main(["translate", "--checkpoint", str(tiny_checkpoint), "--data", str(small_shards),
                 "--out", str(tmp_path / "h.jsonl"), "--engine", "vllm", "--beams", "4"]) == 2
    assert "--engine vllm decodes greedily" in capsys.readouterr().err

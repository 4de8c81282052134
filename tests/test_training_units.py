"""Trainer pieces that need no process group."""

import json

import pytest
import torch
from safetensors.torch import save_file

from mcat_ds.config import ConfigError
from mcat_ds.data.plan import deal_to_rank
from mcat_ds.presets import resolve_config
from mcat_ds.train.distributed import rendezvous_environment
from mcat_ds.train.engine import RECIPE_KEYS, deepspeed_config, learning_rate
from mcat_ds.train.monitor import truncate_metrics
from mcat_ds.train.stage import (
    Placement,
    StageError,
    _starting_point,
    check_resumable,
    resumed_position,
    run_stage,
    stage_paths,
)
from mcat_ds.train.state import (
    LATEST_FILE,
    OPTIMIZER_FILE,
    STATE_FILE,
    WEIGHTS_FILE,
    TrainingState,
    _prune,
    _remove_unfinished,
    checkpoint_problem,
    latest_checkpoint,
    seal_checkpoint,
)


def test_engine_files_hold_no_recipe_keys_and_the_recipe_is_injected(tmp_path):
    config = resolve_config("small-9b", overrides=["stage.micro_batch_size=5", "stage.grad_accum_steps=3",
                                                    "optim.grad_clip=0.5"])
    for engine in ("zero2_bf16", "zero2_offload", "zero3"):
        config.runtime.engine = engine
        settings = deepspeed_config(config, on_gpu=True)
        assert settings["train_micro_batch_size_per_gpu"] == 5 and settings["gradient_accumulation_steps"] == 3
        assert settings["gradient_clipping"] == 0.5 and settings["bf16"]["enabled"]
    assert deepspeed_config(config, on_gpu=False)["bf16"] == {"enabled": False}
    bad = tmp_path / "mine.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 4,
                               "optimizer": {"type": "Adam"}}))
    config.runtime.engine = str(bad)
    with pytest.raises(ConfigError, match=r"mine.json sets train_micro_batch_size_per_gpu, optimizer: .*stage"):
        deepspeed_config(config, on_gpu=True)
    config.runtime.engine = "zero4"
    with pytest.raises(ConfigError, match=r"unknown engine 'zero4': ds_configs/ has zero2_bf16, zero2_offload, zero3"):
        deepspeed_config(config, on_gpu=True)
    assert "gradient_accumulation_steps" in RECIPE_KEYS


def test_learning_rate_warmup_constant_and_cosine():
    config = resolve_config("small-9b", overrides=["optim.lr=1.0", "optim.warmup_steps=10"])
    assert learning_rate(config, 0, 100) == pytest.approx(0.1)
    assert learning_rate(config, 9, 100) == pytest.approx(1.0)
    assert learning_rate(config, 50, 100) == 1.0
    config.optim.schedule, config.optim.decay_start, config.optim.min_lr_ratio = "cosine", 0.5, 0.1
    assert learning_rate(config, 49, 100) == 1.0
    assert learning_rate(config, 75, 100) == pytest.approx(0.1 + 0.9 * 0.5)
    assert learning_rate(config, 100, 100) == pytest.approx(0.1)
    assert all(learning_rate(config, s, 100) >= learning_rate(config, s + 1, 100) for s in range(10, 100))


def test_a_stage_needs_the_final_checkpoint_of_the_stage_it_starts_from(tmp_path):
    config = resolve_config("tiny", stage="srt")
    assert config.stage.init_from == "smt"
    with pytest.raises(StageError, match=r"starts from the final checkpoint of stage smt.*run `--stage smt` first"):
        _starting_point(config, tmp_path, None)
    first = resolve_config("tiny", stage="asr-l2")
    assert _starting_point(first, tmp_path, None) is None
    with pytest.raises(Exception, match="is not an MCAT checkpoint"):
        _starting_point(config, tmp_path, tmp_path / "nowhere")
    # small-9b skips asr-l44/asr-l70: its balanced ASR starts from asr-l28
    assert resolve_config("small-9b", stage="asr-balanced").stage.init_from == "asr-l28"
    assert resolve_config("large-27b", stage="asr-balanced").stage.init_from == "asr-l70"


def test_no_data_for_the_stage_languages_is_a_clear_error(small_shards, tmp_path):
    config = resolve_config("tiny", stage="asr-l28", overrides=[f"data.path={small_shards}", "model.languages=jpn,rus"])
    with pytest.raises(StageError, match=r"selects jpn, rus, but .* holds no usable example .*its languages: cmn, deu, eng, fra"):
        run_stage(config, tmp_path, Placement(0, 1, torch.device("cpu")))


def make_checkpoint(root, step, complete=True):
    """A checkpoint folder whose files read back whole (tiny tensors, as a save writes them)."""
    path = root / f"step-{step:08d}"
    path.mkdir(parents=True)
    save_file({"w": torch.full((4,), float(step))}, str(path / WEIGHTS_FILE))
    save_file({"w::exp_avg": torch.zeros(4), "w::exp_avg_sq": torch.zeros(4)}, str(path / OPTIMIZER_FILE))
    (path / STATE_FILE).write_text(json.dumps({"step": step, "epoch": 0, "positions": [step], "world_size": 1,
                                               "adam_step": step}))
    if complete:
        seal_checkpoint(path)
    return path


def cut(path, keep_bytes):
    path.write_bytes(path.read_bytes()[:keep_bytes])


def test_the_newest_complete_checkpoint_wins_over_a_stale_pointer(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    make_checkpoint(tmp_path, 10)
    newest = make_checkpoint(tmp_path, 20)
    make_checkpoint(tmp_path, 30, complete=False)  # killed while writing
    (tmp_path / LATEST_FILE).write_text("step-00000030")
    assert latest_checkpoint(tmp_path) == newest
    (tmp_path / LATEST_FILE).write_text("step-00000010")  # killed between COMPLETE and the pointer's move
    assert latest_checkpoint(tmp_path) == newest
    _prune(tmp_path, keep=1)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000020", "step-00000030"]


def test_a_cut_checkpoint_is_named_and_pruning_spares_the_older_ones(tmp_path):
    make_checkpoint(tmp_path, 10)
    newest = make_checkpoint(tmp_path, 20)
    assert checkpoint_problem(newest) is None
    size = (newest / WEIGHTS_FILE).stat().st_size
    cut(newest / WEIGHTS_FILE, size - 3)  # the tensors never reached the disk, COMPLETE did
    assert f"holds {size - 3} bytes, its header says {size}" in checkpoint_problem(newest)
    _prune(tmp_path, keep=1)
    assert (tmp_path / "step-00000010").is_dir(), "the last loadable checkpoint was pruned"
    cut(newest / OPTIMIZER_FILE, 5)
    (newest / WEIGHTS_FILE).unlink()
    assert checkpoint_problem(newest) == f"{WEIGHTS_FILE} is missing"
    (newest / STATE_FILE).write_bytes(b'{"step": 2\xff')
    assert checkpoint_problem(newest).startswith(f"{STATE_FILE} is not the one saved")
    (newest / "COMPLETE").write_text("")  # a checkpoint saved before seals: the content is all there is
    assert checkpoint_problem(newest).startswith(f"{STATE_FILE} is damaged")


def test_unfinished_saves_are_cleared(tmp_path):
    make_checkpoint(tmp_path, 10)
    make_checkpoint(tmp_path, 20, complete=False)
    (tmp_path / f"{LATEST_FILE}.tmp-123").write_text("step-00000020")
    _remove_unfinished(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000010"]


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2), (4, 3), (3, 8)])
def test_a_resume_on_another_number_of_ranks_sees_each_example_once(before, after):
    plan = list(range(101))  # stands for an epoch's planned examples
    positions = [6] * before  # every rank took 6 of its share (micro-batches of 2 or 3, say)
    seen = [example for rank in range(before) for example in deal_to_rank(plan, rank, before)[:6]]
    state = TrainingState(step=3, epoch=0, positions=positions, world_size=before)
    for rank in range(after):
        offset, position = resumed_position(state, Placement(rank, after, torch.device("cpu")))
        seen += deal_to_rank(plan, rank, after, offset)[position:]
    assert len(seen) == len(set(seen)), "an example was repeated"
    assert len(plan) - len(seen) < after, "more than the epoch's remainder was left out"
    # saved again on the new ranks, then resumed on the old number: still nothing repeated
    state = TrainingState(step=4, epoch=0, positions=[2] * after, world_size=after, plan_offset=6 * before)
    again = [e for rank in range(before) for e in deal_to_rank(plan, rank, before, state.examples_consumed())]
    used = [e for rank in range(after) for e in deal_to_rank(plan, rank, after, 6 * before)[:2]]
    assert set(again).isdisjoint(used) and set(again).isdisjoint(seen[:6 * before])


def test_a_resume_with_other_data_settings_is_refused_by_name(tmp_path):
    saved = {"data.index_sha256": "ab", "data.seed": 0, "stage.micro_batch_size": 3}
    assert check_resumable(saved, dict(saved), tmp_path, accept=False) is None
    changed = {**saved, "data.seed": 1, "stage.micro_batch_size": 4}
    with pytest.raises(StageError, match=r"data.seed: 0 then, 1 now; stage.micro_batch_size: 3 then, 4 now.*"
                                         r"runtime.accept_changed_data=true"):
        check_resumable(saved, changed, tmp_path, accept=False)
    assert "data.seed" in check_resumable(saved, changed, tmp_path, accept=True)
    assert "predates" in check_resumable(None, changed, tmp_path, accept=False)


def test_metrics_after_the_resumed_step_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 8)))
    truncate_metrics(path, 4)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]


@pytest.mark.parametrize("damage", [b'{"step": 8, "lo', b'{"step": 8, "note": "\xe6\x97', b"\xff\xfe garbage", b'{"loss": 1}'])
def test_a_damaged_metrics_line_is_dropped_with_its_file_and_line_named(tmp_path, damage):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b"".join(json.dumps({"step": s}).encode() + b"\n" for s in range(1, 4)) + damage)
    warnings = []
    truncate_metrics(path, 10, warn=warnings.append)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    assert len(warnings) == 1 and warnings[0].startswith(f"{path}:4: dropped")
    assert not list(tmp_path.glob("metrics.jsonl.tmp-*"))


def test_rendezvous_from_slurm_or_defaults():
    slurm = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "2",
             "MASTER_ADDR": "node1", "MASTER_PORT": "29400"}
    assert rendezvous_environment(slurm) == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert rendezvous_environment({"RANK": "0", "WORLD_SIZE": "2"}) == {}
    single = rendezvous_environment({})
    assert single["RANK"] == "0" and single["WORLD_SIZE"] == "1" and int(single["MASTER_PORT"]) > 0
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        rendezvous_environment({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"})


def test_a_rendezvous_that_would_hang_fails_at_once_or_within_its_timeout():
    import time

    from mcat_ds.rendezvous import RendezvousError, check_rendezvous, choose_socket_interface, free_port, interface_of

    port = str(free_port())
    with pytest.raises(RendezvousError, match=r"no-such-node.invalid:\d+ .* does not resolve"):
        check_rendezvous({"MASTER_ADDR": "no-such-node.invalid", "MASTER_PORT": port, "RANK": "1", "WORLD_SIZE": "2"})
    with pytest.raises(RendezvousError, match="192.0.2.1, which is not an address of this host"):
        check_rendezvous({"MASTER_ADDR": "192.0.2.1", "MASTER_PORT": port, "RANK": "0", "WORLD_SIZE": "2"})
    started = time.monotonic()
    with pytest.raises(RendezvousError, match=rf"rank 1 .* could not reach the rendezvous at 127.0.0.1:{port} .* within 1 s"):
        check_rendezvous({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": "1", "WORLD_SIZE": "2",
                          "MCAT_RENDEZVOUS_TIMEOUT": "1"})
    assert time.monotonic() - started < 10
    stops = iter([False, True])
    with pytest.raises(RendezvousError, match="stopped by a signal"):
        check_rendezvous({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": "1", "WORLD_SIZE": "2"},
                         should_stop=lambda: next(stops))
    assert check_rendezvous({"MASTER_ADDR": "localhost", "MASTER_PORT": port, "RANK": "0", "WORLD_SIZE": "2"}) == "127.0.0.1"
    assert interface_of("127.0.0.1") == "lo"
    environ = {}
    assert choose_socket_interface("127.0.0.1", environ) is None and environ == {}  # one node: nothing to choose
    environ = {"GLOO_SOCKET_IFNAME": "ib0", "NCCL_SOCKET_IFNAME": "ib0"}
    assert choose_socket_interface("10.0.0.1", environ) is None and environ["GLOO_SOCKET_IFNAME"] == "ib0"  # the user's


def test_stage_paths():
    paths = stage_paths("/runs/x", "srt")
    assert paths.final.as_posix() == "/runs/x/srt/final" and paths.checkpoints.as_posix() == "/runs/x/srt/checkpoints"


def test_memory_check_says_what_does_not_fit_and_what_would():
    from mcat_ds.train.costs import InsufficientMemoryError, check_memory_fits

    large = resolve_config("large-27b", stage="srt")
    gib = 2**30
    with pytest.raises(InsufficientMemoryError, match=r"large-27b needs about \d+\.\d GiB \(frozen weights .*\) per GPU .*A100-40GB has 40.0 GiB.*zero3"):
        check_memory_fits(large, 8, 2, False, 40 * gib, "A100-40GB")
    sharded = check_memory_fits(large, 8, 3, False, 40 * gib, "A100-40GB")  # ZeRO-3 shards the 27B weights
    assert sharded.frozen_weights < 8 * gib
    small = check_memory_fits(resolve_config("small-9b", stage="srt"), 8, 2, False, 80 * gib, "H100")
    assert 18 * gib < small.frozen_weights < 21 * gib  # 9.9B frozen parameters in bf16
    assert small.total < 80 * gib


def test_step_flops_count_the_frozen_llm_forward_and_activation_gradients():
    from mcat_ds.build import ParameterCounts
    from mcat_ds.train.costs import peak_flops, step_flops

    config = resolve_config("small-9b")
    counts = ParameterCounts(total=0, trainable=0, encoder=10, adapter=0, llm=1000, lora=0)
    assert step_flops(counts, llm_tokens=7, samples=0, encoder_frames=1500, config=config, encoder_width=1280) == 4 * 1000 * 7
    # 300 of the 1000 are the embedding table: a lookup for every token, a matmul (the head) for the 3 labels
    assert step_flops(counts, llm_tokens=7, samples=0, encoder_frames=1500, config=config, encoder_width=1280,
                      head_parameters=300, label_tokens=3) == 4 * 700 * 7 + 4 * 300 * 3
    with_speech = step_flops(counts, llm_tokens=0, samples=2, encoder_frames=1500, config=config, encoder_width=1280)
    kv = 2 * 4 * 1280 * 768  # K and V projections of the 4 cross-attention layers
    assert with_speech == 2 * 10 * 1500 * 2 + 6 * kv * 1500 * 2
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and peak_flops("CPU") is None

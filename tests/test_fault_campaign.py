"""A fault campaign: SIGKILLs at seeded random moments, full disks and damaged training state. Every
command can be run again after any of them to the result an uninterrupted run gives, and a failure
names the file it is about. The kill machinery is mcat_ds.bench.faults, which launch/bench_faults.py
runs at length."""

import math
import os
import subprocess
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from mcat_ds.bench import faults
from mcat_ds.data.demo import demo_texts
from mcat_ds.tiny import write_random_checkpoint
from mcat_ds.train.state import (
    COMPLETE_FILE,
    STATE_FILE,
    WEIGHTS_FILE,
    checkpoint_problem,
    complete_checkpoints,
    resume_training_state,
    seal_checkpoint,
)
from test_damaged_inputs import damage
from test_training_units import make_checkpoint

KILLS = {"training": 6, "translate": 6, "prepare": 5, "evaluate": 4}
SEED = 0
PAGE = 4096


@pytest.fixture(scope="module")
def environment():
    return faults.subprocess_environment()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def campaigns():
    """Each command's campaign result, for the count of landed kills over all of them."""
    return {}


def reference_run(target, work, environment):
    reference = work / target.name / "reference"
    return reference, faults.run_uninterrupted(target, reference, environment)


@pytest.fixture(scope="module")
def training(small_shards, work, environment):
    target = faults.training_target(small_shards, steps=12, save_every=1)
    return target, *reference_run(target, work, environment)


@pytest.fixture(scope="module")
def translating(work, environment):
    """Translate (SRT, batches of 2) over 16 utterances whose references and outputs hold non-ASCII text."""
    inputs = work / "translate-inputs"
    shards = faults.write_shards(faults.write_parallel_fleurs(inputs / "fleurs", sentences=4), inputs / "shards")
    checkpoint = write_random_checkpoint(inputs / "models")
    target = faults.translate_target(checkpoint, shards, batch=2, max_new_tokens=12)
    return target, *reference_run(target, work, environment)


def run_campaign(name, setup, work, environment, campaigns):
    target, reference, seconds = setup
    result = faults.kill_campaign(target, work / name, reference, seconds, KILLS[name], SEED, environment)
    campaigns[name] = result
    print(result.describe())
    assert result.kills_landed == KILLS[name], result.describe()
    assert result.identical, result.describe()
    return result


@pytest.mark.slow
def test_training_killed_at_random_moments_resumes_to_the_same_losses_and_weights(training, work, environment,
                                                                                   campaigns):
    """Kills land in the launcher's start, the ranks' model building, steps and checkpoint writes
    (a save every step); each resume repeats no step and gives bit-identical losses and weights."""
    run_campaign("training", training, work, environment, campaigns)


@pytest.mark.slow
def test_translate_killed_at_random_moments_writes_the_same_bytes(translating, work, environment, campaigns):
    run_campaign("translate", translating, work, environment, campaigns)


@pytest.mark.slow
def test_prepare_killed_at_random_moments_prepares_the_same_shards(work, environment, campaigns):
    fleurs = faults.write_parallel_fleurs(work / "prepare-inputs", sentences=20)
    target = faults.prepare_target(fleurs, workers=2, shard_samples=10)
    run_campaign("prepare", (target, *reference_run(target, work, environment)), work, environment, campaigns)


@pytest.mark.slow
def test_evaluate_killed_at_random_moments_writes_the_same_tables(work, environment, campaigns):
    pytest.importorskip("comet", reason="unbabel-comet is the [comet] extra")
    from tiny_comet import write_tiny_comet

    comet = write_tiny_comet(work / "comet", demo_texts())
    target = faults.evaluate_target(faults.write_evaluation_hyps(work / "hyps.jsonl"), comet)
    run_campaign("evaluate", (target, *reference_run(target, work, environment)), work, environment, campaigns)


@pytest.mark.slow
def test_at_least_twenty_kills_landed_in_all(campaigns):
    if set(campaigns) != set(KILLS):
        pytest.skip("counts the kills of the four campaigns above, run in the same session")
    print("\n".join(result.describe() for result in campaigns.values()))
    assert sum(result.kills_landed for result in campaigns.values()) >= 20


@pytest.mark.slow
def test_bench_faults_smoke_appends_a_row_per_command(tmp_path):
    from mcat_ds.bench.harness import read_rows

    table = tmp_path / "faults.csv"
    assert faults.main(["--smoke", "--commands", "prepare", "--csv", str(table)]) == 0
    (row,) = read_rows(table)
    assert (row["command"], row["kills_landed"], row["runs_recovered"], row["identical"]) == ("prepare", "1", "1", "yes")
    assert row["device"] and row["commit"] and float(row["seconds"]) > 0


# ------------------------------------------------------------------------------------------------ full disks


@pytest.fixture
def tmpfs():
    """mount(folder, kib) puts a tmpfs of that size on a new folder; unmounted after the test."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs the suite as root)")
    mounted = []

    def mount(folder, kib):
        folder.mkdir(parents=True)
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(folder)],
                                capture_output=True, text=True)
        if result.returncode:
            pytest.skip(f"mount -t tmpfs failed: {result.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=False)


def grow(folder, kib):
    subprocess.run(["mount", "-o", f"remount,size={kib}k", str(folder)], check=True)


def kib_on_tmpfs(path):
    """What ``path`` (a file or a folder) takes on a tmpfs: whole pages per file."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(math.ceil(p.stat().st_size / PAGE) for p in files) * PAGE // 1024


def run_into(target, folder, environment):
    result = subprocess.run(target.command(folder), capture_output=True, text=True, timeout=600, env=environment)
    return result.returncode, result.stdout + result.stderr


def names_the_full_disk(log, mount):
    return any("No space left on device" in line and str(mount) in line for line in log.splitlines())


@pytest.mark.slow
def test_a_full_disk_stops_training_naming_the_path_and_after_space_is_freed_it_completes(training, tmp_path, tmpfs,
                                                                                          environment):
    """The run folder fills while the third checkpoint is written. Every checkpoint marked complete
    still loads; the newest one is then damaged as well (bytes of state.json changed): the rerun passes over
    it and ends with the uninterrupted losses."""
    target, reference, _ = training
    checkpoint = kib_on_tmpfs(complete_checkpoints(reference / "asr-l2" / "checkpoints")[-1])
    mount = tmpfs(tmp_path / "disk", kib_on_tmpfs(reference / "base") + int(2.5 * checkpoint))
    code, log = run_into(target, mount / "run", environment)
    assert code != 0 and "No space left on device" in log, log[-4000:]
    complete = complete_checkpoints(mount / "run" / "asr-l2" / "checkpoints")
    assert len(complete) >= 2, (complete, log[-3000:])
    assert all(checkpoint_problem(path) is None for path in complete)
    assert all((path / COMPLETE_FILE).is_file() for path in complete)
    newest = complete[-1]
    (newest / STATE_FILE).write_bytes(damage((newest / STATE_FILE).read_bytes(), "invalid", 0))

    grow(mount, 4 * kib_on_tmpfs(reference))
    resumed, resumed_log = run_into(target, mount / "run", environment)
    assert resumed == 0, resumed_log[-4000:]
    assert f"passed over: {newest.name} ({STATE_FILE} is not the one saved" in resumed_log
    assert faults.compare_training(mount / "run" / "asr-l2", reference / "asr-l2") == []
    assert names_the_full_disk(log, mount), [line for line in log.splitlines() if "No space" in line]


@pytest.mark.slow
def test_a_full_disk_stops_translate_naming_the_path_and_after_space_is_freed_it_completes(translating, tmp_path,
                                                                                           tmpfs, environment):
    """The output's disk holds half of what the outputs take: translate stops with its part file cut
    (perhaps inside a multi-byte character); on a larger disk the rerun ends with the same bytes."""
    target, reference, _ = translating
    out = reference / faults.TRANSLATE_OUT
    mount = tmpfs(tmp_path / "disk", kib_on_tmpfs(out.with_name(out.name + ".identity.json"))
                  + max(4, kib_on_tmpfs(out) // 2))
    code, log = run_into(target, mount, environment)
    assert code != 0 and "No space left on device" in log, log[-4000:]
    assert not (mount / faults.TRANSLATE_OUT).exists()

    grow(mount, 4 * kib_on_tmpfs(reference))
    resumed, resumed_log = run_into(target, mount, environment)
    assert resumed == 0, resumed_log[-4000:]
    assert target.compare(mount, reference) == []
    assert names_the_full_disk(log, mount), [line for line in log.splitlines() if "No space" in line]


# ------------------------------------------------------------------------------------------------ bad bytes


TRAINING_STATE_FILES = (STATE_FILE, "trainable.safetensors", "optimizer.safetensors", "rng-rank00000.safetensors")


def saved_state(folder, step=10):
    """A checkpoint of one rank in ``folder`` whose every file reads back whole (its RNG file is
    checked too)."""
    path = make_checkpoint(folder, step)
    save_file({"torch": torch.get_rng_state()}, str(path / "rng-rank00000.safetensors"))
    seal_checkpoint(path)
    assert checkpoint_problem(path, rank=0) is None
    return path


@pytest.mark.parametrize("name", TRAINING_STATE_FILES)
@pytest.mark.parametrize("kind,seed", [(kind, seed) for kind in ("cut", "invalid") for seed in range(3)])
def test_a_cut_training_state_file_or_one_with_foreign_bytes_is_named(tmp_path, name, kind, seed):
    checkpoint = saved_state(tmp_path)
    path = checkpoint / name
    path.write_bytes(damage(path.read_bytes(), kind, seed))
    problem = checkpoint_problem(checkpoint, rank=0)
    assert problem is not None and name in problem, problem


def test_a_flipped_bit_in_a_training_state_file_is_named(tmp_path):
    """A bit the disk or the network flipped, anywhere in a file: a resume must not load it."""
    unnoticed = []
    for name in TRAINING_STATE_FILES:
        for seed in range(5):
            checkpoint = saved_state(tmp_path / f"{name}-{seed}")
            path = checkpoint / name
            data = path.read_bytes()
            path.write_bytes(damage(data, "flip", seed))
            problem = checkpoint_problem(checkpoint, rank=0)
            if problem is None or name not in problem:
                unnoticed.append(f"{name} (seed {seed}, {len(data)} bytes): {problem}")
    assert not unnoticed, "flipped bits that pass checkpoint_problem:\n" + "\n".join(unnoticed)


class StandInEngine:
    """What load_training_state touches of a DeepSpeed engine, for a model with nothing to train."""

    module = torch.nn.Linear(1, 1).requires_grad_(False)
    optimizer = SimpleNamespace(optimizer=SimpleNamespace(state={}))


def test_a_resume_passes_over_a_checkpoint_whose_header_a_flipped_bit_made_unreadable(tmp_path):
    older = saved_state(tmp_path)
    newest = saved_state(tmp_path, 20)
    path = newest / WEIGHTS_FILE
    data = path.read_bytes()
    at = data.index(b'"F32"') + 2
    path.write_bytes(data[:at] + bytes([data[at] ^ 0x40]) + data[at + 1:])  # its dtype now reads "Fs2"
    said = []
    checkpoint, state = resume_training_state(StandInEngine(), tmp_path, said.append)
    assert (checkpoint, state.step) == (older, 10)
    assert len(said) == 1 and f"passed over: {newest.name} (" in said[0], said

"""Several nodes for real: a 3-node SLURM cluster of network namespaces (tests/slurm_cluster.py), each
node with a Debian-style hosts file (its own name -> 127.0.1.1). Training across nodes equals one
node's curve; a preemption warning and then a dead node each requeue the job, which resumes with
every step once; a bad rendezvous address fails fast, naming itself; translation over 2 nodes equals
one process's and resumes."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from conftest import deepspeed_training_command, read_metrics
from slurm_cluster import NamespacedSlurm, available

pytestmark = [pytest.mark.slow, pytest.mark.skipif(available(namespaces=True) is not None,
                                                   reason=str(available(namespaces=True)))]

REPO = __import__("conftest").REPO
TRAIN = REPO / "launch" / "slurm" / "train.sbatch"
TRANSLATE = REPO / "launch" / "slurm" / "translate.sbatch"
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    nodes = NamespacedSlurm(tmp_path_factory.mktemp("nodes"), nodes=3)
    nodes.start()
    yield nodes
    nodes.stop()


def submit(cluster, workdir, script, *args, nodes=2, env=()):
    exports = ",".join(["ALL", f"MCAT_PYTHON={sys.executable}", "DS_ACCELERATOR=cpu", *env])
    result = cluster.run("sbatch", "--parsable", f"--nodes={nodes}", f"--export={exports}", str(script), *args, cwd=workdir)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def wait_done(cluster, job, timeout=600):
    return cluster.wait_for(job, DONE, timeout)


def log_of(workdir, job, prefix="mcat"):
    path = workdir / f"{prefix}-{job}.out"
    return path.read_text(errors="replace") if path.is_file() else ""


def training_args(run_dir, shards, steps, save_every=1000):
    return ["--stage", "asr-l2", "--preset", "tiny", "--run-dir", str(run_dir), "--data", str(shards),
            "--max-steps", str(steps), "--save-every", str(save_every), "--set", "stage.eval_every=0"]


@pytest.mark.parametrize("per_node", [1, 2])
def test_two_nodes_train_the_curve_of_one_node_with_the_same_world_size(cluster, small_shards, tmp_path, per_node):
    job = submit(cluster, tmp_path, TRAIN, *training_args(tmp_path / "nodes", small_shards, 4),
                 env=[f"MCAT_PROCS_PER_NODE={per_node}"])
    assert wait_done(cluster, job) == "COMPLETED", log_of(tmp_path, job)[-4000:]
    log = log_of(tmp_path, job)
    assert f"{per_node} ranks per node" in log and "sockets on eth0" in log  # not the 127.0.1.1 its name resolves to
    one_node = subprocess.run(deepspeed_training_command(*training_args(tmp_path / "one", small_shards, 4),
                                                         ranks=2 * per_node),
                              capture_output=True, text=True, timeout=600, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert one_node.returncode == 0, one_node.stderr[-4000:]
    across = read_metrics(tmp_path / "nodes" / "asr-l2" / "metrics.jsonl")
    local = read_metrics(tmp_path / "one" / "asr-l2" / "metrics.jsonl")
    assert [m["step"] for m in across] == [m["step"] for m in local] == [1, 2, 3, 4]
    assert [m["loss"] for m in across] == pytest.approx([m["loss"] for m in local], rel=1e-5)


def test_a_bad_rendezvous_address_fails_fast_naming_it(cluster, small_shards, tmp_path):
    started = time.time()
    job = submit(cluster, tmp_path, TRAIN, *training_args(tmp_path / "run", small_shards, 4),
                 env=["MCAT_MASTER_ADDR=no-such-node.invalid", "MCAT_PROCS_PER_NODE=1"])
    assert wait_done(cluster, job, timeout=180) == "FAILED"
    log = log_of(tmp_path, job)
    assert "the rendezvous address no-such-node.invalid:" in log and "does not resolve" in log, log[-3000:]

    # resolves, but is no node's: rank 0 says so at once, rank 1 after MCAT_RENDEZVOUS_TIMEOUT
    nowhere = f"10.{cluster.subnet}.0.99"
    job = submit(cluster, tmp_path, TRAIN, *training_args(tmp_path / "run", small_shards, 4),
                 env=[f"MCAT_MASTER_ADDR={nowhere}", "MCAT_RENDEZVOUS_TIMEOUT=5", "MCAT_PROCS_PER_NODE=1"])
    assert wait_done(cluster, job, timeout=180) == "FAILED"
    log = log_of(tmp_path, job)
    assert f"{nowhere}, which is not an address of this host" in log, log[-3000:]
    assert time.time() - started < 150  # neither job waited out a TCP store's ten minutes


def test_preemption_then_a_dead_node_requeue_and_resume_with_every_step_once(cluster, small_shards, tmp_path):
    run_dir = tmp_path / "run"
    metrics = run_dir / "asr-l2" / "metrics.jsonl"
    job = submit(cluster, tmp_path, TRAIN, *training_args(run_dir, small_shards, 60, save_every=4),
                 env=["MCAT_PROCS_PER_NODE=1"])

    def wait_steps(count, timeout=300):
        deadline = time.time() + timeout
        while not (metrics.is_file() and len(read_metrics(metrics)) >= count):
            assert time.time() < deadline, log_of(tmp_path, job)[-3000:]
            time.sleep(0.3)

    wait_steps(3)
    assert cluster.run("scancel", "--batch", "--signal=USR1", job).returncode == 0
    deadline = time.time() + 300
    while "resumed from" not in log_of(tmp_path, job):
        assert time.time() < deadline, log_of(tmp_path, job)[-3000:]
        time.sleep(0.5)
    first_nodes = cluster.run("scontrol", "show", "hostnames", cluster.job_field(job, "NodeList")).stdout.split()
    wait_steps(len(read_metrics(metrics)) + 9)  # a checkpoint (every 4 steps) after the resume
    victim = first_nodes[1]  # not the batch host: its trainer dies, the survivor's step fails
    cluster.kill_node(victim)
    try:
        assert wait_done(cluster, job, timeout=600) == "COMPLETED", log_of(tmp_path, job)[-4000:]
        log = log_of(tmp_path, job)
        assert "restart 2" in log and cluster.job_field(job, "Restarts") == "2"
        last_nodes = cluster.run("scontrol", "show", "hostnames", cluster.job_field(job, "NodeList")).stdout.split()
        assert victim not in last_nodes and len(last_nodes) == 2
        assert [m["step"] for m in read_metrics(metrics)] == list(range(1, 61))  # every step logged once
    finally:
        cluster.start_node(victim)  # back for the next test (ReturnToService=2)
        cluster.wait_idle(3)


def test_translate_over_two_nodes_equals_one_process_and_resumes(cluster, small_shards, tiny_dirs, tmp_path):
    from mcat_ds.build import build_model
    from mcat_ds.checkpoint import save_checkpoint
    from mcat_ds.cli import main
    from mcat_ds.config import apply_overrides
    from mcat_ds.presets import get_preset

    config = get_preset("tiny")
    config.model.encoder.checkpoint, config.model.llm.checkpoint = str(tiny_dirs["whisper"]), str(tiny_dirs["gemma2"])
    config = apply_overrides(config, ["model.llm.train_embeddings=tags"])
    torch.manual_seed(0)
    save_checkpoint(*build_model(config), config, tmp_path / "ckpt")
    args = ["--checkpoint", str(tmp_path / "ckpt"), "--data", str(small_shards), "--task", "srt", "--max-new-tokens", "5"]

    assert main(["translate", *args, "--out", str(tmp_path / "single.jsonl")]) == 0
    single = [json.loads(line) for line in (tmp_path / "single.jsonl").read_text().splitlines()]
    out = tmp_path / "nodes.jsonl"
    job = submit(cluster, tmp_path, TRANSLATE, *args, "--out", str(out), env=["MCAT_PROCS_PER_NODE=1"])
    assert wait_done(cluster, job) == "COMPLETED", log_of(tmp_path, job, "mcat-translate")[-4000:]
    across = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["id"], r["output"]) for r in across] == [(r["id"], r["output"]) for r in single]

    # a requeued job finds half its outputs written: it decodes only the rest
    out.write_text("".join(json.dumps(r) + "\n" for r in across[: len(across) // 2]))
    job = submit(cluster, tmp_path, TRANSLATE, *args, "--out", str(out), env=["MCAT_PROCS_PER_NODE=1"])
    assert wait_done(cluster, job) == "COMPLETED", log_of(tmp_path, job, "mcat-translate")[-4000:]
    summary = json.loads((tmp_path / "nodes.jsonl.summary.json").read_text())
    assert summary["already_done"] == len(across) // 2
    assert [(r["id"], r["output"]) for r in map(json.loads, out.read_text().splitlines())] == \
        [(r["id"], r["output"]) for r in single]

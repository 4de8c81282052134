"""launch/slurm/train.sbatch on a real SLURM: two CPU ranks, a preemption warning, requeue, resume."""

import os
import time

import pytest

from conftest import REPO, read_metrics
from slurm_cluster import LocalSlurm, available

pytestmark = [pytest.mark.slow, pytest.mark.skipif(available() is not None, reason=str(available()))]

SCRIPT = REPO / "launch" / "slurm" / "train.sbatch"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    cluster.start()
    yield cluster
    cluster.stop()


def submit(slurm, workdir, *args):
    env_python = os.environ.get("MCAT_PYTHON", __import__("sys").executable)
    result = slurm.run("sbatch", "--parsable", f"--export=ALL,MCAT_PYTHON={env_python}", str(SCRIPT), *args,
                       cwd=workdir)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def wait_state(slurm, job, states, timeout=600):
    return slurm.wait_for(job, states, timeout)


def test_two_cpu_ranks_train_a_stage(slurm, small_shards, tmp_path):
    run_dir = tmp_path / "run"
    job = submit(slurm, tmp_path, "--stage", "asr-l2", "--preset", "tiny", "--run-dir", str(run_dir),
                 "--data", str(small_shards), "--max-steps", "4", "--set", "stage.eval_every=0")
    assert wait_state(slurm, job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}) == "COMPLETED", \
        (tmp_path / f"mcat-{job}.out").read_text()[-3000:]
    log = (tmp_path / f"mcat-{job}.out").read_text()
    assert "2 ranks per node" in log and "2 ranks, from the base models" in log
    assert [m["step"] for m in read_metrics(run_dir / "asr-l2" / "metrics.jsonl")] == [1, 2, 3, 4]
    assert (run_dir / "asr-l2" / "final" / "mcat_config.json").is_file()


def test_preemption_warning_checkpoints_requeues_and_resumes(slurm, small_shards, tmp_path):
    run_dir = tmp_path / "run"
    metrics = run_dir / "asr-l2" / "metrics.jsonl"
    job = submit(slurm, tmp_path, "--stage", "asr-l2", "--preset", "tiny", "--run-dir", str(run_dir),
                 "--data", str(small_shards), "--max-steps", "60", "--save-every", "1000",
                 "--set", "stage.eval_every=0")
    deadline = time.time() + 300
    while not (metrics.is_file() and len(read_metrics(metrics)) >= 3):
        assert time.time() < deadline, "training did not start"
        time.sleep(0.3)
    # what SLURM sends before the time limit (--signal=B:USR1@300), sent now
    assert slurm.run("scancel", "--batch", "--signal=USR1", job).returncode == 0
    assert wait_state(slurm, job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=900) == "COMPLETED", \
        (tmp_path / f"mcat-{job}.out").read_text()[-3000:]
    log = (tmp_path / f"mcat-{job}.out").read_text()
    assert "requeueing job" in log and "restart 1" in log and "resumed from" in log
    assert slurm.job_field(job, "Restarts") == "1"
    assert [m["step"] for m in read_metrics(metrics)] == list(range(1, 61))  # resumed, no step twice

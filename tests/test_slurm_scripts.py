"""launch/slurm/job.sh's decisions, with SLURM's commands replaced by scripted ones (no cluster)."""

import subprocess

from conftest import REPO

JOB_SH = REPO / "launch" / "slurm" / "job.sh"


def run_job_sh(tmp_path, script, commands, **env):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in commands.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    environment = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "gpu[1-2]", **env}
    return subprocess.run(["bash", "-c", f"source {JOB_SH}; {script}"], capture_output=True, text=True, env=environment,
                          timeout=60)


SCONTROL = """case "$1 $2" in
  "show hostnames") printf 'gpu1\\ngpu2\\n' ;;
  "show node") echo "NodeName=$3 Arch=x86_64 NodeAddr=10.1.0.$(( ${3#gpu} + 10 )) NodeHostName=$3" ;;
  "show config") echo "SlurmdTimeout           = 7 sec" ;;
esac"""


def test_rendezvous_is_the_first_nodes_address_unless_overridden(tmp_path):
    shown = 'mcat_rendezvous; echo "$MASTER_ADDR $MASTER_PORT $MCAT_RENDEZVOUS_TIMEOUT"'
    assert run_job_sh(tmp_path, shown, {"scontrol": SCONTROL}).stdout.split() == ["10.1.0.11", "20042", "300"]
    overridden = run_job_sh(tmp_path, shown, {"scontrol": SCONTROL}, MCAT_MASTER_ADDR="head.ib", MCAT_MASTER_PORT="29500")
    assert overridden.stdout.split() == ["head.ib", "29500", "300"]


def test_a_failed_step_with_a_silent_node_waits_for_the_requeue_then_fails(tmp_path):
    probe = 'if mcat_lost_a_node; then echo lost; else echo alive; fi'
    two_nodes = {"SLURM_JOB_NUM_NODES": "2", "MCAT_NODE_PROBE_TIMEOUT": "1"}
    assert run_job_sh(tmp_path, probe, {"srun": "exit 0"}, **two_nodes).stdout.strip() == "alive"
    assert run_job_sh(tmp_path, probe, {"srun": "sleep 30"}, **two_nodes).stdout.strip() == "lost"  # a dead node hangs it
    assert run_job_sh(tmp_path, probe, {"srun": "sleep 30"}, SLURM_JOB_NUM_NODES="1").stdout.strip() == "alive"
    waited = run_job_sh(tmp_path, "mcat_wait_for_requeue 2", {"scontrol": SCONTROL, "sleep": "echo slept $1"})
    assert waited.returncode == 2
    assert "waiting up to 74 s for SLURM to requeue" in waited.stdout and "slept 74" in waited.stdout  # 2 x 7 + 60
    assert "failing with the step's exit code 2" in waited.stdout

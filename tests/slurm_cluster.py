"""A real one-node SLURM cluster on localhost (Debian's slurm-wlm and munge) for the tests."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch")


def available() -> str | None:
    """Why the cluster cannot run here, or None."""
    missing = [name for name in DAEMONS if shutil.which(name) is None and not Path("/usr/sbin", name).exists()]
    if missing:
        return f"SLURM is not installed ({', '.join(missing)} missing; .ci/run installs slurm-wlm and munge)"
    if os.geteuid() != 0:
        return "starting slurmctld/slurmd needs root"
    return None


def _node_line() -> str:
    described = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    return described.replace("NodeName=", "NodeName=", 1) + " State=UNKNOWN"


class LocalSlurm:
    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.processes: list[subprocess.Popen] = []

    def write_config(self) -> None:
        for folder in ("state", "spool", "log", "run"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        host = socket.gethostname().split(".")[0]
        self.conf.write_text(f"""
ClusterName=mcat-test
SlurmctldHost={host}
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerParameters=bf_interval=1,sched_interval=2
ReturnToService=2
MpiDefault=none
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool
SlurmctldPidFile={self.root}/run/slurmctld.pid
SlurmdPidFile={self.root}/run/slurmd.pid
SlurmctldLogFile={self.root}/log/slurmctld.log
SlurmdLogFile={self.root}/log/slurmd.log
{_node_line()}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""".lstrip())

    def start(self) -> None:
        self.write_config()
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode != 0:
            subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
        for daemon in ("slurmctld", "slurmd"):
            self.processes.append(subprocess.Popen([f"/usr/sbin/{daemon}", "-D"], env=self.env,
                                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.time() + 60
        while time.time() < deadline:
            state = self.run("scontrol", "show", "node").stdout
            if "State=IDLE" in state:
                return
            time.sleep(0.2)
        raise RuntimeError(f"the SLURM node did not come up: {self.run('scontrol', 'show', 'node').stdout}")

    def run(self, *command: str, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(list(command), env=self.env, capture_output=True, text=True, **kwargs)

    def job_field(self, job: str, field: str) -> str:
        for word in self.run("scontrol", "show", "job", job).stdout.split():
            if word.startswith(f"{field}="):
                return word.split("=", 1)[1]
        return ""

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()

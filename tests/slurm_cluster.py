"""Real SLURM clusters on one machine (Debian's slurm-wlm and munge) for the tests.

- :class:`LocalSlurm`: one node, localhost.
- :class:`NamespacedSlurm`: N nodes, each a network namespace with its own address on a private bridge
  (no default route: nothing leaves the machine), its own hostname and a Debian-style hosts file (its
  own name -> 127.0.1.1, the others' names -> their bridge addresses; no lookup leaves the machine),
  one ``slurmd`` each; ``slurmctld`` in the root namespace on the bridge.

Both run their own ``munged`` (own key, socket, pid and log files) and their own SLURM ports, so they
can run beside any other munge or SLURM on the machine. Daemons start in their own sessions and are
stopped by PID; then the namespaces' remaining processes, the namespaces and the bridge go.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch")
NAMESPACE_TOOLS = ("ip", "nsenter", "unshare")


def available(namespaces: bool = False) -> str | None:
    """Why the cluster cannot run here, or None."""
    missing = [name for name in DAEMONS if shutil.which(name) is None and not Path("/usr/sbin", name).exists()]
    if missing:
        return f"SLURM is not installed ({', '.join(missing)} missing; .ci/run installs slurm-wlm and munge)"
    if os.geteuid() != 0:
        return "starting slurmctld/slurmd needs root"
    if namespaces:
        missing = [name for name in NAMESPACE_TOOLS if shutil.which(name) is None]
        if missing:
            return f"network namespaces need {', '.join(missing)} (iproute2, util-linux)"
        probe = f"mcat-probe-{os.getpid()}"
        made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
        if made.returncode != 0:
            return f"this machine cannot create network namespaces: {made.stderr.strip()}"
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def _hardware_line() -> str:
    """This machine as ``slurmd -C`` describes it, without the node name."""
    described = subprocess.run(["/usr/sbin/slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    return " ".join(word for word in described.splitlines()[0].split() if not word.startswith(("NodeName=", "RealMemory=")))


class _Cluster:
    """What both clusters share: files under ``root``, a private munged, the daemons, the clients."""

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.munge_socket = root / "munge" / "munge.socket"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.daemons: list[subprocess.Popen] = []

    # -- munge
    def start_munge(self) -> None:
        folder = self.root / "munge"
        folder.mkdir(mode=0o755, parents=True, exist_ok=True)
        key = folder / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        # As root, like every client here (SlurmUser=root, jobs run as root). --force: munged refuses
        # a socket under the pytest tmp path (world-writable /tmp, 0700 parents) otherwise.
        self.daemons.append(subprocess.Popen(
            ["/usr/sbin/munged", "--foreground", "--force",
             f"--socket={self.munge_socket}", f"--key-file={key}", f"--pid-file={folder / 'munged.pid'}",
             f"--log-file={folder / 'munged.log'}", f"--seed-file={folder / 'munged.seed'}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        deadline = time.time() + 20
        while not self.munge_socket.exists():
            if time.time() > deadline:
                log = folder / "munged.log"
                raise RuntimeError(f"munged did not start: {log.read_text(errors='replace')[-2000:] if log.exists() else ''}")
            time.sleep(0.05)

    # -- configuration
    def common_config(self, controller: str) -> str:
        for folder in ("state", "spool", "log", "run"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        return f"""
ClusterName=mcat-test
SlurmctldHost={controller}
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket={self.munge_socket},cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerParameters=bf_interval=1,sched_interval=2
ReturnToService=2
MpiDefault=none
SlurmdTimeout=5
KillWait=5
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool/%n
SlurmctldPidFile={self.root}/run/slurmctld.pid
SlurmdPidFile={self.root}/run/slurmd-%n.pid
SlurmctldLogFile={self.root}/log/slurmctld.log
SlurmdLogFile={self.root}/log/slurmd-%n.log
""".lstrip()

    def start_daemon(self, command: list[str]) -> subprocess.Popen:
        process = subprocess.Popen(command, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   start_new_session=True)
        self.daemons.append(process)
        return process

    def wait_idle(self, nodes: int, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            states = self.run("sinfo", "-h", "-N", "-o", "%N %t").stdout.split("\n")
            if sum(line.endswith(" idle") for line in states) >= nodes:
                return
            time.sleep(0.2)
        logs = "\n".join(p.read_text(errors="replace")[-1500:] for p in sorted((self.root / "log").glob("*.log")))
        raise RuntimeError(f"the SLURM nodes did not come up: {self.run('sinfo', '-N').stdout}\n{logs}")

    # -- clients
    def run(self, *command: str, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(list(command), env=self.env, capture_output=True, text=True, **kwargs)

    def job_field(self, job: str, field: str) -> str:
        for word in self.run("scontrol", "show", "job", job).stdout.split():
            if word.startswith(f"{field}="):
                return word.split("=", 1)[1]
        return ""

    def wait_for(self, job: str, states: set[str], timeout: float = 600) -> str:
        """The job's state once it is one of ``states``."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = self.job_field(job, "JobState")
            if state in states:
                return state
            time.sleep(0.5)
        raise TimeoutError(f"job {job} still {self.job_field(job, 'JobState')}")

    def stop_daemons(self) -> None:
        for process in reversed(self.daemons):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in reversed(self.daemons):
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.daemons.clear()


class LocalSlurm(_Cluster):
    """One node: this machine, under its own name."""

    def start(self) -> None:
        self.start_munge()
        host = socket.gethostname().split(".")[0]
        self.conf.write_text(self.common_config(host) + f"NodeName={host} {_hardware_line()} State=UNKNOWN\n"
                             "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP\n")
        for daemon in ("slurmctld", "slurmd"):
            self.start_daemon([f"/usr/sbin/{daemon}", "-D"])
        self.wait_idle(1)

    def stop(self) -> None:
        self.stop_daemons()


class NamespacedSlurm(_Cluster):
    """``nodes`` nodes ``node1..N`` at 10.R.0.11.. on bridge ``mcbrR`` (10.R.0.1, the controller)."""

    def __init__(self, root: Path, nodes: int = 3):
        super().__init__(root)
        self.subnet = 100 + os.getpid() % 150  # one private /24 per test process
        self.bridge = f"mcbr{self.subnet}"
        self.names = [f"node{i}" for i in range(1, nodes + 1)]
        self.node_daemons: dict[str, subprocess.Popen] = {}

    def address(self, name: str) -> str:
        return f"10.{self.subnet}.0.{10 + self.names.index(name) + 1}"

    @property
    def controller_address(self) -> str:
        return f"10.{self.subnet}.0.1"

    def namespace(self, name: str) -> str:
        return f"mcat{self.subnet}-{name}"

    def _ip(self, *args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True)

    def _network_up(self) -> None:
        self._ip("link", "add", self.bridge, "type", "bridge")
        self._ip("addr", "add", f"{self.controller_address}/24", "dev", self.bridge)
        self._ip("link", "set", self.bridge, "up")
        for index, name in enumerate(self.names, start=1):
            namespace, veth = self.namespace(name), f"mcv{self.subnet}n{index}"
            self._ip("netns", "add", namespace)
            self._ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", namespace)
            self._ip("link", "set", veth, "master", self.bridge, "up")
            self._ip("-n", namespace, "addr", "add", f"{self.address(name)}/24", "dev", "eth0")
            self._ip("-n", namespace, "link", "set", "eth0", "up")
            self._ip("-n", namespace, "link", "set", "lo", "up")

    def hosts_file(self, name: str) -> Path:
        """Debian's layout: the node's own name on 127.0.1.1, before anything else names it."""
        lines = ["127.0.0.1 localhost", f"127.0.1.1 {name}", f"{self.controller_address} mcatctl"]
        lines += [f"{self.address(other)} {other}" for other in self.names]
        path = self.root / "etc" / name / "hosts"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
        (path.parent / "resolv.conf").write_text("# no name servers: no lookup leaves the machine\n")
        return path

    def start(self) -> None:
        self._network_up()
        self.start_munge()
        hardware = _hardware_line()
        nodes = "".join(f"NodeName={name} NodeAddr={self.address(name)} NodeHostname={name} {hardware} State=UNKNOWN\n"
                        for name in self.names)
        self.conf.write_text(self.common_config(f"mcatctl({self.controller_address})") + nodes
                             + "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP\n")
        # slurmctld insists that its host name is SlurmctldHost's: its own UTS namespace gives it that
        self.start_daemon(["unshare", "--uts", "sh", "-c", "hostname mcatctl && exec /usr/sbin/slurmctld -D"])
        for name in self.names:
            self.start_node(name)
        self.wait_idle(len(self.names))

    def start_node(self, name: str) -> None:
        hosts = self.hosts_file(name)
        # not `ip netns exec`: it remounts /sys, which breaks slurmd's cgroup checks
        inside = (f"hostname {name} && mount --bind {hosts} /etc/hosts && "
                  f"mount --bind {hosts.parent / 'resolv.conf'} /etc/resolv.conf && exec /usr/sbin/slurmd -D -N {name}")
        self.node_daemons[name] = self.start_daemon(
            ["nsenter", f"--net=/run/netns/{self.namespace(name)}", "unshare", "--uts", "--mount", "sh", "-c", inside])

    def node_pids(self, name: str) -> list[int]:
        listed = subprocess.run(["ip", "netns", "pids", self.namespace(name)], capture_output=True, text=True).stdout
        return [int(pid) for pid in listed.split()]

    def kill_node(self, name: str) -> None:
        """What a dead machine looks like to the others: every process on it gone at once."""
        for pid in self.node_pids(name):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        self.stop_daemons()
        for name in self.names:
            self.kill_node(name)
            subprocess.run(["ip", "netns", "del", self.namespace(name)], capture_output=True)
        for index in range(1, len(self.names) + 1):  # gVisor keeps the root end of a pair after its netns goes
            subprocess.run(["ip", "link", "del", f"mcv{self.subnet}n{index}"], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)

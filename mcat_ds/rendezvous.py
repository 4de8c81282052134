"""Where the processes of a job meet: the torch.distributed variables, checked before anything waits.

Whoever started the processes (the DeepSpeed launcher, torchrun, srun, nobody) the result is
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in the environment. Before
joining, :func:`check_rendezvous` makes the failures that otherwise hang for many minutes (the TCP
store retries, the trainers sit in C++ and ignore SIGTERM) fail within ``MCAT_RENDEZVOUS_TIMEOUT``
seconds (default 300) with the address and port named:

- ``MASTER_ADDR`` does not resolve: at once;
- rank 0 (which hosts the store) finds it is not an address of its own host: at once;
- another rank cannot connect to it within the timeout.

Across nodes, gloo and NCCL bootstrap advertise the address of an interface; left to themselves
they take whatever the host name resolves to, which Debian's ``/etc/hosts`` maps to 127.0.1.1, and
the other nodes are refused. :func:`choose_socket_interface` picks the interface this host reaches
``MASTER_ADDR`` through and sets ``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME`` unless they are set.
"""

from __future__ import annotations

import array
import fcntl
import ipaddress
import os
import socket
import struct
import time
from collections.abc import Callable, Mapping, MutableMapping

TIMEOUT_ENV = "MCAT_RENDEZVOUS_TIMEOUT"
DEFAULT_TIMEOUT = 300.0
INTERFACE_VARIABLES = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


class RendezvousError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rendezvous_environment(environ: MutableMapping[str, str]) -> dict[str, str]:
    """The torch.distributed variables to add: from SLURM's when srun started the process, defaults
    for a single process, nothing when a launcher already set them."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return {}
    if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        added = {
            "RANK": environ["SLURM_PROCID"],
            "WORLD_SIZE": environ["SLURM_NTASKS"],
            "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
            "LOCAL_WORLD_SIZE": environ.get("SLURM_NTASKS_PER_NODE", environ.get("SLURM_NTASKS", "1")).split("(")[0],
        }
        if "MASTER_ADDR" not in environ:
            raise RendezvousError("under srun, MASTER_ADDR and MASTER_PORT must be exported (launch/slurm/*.sbatch do)")
        return added
    return {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": environ.get("MASTER_ADDR", "127.0.0.1"),
            "MASTER_PORT": environ.get("MASTER_PORT", str(free_port()))}


def rank_gpus(environ: Mapping[str, str], local_rank: int, local_world_size: int, gpus_per_rank: int) -> str:
    """The CUDA_VISIBLE_DEVICES of a rank that drives ``gpus_per_rank`` GPUs itself (a vLLM engine,
    which places its workers from device 0 of what it sees): local rank r takes GPUs
    [r*n, (r+1)*n) of what the node shows. Under srun with GPU binding each task already sees
    exactly its own n, which are kept. Set it before anything initialises CUDA."""
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    first = local_rank * gpus_per_rank
    if not visible:
        return ",".join(str(index) for index in range(first, first + gpus_per_rank))
    devices = visible.split(",")
    if len(devices) >= local_world_size * gpus_per_rank:
        return ",".join(devices[first:first + gpus_per_rank])
    bound_by_srun = "SLURM_LOCALID" in environ and "TORCHELASTIC_RUN_ID" not in environ
    if bound_by_srun and len(devices) == gpus_per_rank:
        return visible
    raise RendezvousError(f"{local_world_size} processes on this node with {gpus_per_rank} GPUs each need "
                          f"{local_world_size * gpus_per_rank} GPUs; CUDA_VISIBLE_DEVICES={visible} shows {len(devices)} "
                          f"(start fewer processes per node: GPUs / --tensor-parallel)")


def _resolve(address: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(address, port, socket.AF_INET, socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise RendezvousError(
            f"the rendezvous address {address}:{port} (MASTER_ADDR:MASTER_PORT; set MCAT_MASTER_ADDR to "
            f"override it) does not resolve on {socket.gethostname()}: {error.strerror}") from None
    return list(dict.fromkeys(info[4][0] for info in infos))


def _is_local(ip: str) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((ip, 0))
        except OSError:
            return False
    return True


def check_rendezvous(environ: MutableMapping[str, str], timeout: float | None = None,
                     should_stop: Callable[[], bool] = lambda: False) -> str:
    """Fail fast, naming address and port, where joining would hang; returns the address used."""
    address, port = environ["MASTER_ADDR"], int(environ["MASTER_PORT"])
    rank, world_size = int(environ.get("RANK", 0)), int(environ.get("WORLD_SIZE", 1))
    timeout = float(environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT)) if timeout is None else timeout
    ips = _resolve(address, port)
    if world_size == 1:
        return ips[0]
    host = socket.gethostname()
    if rank == 0 and environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return ips[0]  # torchrun's agent already hosts the store
    if rank == 0:
        local = [ip for ip in ips if _is_local(ip)]
        if not local:
            raise RendezvousError(
                f"rank 0 hosts the rendezvous, but {address} resolves to {', '.join(ips)}, which is not an address "
                f"of this host ({host}); set MCAT_MASTER_ADDR to an address of the first node")
        return local[0]
    deadline = time.monotonic() + timeout
    last = None
    while True:
        for ip in ips:
            try:
                with socket.create_connection((ip, port), timeout=2):
                    return ip
            except OSError as error:
                last = error
        if should_stop():
            raise RendezvousError(f"stopped by a signal while waiting for the rendezvous at {address}:{port}")
        if time.monotonic() > deadline:
            raise RendezvousError(
                f"rank {rank} on {host} could not reach the rendezvous at {address}:{port} ({', '.join(ips)}) "
                f"within {timeout:g} s ({TIMEOUT_ENV}): {last}")
        time.sleep(0.5)


def interface_of(ip: str) -> str | None:
    """The network interface holding the IPv4 address ``ip``, if any."""
    SIOCGIFADDR = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _, name in socket.if_nameindex():
            request = array.array("B", struct.pack("256s", name.encode()[:15]))
            try:
                fcntl.ioctl(probe.fileno(), SIOCGIFADDR, request)
            except OSError:
                continue
            if socket.inet_ntoa(request[20:24].tobytes()) == ip:
                return name
    return None


def choose_socket_interface(master_ip: str, environ: MutableMapping[str, str]) -> str | None:
    """Set GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME (those unset) to the interface that reaches
    ``master_ip``; nothing for a loopback rendezvous (one node). Returns the interface chosen."""
    if ipaddress.ip_address(master_ip).is_loopback or all(name in environ for name in INTERFACE_VARIABLES):
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((master_ip, 9))  # no packet is sent: this asks the routing table for the source address
        source = probe.getsockname()[0]
    name = interface_of(source)
    if name is None or ipaddress.ip_address(source).is_loopback:
        return None
    for variable in INTERFACE_VARIABLES:
        environ.setdefault(variable, name)
    return name


def prepare_rendezvous(environ: MutableMapping[str, str] = os.environ,
                       should_stop: Callable[[], bool] = lambda: False) -> str:
    """Fill the variables, check the rendezvous, pick the socket interface; a line saying what was chosen."""
    environ.update(rendezvous_environment(environ))
    ip = check_rendezvous(environ, should_stop=should_stop)
    interface = choose_socket_interface(ip, environ)
    chosen = f", sockets on {interface}" if interface else ""
    return (f"rendezvous {environ['MASTER_ADDR']}:{environ['MASTER_PORT']} ({ip}), "
            f"{environ['WORLD_SIZE']} ranks{chosen}")

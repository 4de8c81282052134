"""Joining the process group, whoever started the processes: the DeepSpeed launcher, torchrun, srun
(one task per GPU or per CPU rank) or nobody (a single process)."""

from __future__ import annotations

import os
from pathlib import Path
import socket

import deepspeed
import torch
import torch.distributed as dist

from mcat_ds.train.stage import Placement


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rendezvous_environment(environ: dict[str, str]) -> dict[str, str]:
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
            raise RuntimeError("under srun, MASTER_ADDR and MASTER_PORT must be exported (launch/slurm/train.sbatch does)")
        return added
    return {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": environ.get("MASTER_ADDR", "127.0.0.1"),
            "MASTER_PORT": environ.get("MASTER_PORT", str(free_port()))}


def setup_distributed() -> Placement:
    os.environ.update(rendezvous_environment(dict(os.environ)))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")  # math threads per rank: runtime.threads_per_rank, set by the stage
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    return Placement(dist.get_rank(), dist.get_world_size(), device)


def remove_shared_memory_buffers(placement: Placement) -> None:
    """DeepSpeed's CPU accelerator allreduces through a /dev/shm file per rank and run
    (``deepspeed_allreduce_buffer_*_<addr>_<port>_<rank>``, 66 MB each) and never removes it; dozens of
    CPU runs fill the shared memory of a laptop or CI machine. Each rank removes its own at exit."""
    if placement.on_gpu:
        return
    address, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{address}_{port}_{placement.rank}"):
        path.unlink(missing_ok=True)

"""Joining the process group, whoever started the processes: the DeepSpeed launcher, torchrun, srun
(one task per GPU or per CPU rank) or nobody (a single process)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from mcat_ds.optional import require
from mcat_ds.rendezvous import free_port, prepare_rendezvous, rendezvous_environment  # noqa: F401 (re-exported)
from mcat_ds.train.preemption import signal_received
from mcat_ds.train.stage import Placement

deepspeed = require("deepspeed")


def setup_distributed() -> Placement:
    """Join the job's process group (checked first: ``mcat_ds.rendezvous``)."""
    chosen = prepare_rendezvous(os.environ, should_stop=signal_received)
    if os.environ["RANK"] == "0":
        print(f"mcat: {chosen}", file=sys.stderr, flush=True)
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

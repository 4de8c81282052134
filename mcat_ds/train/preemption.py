"""Stop cleanly when the scheduler says the job will end: checkpoint, exit, be requeued, resume."""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

PREEMPTED_EXIT_CODE = 75
"""EX_TEMPFAIL: the stage saved its state and wants to be run again (the SLURM script requeues)."""

_received: list[int] = []


def _remember(signum, frame) -> None:
    _received.append(signum)


def install_handlers() -> None:
    """SIGUSR1 (SLURM's --signal warning) and SIGTERM (preemption, scancel) request a clean stop."""
    for signum in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(signum, _remember)


def signal_received() -> bool:
    """This process got a stop signal (local; no collective)."""
    return _received


def stop_requested() -> bool:
    """True on every rank as soon as any rank got a signal (collective: call it on all ranks)."""
    flag = torch.tensor([1 if _received else 0])
    if dist.is_initialized():
        if dist.get_backend() == "nccl":
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())

"""Where the Triton kernels run: compiled on CUDA tensors, or in Triton's interpreter on CPU tensors
when ``TRITON_INTERPRET=1`` is set before the kernels are imported (the tests do)."""

from __future__ import annotations

import os

import torch

IMPLEMENTATIONS = ("auto", "triton", "torch")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(implementation: str, tensor: torch.Tensor) -> bool:
    """``auto`` takes the kernels on CUDA and the PyTorch path elsewhere (the interpreter is far
    too slow to train with); ``triton`` insists, and says why it cannot."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown kernel implementation {implementation!r}; choose one of {', '.join(IMPLEMENTATIONS)}")
    if implementation == "torch":
        return False
    if tensor.is_cuda:
        return True
    if implementation == "triton":
        if interpreter_active():
            return True
        raise RuntimeError("the Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set before importing them")
    return False

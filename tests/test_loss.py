"""The fused LM head + cross-entropy (mcat_ds.model.loss) against the plain logits computation."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from mcat_ds.model import loss as loss_module
from mcat_ds.model.loss import linear_cross_entropy, resolve_loss_implementation

N, H, V = 70, 16, 300


def inputs(device="cpu", dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=generator).to(device, dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=generator) * 2).to(device, dtype).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=generator).to(device)
    return hidden, weight, targets


def reference(hidden, weight, targets, softcap):
    logits = (hidden @ weight.t()).float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, targets, reduction="sum")


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_chunked_linear_cross_entropy_equals_the_logits_path(softcap):
    hidden, weight, targets = inputs()
    expected = reference(hidden, weight, targets, softcap)
    expected_grads = torch.autograd.grad(expected, (hidden, weight))
    got = linear_cross_entropy(hidden, weight, targets, softcap=softcap, implementation="chunked", chunk_rows=16)
    got_grads = torch.autograd.grad(got, (hidden, weight))
    torch.testing.assert_close(got, expected)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e)
    if softcap:  # the cap matters for these inputs, so the comparison could fail
        assert (reference(hidden, weight, targets, None) - expected).abs() > 1


class LargestOutput(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            self.largest = max(self.largest, out.numel())
        return out


def test_chunked_path_never_holds_more_than_one_chunk_of_logits():
    hidden, weight, targets = inputs()
    with LargestOutput() as mode:
        linear_cross_entropy(hidden, weight, targets, implementation="chunked", chunk_rows=16).backward()
    assert mode.largest == 16 * V  # one chunk's logits; never an (N, V) tensor, forward or backward
    with LargestOutput() as mode:
        reference(hidden, weight, targets, None).backward()
    assert mode.largest == N * V  # what the check would catch


@pytest.mark.skipif(not torch.cuda.is_available(), reason="liger-kernel's Triton kernels need CUDA")
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_liger_equals_chunked_on_cuda(softcap):
    pytest.importorskip("liger_kernel")
    hidden, weight, targets = inputs("cuda", torch.bfloat16)
    results = []
    for implementation in ("chunked", "liger"):
        loss = linear_cross_entropy(hidden, weight, targets, softcap=softcap, implementation=implementation)
        results.append((loss, torch.autograd.grad(loss, (hidden, weight))))
    (loss_c, grads_c), (loss_l, grads_l) = results
    torch.testing.assert_close(loss_l, loss_c, rtol=2e-2, atol=1e-2)
    for g_l, g_c in zip(grads_l, grads_c):
        torch.testing.assert_close(g_l.float(), g_c.float(), rtol=5e-2, atol=5e-2)


def test_auto_loss_choice(monkeypatch):
    monkeypatch.setattr(loss_module.importlib.util, "find_spec", lambda name: object())
    assert resolve_loss_implementation("auto", torch.device("cuda")) == "liger"
    assert resolve_loss_implementation("auto", torch.device("cpu")) == "chunked"  # liger's kernels need CUDA
    monkeypatch.setattr(loss_module.importlib.util, "find_spec", lambda name: None)
    assert resolve_loss_implementation("auto", torch.device("cuda")) == "chunked"
    assert resolve_loss_implementation("liger", torch.device("cpu")) == "liger"  # an explicit choice stands
    with pytest.raises(ValueError, match="unknown loss implementation 'fast'"):
        linear_cross_entropy(*inputs(), implementation="fast")

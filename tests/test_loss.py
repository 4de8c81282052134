"""The fused LM head + cross-entropy (mcat_ds.model.loss) against the plain logits computation."""

import sys

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


@pytest.mark.cuda
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


SMALL_9B_LABELS, GEMMA_VOCAB, GEMMA2_9B_WIDTH = 560, 256_000, 3584


def test_liger_is_told_its_chunk_so_the_head_is_read_a_few_times_not_seventy():
    assert loss_module.liger_default_chunks(SMALL_9B_LABELS, GEMMA_VOCAB, GEMMA2_9B_WIDTH) == 70  # liger's own rule

    def new_liger(input, weight, target, ce_weight=None, reduction="mean", softcap=None, accum_dtype=None,
                  chunk_mem_const=1):
        pass

    arguments = loss_module.liger_arguments(new_liger, SMALL_9B_LABELS, GEMMA_VOCAB, GEMMA2_9B_WIDTH)
    assert arguments["accum_dtype"] == torch.float32
    assert loss_module.liger_default_chunks(SMALL_9B_LABELS, GEMMA_VOCAB, GEMMA2_9B_WIDTH,
                                            arguments["chunk_mem_const"]) == 2  # 560 rows in chunks of <= 512
    for rows in (1, 511, 512, 513, 4096, 10_000):
        chunks = loss_module.liger_default_chunks(rows, GEMMA_VOCAB, GEMMA2_9B_WIDTH, loss_module.liger_arguments(
            new_liger, rows, GEMMA_VOCAB, GEMMA2_9B_WIDTH)["chunk_mem_const"])
        assert chunks == -(-rows // loss_module.CHUNK_ROWS), rows  # the fewest chunks of <= 512 rows

    def old_liger(input, weight, target, ce_weight=None, reduction="mean", softcap=None):
        pass

    assert loss_module.liger_arguments(old_liger, SMALL_9B_LABELS, GEMMA_VOCAB, GEMMA2_9B_WIDTH) is None
    assert loss_module.liger_arguments(old_liger, 40_000, GEMMA_VOCAB, GEMMA2_9B_WIDTH) == {}  # 72 chunks vs 79 x 3


def fake_liger(monkeypatch, function):
    import types

    functional = types.ModuleType("liger_kernel.transformers.functional")
    functional.liger_fused_linear_cross_entropy = function
    transformers = types.ModuleType("liger_kernel.transformers")
    transformers.functional = functional
    package = types.ModuleType("liger_kernel")
    package.transformers = transformers
    for name, module in (("liger_kernel", package), ("liger_kernel.transformers", transformers),
                         ("liger_kernel.transformers.functional", functional)):
        monkeypatch.setitem(sys.modules, name, module)


def test_the_liger_call_carries_the_chunk_and_fp32_accumulation(monkeypatch):
    calls = []

    def liger(input, weight, target, ce_weight=None, reduction="mean", softcap=None, accum_dtype=None,
              chunk_mem_const=1):
        calls.append({"accum_dtype": accum_dtype, "chunk_mem_const": chunk_mem_const, "reduction": reduction})
        return reference(input, weight, target, softcap)

    fake_liger(monkeypatch, liger)
    hidden, weight, targets = inputs()
    linear_cross_entropy(hidden, weight, targets, implementation="liger", chunk_rows=16)
    assert len(calls) == 1 and calls[0]["accum_dtype"] == torch.float32 and calls[0]["reduction"] == "sum"
    assert loss_module.liger_chunk_rows(N, V, H, calls[0]["chunk_mem_const"]) == 16  # 70 rows in 5 chunks of 16


def test_a_liger_that_cannot_be_told_its_chunk_gives_way_to_the_chunked_path(monkeypatch):
    def old_liger(input, weight, target, ce_weight=None, reduction="mean", softcap=None):
        raise AssertionError("called, though its chunks would read the head 19 times for 70 rows")

    fake_liger(monkeypatch, old_liger)
    hidden, weight, targets = inputs()  # V / H = 19 chunks of 4 by its rule, against 5 x 3 head reads of ours
    got = linear_cross_entropy(hidden, weight, targets, implementation="liger", chunk_rows=16)
    torch.testing.assert_close(got, reference(hidden, weight, targets, None))

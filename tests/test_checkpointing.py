"""Activation checkpointing of the LLM: the same loss and gradients under every policy, and each
policy recomputes what it says (full: every matmul again; selective: no matmul, only the rest)."""

import warnings
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mcat_ds.build import build_model
from mcat_ds.model import checkpointing
from mcat_ds.model.checkpointing import SAVED_OPS, checkpoint_arguments, enable_activation_checkpointing, keeps_output
from test_packing import EXAMPLES, batches
from conftest import random_features


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func] += 1
        return func(*args, **(kwargs or {}))


def train_step(tiny_config, policy):
    torch.manual_seed(0)
    model, tokenizer = build_model(tiny_config("gemma2"))
    model.train()
    if policy != "none":
        enable_activation_checkpointing(model.llm, policy)
    batch = batches(model, tokenizer)[1]
    features, lengths = random_features(len(EXAMPLES), [500, 120, 300, 60])
    out = model(features, lengths, batch)
    with OpCounter() as backward_ops:
        out.loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads, backward_ops.counts


def test_checkpointing_policies_keep_the_gradients_and_recompute_what_they_say(tiny_config):
    loss, grads, ops = train_step(tiny_config, "none")
    matmuls = lambda counts: sum(counts[op] for op in SAVED_OPS)  # noqa: E731
    elementwise = lambda counts: sum(n for op, n in counts.items() if op not in SAVED_OPS)  # noqa: E731
    for policy in ("full", "selective"):
        policy_loss, policy_grads, policy_ops = train_step(tiny_config, policy)
        torch.testing.assert_close(policy_loss, loss, atol=0, rtol=0)
        assert policy_grads.keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(policy_grads[name], grad, atol=1e-6, rtol=1e-5, msg=f"{policy}: {name}")
        assert elementwise(policy_ops) > elementwise(ops)  # both recompute the layers' elementwise work
        if policy == "full":
            assert matmuls(policy_ops) > matmuls(ops)  # the layers' matmuls run again in backward
        else:
            assert matmuls(policy_ops) == matmuls(ops)  # kept, never recomputed


def test_unknown_policy_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown activation checkpointing policy 'some'"):
        checkpoint_arguments("some")


def recording_policy(monkeypatch) -> list[tuple[str, bool, str]]:
    """(op, recomputing?, decision) of every call of the selective policy from now on."""
    decisions = []
    original = checkpointing._keep_matmul_outputs

    def record(context, op, *args, **kwargs):
        decision = original(context, op, *args, **kwargs)
        decisions.append((checkpointing._op_name(op), context.is_recompute, decision.name))
        return decision

    monkeypatch.setattr(checkpointing, "_keep_matmul_outputs", record)
    return decisions


def test_fused_attention_is_kept_by_name_flex_and_flash_attn_included():
    from torch._higher_order_ops.flex_attention import flex_attention
    from torch._higher_order_ops.wrap import inductor_compiled_code

    assert keeps_output(flex_attention) and keeps_output(inductor_compiled_code)
    assert keeps_output(torch.ops.aten.mm.default) and not keeps_output(torch.ops.aten.add.Tensor)
    if not hasattr(torch.ops.flash_attn, "_flash_attn_varlen_forward"):  # stands in for flash-attn's own op
        @torch.library.custom_op("flash_attn::_flash_attn_varlen_forward", mutates_args=())
        def stand_in(q: torch.Tensor) -> torch.Tensor:
            return q.clone()
    assert keeps_output(torch.ops.flash_attn._flash_attn_varlen_forward.default)


def test_selective_checkpointing_keeps_a_compiled_region_whole(monkeypatch):
    """What transformers compiles (FlexAttention) is one region to selective checkpointing: seen, and
    kept, not run again in backward (without wrapping the dispatch mode never sees it at all)."""
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config, "wrap_inductor_compiled_regions", False)  # restored after the test
    decisions = recording_policy(monkeypatch)
    compiled = torch.compile(lambda x: (x.sin() * 2).cos())
    x, w = torch.randn(8, 16, requires_grad=True), torch.randn(16, 16, requires_grad=True)
    out = torch.utils.checkpoint.checkpoint(lambda x, w: compiled(x @ w) * x, x, w, **checkpoint_arguments("selective"))
    out.sum().backward()
    assert inductor_config.wrap_inductor_compiled_regions
    assert ("inductor_compiled_code", False, "MUST_SAVE") in decisions
    assert all(decision == "MUST_SAVE" for name, _, decision in decisions if name == "inductor_compiled_code")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="FlexAttention refuses inputs that require grad on CPU (no backward there); "
                           "the GPU acceptance run's cuda-tests step runs this")
def test_flex_attention_under_peft_and_selective_checkpointing_keeps_loss_and_gradients_on_cuda(tiny_config,
                                                                                                monkeypatch):
    """The GPU's training configuration: compiled FlexAttention on packed rows, through the peft-wrapped
    LLM, under selective checkpointing; the same loss and gradients as eager attention on padded rows,
    flex compiled (never its unfused fallback) and its output kept, not recomputed in backward."""
    results = []
    decisions = recording_policy(monkeypatch)
    for implementation, packed in (("eager", 0), ("flex_attention", 1)):
        torch.manual_seed(0)
        model, tokenizer = build_model(tiny_config("gemma2", f"model.llm.attn_implementation={implementation}",
                                                   "model.lora.dropout=0", "model.adapter.dropout=0"))
        model.cuda().train()
        enable_activation_checkpointing(model.llm, "selective")
        batch = batches(model, tokenizer)[packed].to("cuda")
        features, lengths = random_features(len(EXAMPLES), [500, 120, 300, 60])
        decisions.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = model(features.cuda(), lengths.cuda(), batch)
            out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    assert not [w for w in caught if "without torch.compile" in str(w.message)]
    layers = model.llm.get_base_model().config.num_hidden_layers
    kept = [name for name, recomputing, decision in decisions
            if name in ("inductor_compiled_code", "flex_attention") and not recomputing]
    assert len(kept) == layers and all(decision == "MUST_SAVE" for name, _, decision in decisions if name in kept)
    assert not any(name in ("aten::_softmax", "aten::bmm") for name, _, _ in decisions)  # no unfused flex path
    (eager_loss, eager_grads), (flex_loss, flex_grads) = results
    torch.testing.assert_close(flex_loss, eager_loss, atol=1e-5, rtol=1e-5)
    assert flex_grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        torch.testing.assert_close(flex_grads[name], grad, atol=1e-4, rtol=1e-3, msg=name)

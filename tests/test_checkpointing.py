"""Activation checkpointing of the LLM: the same loss and gradients under every policy, and each
policy recomputes what it says (full: every matmul again; selective: no matmul, only the rest)."""

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mcat_ds.build import build_model
from mcat_ds.model.checkpointing import SAVED_OPS, checkpoint_arguments, enable_activation_checkpointing
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


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="FlexAttention refuses inputs that require grad on CPU (no backward there); "
                           "the GPU acceptance run's cuda-tests step runs this")
def test_flex_attention_under_peft_and_selective_checkpointing_keeps_loss_and_gradients_on_cuda(tiny_config):
    """The GPU's training configuration: compiled FlexAttention on packed rows, through the peft-wrapped
    LLM, under selective checkpointing; the same loss and gradients as eager attention on padded rows."""
    results = []
    for implementation, packed in (("eager", 0), ("flex_attention", 1)):
        torch.manual_seed(0)
        model, tokenizer = build_model(tiny_config("gemma2", f"model.llm.attn_implementation={implementation}",
                                                   "model.lora.dropout=0", "model.adapter.dropout=0"))
        model.cuda().train()
        enable_activation_checkpointing(model.llm, "selective")
        batch = batches(model, tokenizer)[packed].to("cuda")
        features, lengths = random_features(len(EXAMPLES), [500, 120, 300, 60])
        out = model(features.cuda(), lengths.cuda(), batch)
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (eager_loss, eager_grads), (flex_loss, flex_grads) = results
    torch.testing.assert_close(flex_loss, eager_loss, atol=1e-5, rtol=1e-5)
    assert flex_grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        torch.testing.assert_close(flex_grads[name], grad, atol=1e-4, rtol=1e-3, msg=name)

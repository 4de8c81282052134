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

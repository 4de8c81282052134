"""Held-out validation of a stage: the token-weighted loss, and the accuracy of the predictions that
depend on the prompt's target tag.

A loss alone hides the one decision a many-to-many model can get wrong while learning everything
else: the target language. In SRT the model writes ``transcript<|src|><|tgt|>translation`` and the
second tag must be copied from the prompt across the whole transcript; a model that never learned
to copy it guesses among the stage's target languages (1/8 right on the demo corpus) while its loss
barely moves (the tag is one token of ~19). So validation also reports, teacher-forced, with the
greedy prediction over the whole vocabulary:

- ``val_tag_accuracy`` (SRT): the target tag after the transcript is the prompt's target tag;
- ``val_first_token_accuracy`` (SMT and SRT): the translation's first token, the first token that
  commits to the target language (SMT: the first label; SRT: the label after the tag pair).

Both are computed from the labels alone, so they work for padded and packed batches alike; they need
the tags as single tokens (``model.llm.language_tags=special``) and are absent otherwise.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mcat_ds.batching import IGNORE_INDEX


@dataclass(frozen=True)
class DecisionMasks:
    """(B, T - 1) bool masks over the positions that predict ``labels[:, 1:]``."""

    tag: torch.Tensor | None
    first_token: torch.Tensor


def decision_masks(labels: torch.Tensor, tag_ids: Collection[int], task: str) -> DecisionMasks | None:
    """Where the target-language decisions are predicted, for an SMT or SRT batch (None otherwise)."""
    if task not in ("smt", "srt") or not tag_ids:
        return None
    targets, previous = labels[:, 1:], labels[:, :-1]
    tags = torch.tensor(sorted(tag_ids), device=labels.device)
    target_is_tag, previous_is_tag = torch.isin(targets, tags), torch.isin(previous, tags)
    if task == "smt":
        return DecisionMasks(None, (targets != IGNORE_INDEX) & (previous == IGNORE_INDEX))
    # SRT labels: transcript <|src|> <|tgt|> translation eos; only the target tag follows a tag
    return DecisionMasks(target_is_tag & previous_is_tag,
                         previous_is_tag & ~target_is_tag & (targets != IGNORE_INDEX))


@dataclass
class ValidationTotals:
    loss_sum: float = 0.0
    tokens: float = 0.0
    tags_right: float = 0.0
    tags: float = 0.0
    first_right: float = 0.0
    firsts: float = 0.0

    def values(self) -> list[float]:
        return [self.loss_sum, self.tokens, self.tags_right, self.tags, self.first_right, self.firsts]


def _accuracy(right: float, count: float) -> float | None:
    return right / count if count else None


def validate(engine, batches, tag_ids: Collection[int], task: str, forward, all_reduce_sum) -> dict[str, float]:
    """``val_loss`` and, for SMT/SRT, the decision accuracies over ``batches`` (this rank's share of
    the held-out data), summed over ranks. ``forward(batch, predict_at)`` runs the model."""
    engine.eval()
    totals = ValidationTotals()
    with torch.no_grad():
        for batch in batches:
            if batch.llm is None:
                continue
            masks = decision_masks(batch.llm.labels, tag_ids, task)
            decisions = None
            if masks is not None:
                decisions = masks.first_token if masks.tag is None else masks.tag | masks.first_token
            out = forward(batch, decisions)
            totals.loss_sum += out.loss.item() * out.num_label_tokens
            totals.tokens += out.num_label_tokens
            if masks is None:
                continue
            expected = batch.llm.labels[:, 1:][decisions].to(out.predictions.device)
            right = out.predictions == expected
            # row-major order of the union: the tag positions among the selected ones
            if masks.tag is not None:
                is_tag = masks.tag[decisions].to(right.device)
                totals.tags_right += float(right[is_tag].sum())
                totals.tags += float(is_tag.sum())
                right = right[~is_tag]
            totals.first_right += float(right.sum())
            totals.firsts += float(right.numel())
    engine.train()
    summed = ValidationTotals(*all_reduce_sum(totals.values()))
    record = {"val_loss": summed.loss_sum / max(summed.tokens, 1.0)}
    for key, value in (("val_tag_accuracy", _accuracy(summed.tags_right, summed.tags)),
                       ("val_first_token_accuracy", _accuracy(summed.first_right, summed.firsts))):
        if value is not None:
            record[key] = value
    return record


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sums over ranks in float64 (on the GPU for NCCL)."""
    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized():
        if dist.get_backend() == "nccl":
            tensor = tensor.to(device)
        dist.all_reduce(tensor)
    return tensor.cpu().tolist()

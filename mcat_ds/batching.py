"""Token sequences of the LLM: [speech tokens ; prompt ; target ; eos] (paper eq. 7), and their batches."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Literal

import torch

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenizedExample:
    prompt_ids: tuple[int, ...]
    """The instruction as the LLM's tokenizer starts a sequence (Gemma: with its BOS)."""
    target_ids: tuple[int, ...] = ()
    """The prediction and the closing end-of-sequence token; empty when decoding."""


def tokenize_example(tokenizer, prompt: str, target: str | None = None) -> TokenizedExample:
    """Prompt and target are tokenized apart so that the label boundary is exact (the release
    tokenized them joined, which can merge a token across the boundary in text-tag mode)."""
    prompt_ids = tuple(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    if target is None:
        return TokenizedExample(prompt_ids)
    target_ids = tuple(tokenizer(target, add_special_tokens=False)["input_ids"]) + (tokenizer.eos_token_id,)
    return TokenizedExample(prompt_ids, target_ids)


@dataclass
class LLMBatch:
    """A padded batch; ``speech_mask`` marks the positions the speech embeddings take."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    """None for a packed batch: the position ids, restarting at 0, mark where each sequence begins,
    and attention never crosses from one sequence to another."""
    position_ids: torch.Tensor
    speech_mask: torch.Tensor
    labels: torch.Tensor | None = None
    cu_seq_lens: torch.Tensor | None = None
    """Packed only: (sequences + 1,) int32 offsets where each sequence starts, and the row's end, as
    flash-attn's varlen kernels take them (counted here on the host, so no layer derives them from
    the position ids with a device sync)."""
    max_sequence_length: int | None = None
    pack_padding: int = 0
    """Packed only: the tokens of the padding sequence at the end (see ``pack_to_multiple``)."""

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens in the batch."""
        if self.attention_mask is None:
            return self.input_ids.numel() - self.pack_padding
        return int(self.attention_mask.sum())

    @property
    def is_packed(self) -> bool:
        return self.attention_mask is None

    def to(self, device: torch.device | str) -> LLMBatch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return LLMBatch(**{name: value.to(device) if isinstance(value, torch.Tensor) else value
                           for name, value in moved.items()})

    def flash_varlen_arguments(self) -> dict:
        """What transformers' flash-attn path takes for a packed row instead of deriving it per layer."""
        if self.cu_seq_lens is None:
            return {}
        return {"cu_seq_lens_q": self.cu_seq_lens, "cu_seq_lens_k": self.cu_seq_lens,
                "max_length_q": self.max_sequence_length, "max_length_k": self.max_sequence_length}


def collate_examples(
    examples: Sequence[TokenizedExample],
    num_speech_tokens: int,
    pad_token_id: int,
    padding_side: Literal["right", "left", "packed"] = "right",
    pack_to_multiple: int = 1,
) -> LLMBatch:
    """Right padding for training (positions start at 0 for every sample, as unbatched); left padding
    for generation (every prompt ends at the last column); ``packed``: one row, the sequences end to
    end with no padding at all, positions restarting at 0 for each (training), or padded at the end
    to a multiple of ``pack_to_multiple`` tokens by one more sequence of padding that nothing learns
    from (FlexAttention's 128-token blocks). Labels cover the target and eos only."""
    rows = []
    for example in examples:
        ids = [pad_token_id] * num_speech_tokens + list(example.prompt_ids) + list(example.target_ids)
        speech = [True] * num_speech_tokens + [False] * (len(ids) - num_speech_tokens)
        labels = [IGNORE_INDEX] * (num_speech_tokens + len(example.prompt_ids)) + list(example.target_ids)
        rows.append((ids, speech, labels))
    if padding_side == "packed":
        padding = -sum(len(ids) for ids, _, _ in rows) % pack_to_multiple
        if padding:
            rows.append(([pad_token_id] * padding, [False] * padding, [IGNORE_INDEX] * padding))
        return replace(_packed(rows), pack_padding=padding)
    width = max(len(ids) for ids, _, _ in rows)

    def pad(values: list, fill) -> list:
        padding = [fill] * (width - len(values))
        return values + padding if padding_side == "right" else padding + values

    input_ids = torch.tensor([pad(ids, pad_token_id) for ids, _, _ in rows], dtype=torch.long)
    attention_mask = torch.tensor([pad([1] * len(ids), 0) for ids, _, _ in rows], dtype=torch.long)
    speech_mask = torch.tensor([pad(speech, False) for _, speech, _ in rows], dtype=torch.bool)
    labels = None
    if any(example.target_ids for example in examples):
        labels = torch.tensor([pad(label, IGNORE_INDEX) for _, _, label in rows], dtype=torch.long)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return LLMBatch(input_ids, attention_mask, position_ids, speech_mask, labels)


def _packed(rows: list[tuple[list[int], list[bool], list[int]]]) -> LLMBatch:
    """One row of all sequences; the first label of each is IGNORE_INDEX (its speech tokens), so the
    last token of one sequence never learns to predict the next sequence."""
    input_ids = torch.tensor([[token for ids, _, _ in rows for token in ids]], dtype=torch.long)
    speech_mask = torch.tensor([[flag for _, speech, _ in rows for flag in speech]], dtype=torch.bool)
    position_ids = torch.tensor([[position for ids, _, _ in rows for position in range(len(ids))]], dtype=torch.long)
    labels = None
    if any(label != IGNORE_INDEX for _, _, row_labels in rows for label in row_labels):
        labels = torch.tensor([[label for _, _, row_labels in rows for label in row_labels]], dtype=torch.long)
    lengths = [len(ids) for ids, _, _ in rows]
    cu_seq_lens = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    return LLMBatch(input_ids, None, position_ids, speech_mask, labels, cu_seq_lens, max(lengths))

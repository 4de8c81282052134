"""HF's ``no_repeat_ngram_size`` as a vLLM logits processor (the release decodes with 5).

Installed with the package as a ``vllm.logits_processors`` entry point (setup.py), so every vLLM
engine in an environment with mcat-ds has it: ``vllm serve EXPORT`` as well as ``mcat serve`` and
``mcat translate --engine vllm``. A request sets the size with ``extra_args`` (the server's
``vllm_xargs``) ``{"no_repeat_ngram_size": N}``; without it, an ``mcat export`` model uses its
checkpoint's setting (``mcat_speech.no_repeat_ngram_size`` in its ``config.json``) and any other
model 0, which leaves its requests untouched.

This module imports vLLM at load: vLLM imports it when it builds an engine.
"""

from __future__ import annotations

from importlib.metadata import entry_points

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import LOGITSPROCS_GROUP, BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

NO_REPEAT_KEY = "no_repeat_ngram_size"
"""The per-request ``SamplingParams.extra_args`` key the logits processor reads."""


def installed_as_plugin() -> bool:
    """True when vLLM loads :class:`NoRepeatNgramLogitsProcessor` by itself (the package is installed):
    passing it again would apply it twice."""
    target = f"{__name__}:{NoRepeatNgramLogitsProcessor.__name__}"
    return any(entry.value.replace(" ", "") == target for entry in entry_points(group=LOGITSPROCS_GROUP))


def model_default_size(vllm_config) -> int:
    """The export's checkpoint setting, for requests that do not say (0 for other models)."""
    from mcat_ds.infer.export import NATIVE_CONFIG_KEY

    model_config = getattr(vllm_config, "model_config", None)
    facts = getattr(getattr(model_config, "hf_config", None), NATIVE_CONFIG_KEY, None)
    return int(facts.get(NO_REPEAT_KEY, 0)) if isinstance(facts, dict) else 0


class _NgramHistory:
    """One request's n-grams so far: (n-1)-token prefix -> the tokens that followed it. Extended with
    each step's new tokens, so that a step costs O(1) per request, not a rescan of its output."""

    def __init__(self, size: int, generated: list[int]):
        self.size = size
        self.generated = generated  # vLLM's live list of this request's output ids
        self.followers: dict[tuple[int, ...], set[int]] = {}
        self.seen = 0

    def banned(self) -> set[int]:
        tokens, size = self.generated, self.size
        for end in range(max(self.seen, size - 1), len(tokens)):
            self.followers.setdefault(tuple(tokens[end - size + 1:end]), set()).add(tokens[end])
        self.seen = len(tokens)
        if len(tokens) < size - 1:
            return set()
        return self.followers.get(tuple(tokens[len(tokens) - size + 1:]), set())


class NoRepeatNgramLogitsProcessor(LogitsProcessor):
    """HF's ``no_repeat_ngram_size`` over each request's generated tokens: a token that would repeat
    one of its n-grams gets -inf. Only the generated tokens count, as in HF ``generate`` from
    ``inputs_embeds`` (the release's call), where the prompt has no ids."""

    @classmethod
    def validate_params(cls, params: SamplingParams):
        size = (params.extra_args or {}).get(NO_REPEAT_KEY, 0)
        if not isinstance(size, int) or size < 0:
            raise ValueError(f"{NO_REPEAT_KEY} must be a non-negative integer, got {size!r}")

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.device = device
        self.default_size = model_default_size(vllm_config)
        self.rows: dict[int, _NgramHistory] = {}
        """Batch index -> that request's n-gram history (vLLM moves and removes indices)."""

    def is_argmax_invariant(self) -> bool:
        return False  # a banned token can be the argmax

    def _new_request(self, params: SamplingParams, _prompt_ids, output_ids: list[int]):
        if params is None:
            return None
        size = (params.extra_args or {}).get(NO_REPEAT_KEY, self.default_size)
        return _NgramHistory(size, output_ids) if size else None

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.rows, batch_update, self._new_request)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        rows, tokens = [], []
        for index, history in self.rows.items():
            banned = history.banned()
            rows += [index] * len(banned)
            tokens += banned
        if rows:  # one scatter for the batch
            logits[torch.tensor(rows, device=logits.device), torch.tensor(tokens, device=logits.device)] = float("-inf")
        return logits

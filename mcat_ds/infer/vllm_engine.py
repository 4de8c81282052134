"""``mcat translate --engine vllm``: decoding on vLLM's offline engine, audio in.

vLLM serves the export's root as MCAT's native model (``mcat_ds.infer.vllm_model``, what ``mcat
serve`` serves): each request is MCAT's prompt ids and the utterance's 16 kHz samples, and the Whisper
encoder and our adapter run inside the engine, on its device. vLLM caches an audio's encoder output by
the audio's content hash, so an utterance's requests (one per target), handed over in the same call,
are encoded once; the engine's own count of encoded audio items goes into translate's summary. The
requests of a chunk go in one call, and vLLM's scheduler batches them continuously over its paged KV
cache.

Decoding is greedy and stops at the tokenizer's end-of-sequence only (not at other ids a generation
config lists), as the ``fast`` and ``hf`` engines do; the release's ``no_repeat_ngram_size`` runs as
the logits processor the package installs (``mcat_ds.infer.vllm_no_repeat``). Beam search stays on
``hf``.

This module imports vLLM at load: import it only when the engine is asked for.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mcat_ds.batching import TokenizedExample
from mcat_ds.data.audio import FeatureWindow
from mcat_ds.infer.decoding import DecodeCounters
from mcat_ds.infer.export import DTYPES, NativeSpeechConfig
from mcat_ds.infer.vllm_settings import VllmSettings, resolve_settings
from mcat_ds.optional import require

vllm = require("vllm")
from vllm import LLM, SamplingParams  # noqa: E402 (after the check that says how to install it)

from mcat_ds.infer.vllm_model import ENCODER_COUNTS, encoder_window  # noqa: E402
from mcat_ds.infer.vllm_no_repeat import NO_REPEAT_KEY, NoRepeatNgramLogitsProcessor, installed_as_plugin  # noqa: E402


class VllmEngine:
    """Decodes (audio, prompt) requests on vLLM's engine over an export; the ids ``greedy_decode`` gives."""

    batches_whole_chunk = True
    """translate hands this engine a chunk's requests in one call (vLLM schedules them)."""
    encodes_audio = True
    """translate hands over samples, not speech rows: the encoder runs inside vLLM."""

    def __init__(self, export_dir: str | Path, *, max_new_tokens: int, no_repeat_ngram_size: int,
                 eos_token_id: int, dtype: str, settings: VllmSettings = VllmSettings()):
        root = Path(export_dir)
        self.speech = NativeSpeechConfig.read(root)
        self.window: FeatureWindow = encoder_window(self.speech)
        on_cpu = not torch.cuda.is_available()
        settings = resolve_settings(settings, root, DTYPES[dtype].itemsize, on_cpu)
        self.settings = settings
        self.max_model_len = settings.max_model_len
        self.engine = LLM(
            model=str(root), dtype=dtype, seed=settings.seed,
            # ids go in and come out (translate tokenizes and decodes)
            skip_tokenizer_init=not settings.load_tokenizer,
            # prompts start with speech positions, which differ per utterance: nothing to share
            enable_prefix_caching=False,
            generation_config="vllm",  # the export's generation_config.json sets no defaults here
            tensor_parallel_size=settings.tensor_parallel,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            max_model_len=settings.max_model_len, max_num_seqs=settings.max_num_seqs,
            limit_mm_per_prompt={"audio": 1}, worker_extension_cls=ENCODER_COUNTS,
            # on CPU the warm-up would run the encoder on dozens of dummy windows: minutes on a few cores
            enforce_eager=settings.enforce_eager or on_cpu, skip_mm_profiling=on_cpu,
            **({} if settings.kv_cache_memory_bytes is None else {"kv_cache_memory_bytes": settings.kv_cache_memory_bytes}),
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

    def encoder_counts(self) -> tuple[int, int]:
        """(encoder calls, audio items encoded) so far, summed over the engine's workers."""
        counts = self.engine.collective_rpc("mcat_encoder_counts")
        return sum(calls for calls, _ in counts), sum(items for _, items in counts)

    def decode_audio(self, requests: list[tuple[np.ndarray, TokenizedExample]],
                     counters: DecodeCounters) -> list[list[int]]:
        """(16 kHz samples of at most the window, prompt) per request -> new ids per request, without
        the end-of-sequence token. Requests sharing an utterance should share its samples array."""
        longest = self.speech.num_speech_tokens + max(len(example.prompt_ids) for _, example in requests)
        if longest + self.max_new_tokens > self.max_model_len:
            # vLLM would end such requests early, without a word
            raise ValueError(f"a prompt of {longest} positions (speech and tokens) plus max_new_tokens "
                             f"{self.max_new_tokens} exceeds --max-model-len {self.max_model_len}: raise it")
        prompts = [{"prompt_token_ids": list(example.prompt_ids), "multi_modal_data": {"audio": samples}}
                   for samples, example in requests]
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

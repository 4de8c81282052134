"""Batched translation of prepared shards: ``mcat translate``.

What makes it fast:
- the encoder and adapter run once per utterance, however many target languages it is translated
  into (an utterance's speech embeddings serve all its prompts);
- utterances are encoded longest first in batches, requests are decoded in batches sorted by prompt
  length, so padding stays small;
- the ``fast`` decoder is a greedy loop over the LLM's KV cache that computes the LM head for the last
  position only (Gemma's vocabulary is 256k: full-prompt logits would dwarf the prompt's compute) and
  drops finished sequences from the batch and the cache, so they stop costing compute. It gives the
  tokens HF ``generate`` gives (greedy, same no-repeat n-gram rule); beam search uses ``generate``;
- ``vllm`` (``mcat_ds.infer.vllm_engine``) hands a chunk's requests, audio and prompt, to vLLM's
  scheduler at once; the encoder runs inside vLLM (its encoder cache keeps it to once per utterance).

The speech side (an ``MCATModel``; none for vLLM, which encodes itself) and the engine are separate:
the loop below reads, plans and writes the same way for every engine.

Output: one JSON line per request, with at least ``id``, ``src``, ``tgt``, ``hyp`` (the translation;
the transcript for ASR), ``hyp_transcript`` (SRT), ``ref`` and ``src_ref`` (reference translation
and transcript), written as batches finish and rewritten in input order at the end. Re-running skips
the ids already in the output (and in the per-rank part files of an interrupted run); what lies next
to the output, and how it is kept consistent, is ``mcat_ds.infer.outputs``. With several
processes (``torchrun``/``deepspeed`` set RANK and WORLD_SIZE) each takes every WORLD_SIZE-th
utterance; rank 0 merges. Audio longer than the encoder's window is trimmed to it, as the release
does, so an evaluation scores every utterance (``long_audio="skip"`` skips it instead); both are
counted. A summary (counts, malformed SRT outputs, skipped audio, encoder calls,
decode steps, timing) goes next to the output as ``<out>.summary.json``.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from mcat_ds.batching import TokenizedExample, collate_examples, tokenize_example
from mcat_ds.config import Task
from mcat_ds.data.audio import SAMPLE_RATE, AudioError, FeatureWindow, LogMelSpectrogram, decode_audio, feature_frames, pad_waveforms
from mcat_ds.data.shards import DataError, IndexEntry, ShardReader, load_index, read_sample_meta
from mcat_ds.files import naming, write_atomically
from mcat_ds.infer.decoding import DecodeCounters, greedy_decode
from mcat_ds.infer.outputs import appending, merge_outputs, part_path, read_outputs
from mcat_ds.infer.requests import Request, TranslateConfig, plan_requests
from mcat_ds.model.mcat import GenerationOptions, MCATModel
from mcat_ds.prompts import build_prompt, split_srt_output




def decode_requests(model: MCATModel, speech: torch.Tensor, prompts, config: TranslateConfig,
                    counters: DecodeCounters) -> list[list[int]]:
    """Token ids per request: the fast greedy loop, or HF ``generate`` (beam search, or asked for)."""
    options = GenerationOptions(num_beams=config.beams, max_new_tokens=config.max_new_tokens,
                                no_repeat_ngram_size=config.no_repeat_ngram_size)
    if config.engine == "hf" or config.beams > 1:
        return model.generate_from_speech(speech, prompts, options)
    embeds = model.input_embeddings(prompts, speech)
    return greedy_decode(model.llm, embeds, prompts.attention_mask, config.max_new_tokens, model.eos_token_id,
                         config.no_repeat_ngram_size, counters)


class TorchEngine:
    """The ``fast`` and ``hf`` engines: decoding over the MCAT model's own (peft) LLM, in batches of
    ``config.batch`` requests of similar prompt length."""

    batches_whole_chunk = False
    encodes_audio = False

    def __init__(self, model: MCATModel, config: TranslateConfig):
        self.model = model
        self.config = config

    def decode(self, speech: torch.Tensor, examples: list[TokenizedExample], counters: DecodeCounters) -> list[list[int]]:
        prompts = collate_examples(examples, self.model.num_speech_tokens, self.model.pad_token_id,
                                   padding_side="left").to(speech.device)
        return decode_requests(self.model, speech, prompts, self.config, counters)


class Engine(Protocol):
    batches_whole_chunk: bool
    """True: translate hands over a chunk's requests in one call (the engine schedules them)."""
    encodes_audio: bool
    """True: the engine takes samples and encodes them itself (``decode_audio``, ``window``,
    ``encoder_counts``); False: speech rows from the speech side (``decode``)."""

    def decode(self, speech: torch.Tensor, examples: list[TokenizedExample], counters: DecodeCounters) -> list[list[int]]:
        """Speech rows (one per request, as the engine's speech side made them) and prompts -> new ids."""


class SpeechSide(Protocol):
    """What translate needs of the speech half: an ``MCATModel`` or an export's ``ExportedSpeech``."""

    encoder: torch.nn.Module
    num_speech_tokens: int

    def speech_embeddings(self, features: torch.Tensor, feature_lengths: torch.Tensor) -> torch.Tensor: ...


# ---------------------------------------------------------------- the run


@dataclass
class TranslateSummary:
    requests: int = 0
    written: int = 0
    already_done: int = 0
    utterances_encoded: int = 0
    encoder_calls: int = 0
    """Encoder forward calls over all utterances (batched): utterances_encoded / encoder batch."""
    skipped_audio: dict[str, str] = field(default_factory=dict)
    """Utterances not translated (unreadable audio, or too long with ``long_audio=skip``): id -> why."""
    trimmed_audio: dict[str, float] = field(default_factory=dict)
    """Utterances longer than the window, translated from their first window: id -> seconds."""
    long_audio_skipped: dict[str, float] = field(default_factory=dict)
    """Utterances longer than the window and skipped (``long_audio=skip``): id -> seconds."""
    srt_malformed: int = 0
    engine: str = ""
    decode_steps: int = 0
    """LLM calls after the prompt (fast engine; vLLM schedules its own and this stays 0)."""
    token_rows: int = 0
    output_tokens: int = 0
    seconds: float = 0.0


def _utterance_chunks(pending: dict[int, list[Request]], seconds: Callable[[int], float], requests_limit: int,
                      utterances_limit: float):
    """Utterances longest first, grouped until their requests reach ``requests_limit`` (or the
    chunk holds ``utterances_limit`` utterances)."""
    order = sorted(pending, key=lambda index: -seconds(index))
    chunk, requests = [], 0
    for index in order:
        chunk.append(index)
        requests += len(pending[index])
        if requests >= requests_limit or len(chunk) >= utterances_limit:
            yield chunk
            chunk, requests = [], 0
    if chunk:
        yield chunk


@dataclass(frozen=True)
class Utterances:
    """What :func:`decode_utterances` needs of the audio, by utterance index: prepared shards for
    ``mcat translate``, the chunks of long recordings for ``mcat translate-audio``."""

    seconds: Callable[[int], float]
    """Its length, for longest-first order (before it is read)."""
    load: Callable[[int], np.ndarray | None]
    """16 kHz samples, at most the encoder's window; None: not decodable (the caller records why)."""
    transcript: Callable[[int], str | None] = lambda index: None
    """The transcript an SMT prompt carries."""


def speech_window(speech_side: SpeechSide | None, engine: Engine | None = None) -> FeatureWindow:
    """The audio the encoder takes at once: the engine's when it encodes, else the speech side's."""
    if engine is not None and engine.encodes_audio:
        return engine.window
    return FeatureWindow(speech_side.encoder.num_mel_bins, speech_side.encoder.window_frames)


def _prompts(requests: list[Request], hf_tokenizer, utterances: Utterances, config: TranslateConfig
             ) -> list[TokenizedExample]:
    return [tokenize_example(hf_tokenizer, build_prompt(config.task, request.src, request.tgt,
                                                        transcript=utterances.transcript(request.entry)))
            for request in requests]


def decode_utterances(speech_side: SpeechSide | None, engine: Engine, hf_tokenizer, utterances: Utterances,
                      pending: dict[int, list[Request]], config: TranslateConfig, summary: TranslateSummary,
                      counters: DecodeCounters, write: Callable[[list[tuple[Request, str]]], None]) -> None:
    """Every pending request decoded: utterances longest first, each encoded (with its adapter) once
    for all its requests, in batches of ``config.encoder_batch``; requests decoded in batches sorted
    by prompt length. ``write`` gets each decoded batch's (request, text) pairs as it finishes.
    An engine that encodes (vLLM) gets a chunk's samples and prompts at once instead."""
    if engine.encodes_audio:
        return _decode_with_audio(engine, hf_tokenizer, utterances, pending, config, summary, counters, write)
    device = next(speech_side.parameters()).device
    window = speech_window(speech_side, engine)
    log_mel = LogMelSpectrogram(window).to(device)
    # an engine that schedules its own batches gets a chunk of requests at once, encoded in batches
    utterances_limit = float("inf") if engine.batches_whole_chunk else config.encoder_batch
    for chunk in _utterance_chunks(pending, utterances.seconds, config.batch, utterances_limit):
        loaded = [(index, samples) for index in chunk if (samples := utterances.load(index)) is not None]
        if not loaded:
            continue
        speech = []
        for first in range(0, len(loaded), config.encoder_batch):
            waveforms, num_samples = pad_waveforms([samples for _, samples in loaded[first:first + config.encoder_batch]],
                                                   window)
            features = log_mel(waveforms.to(device), num_samples.to(device))
            speech.append(speech_side.speech_embeddings(features, feature_frames(num_samples).to(device)))
            summary.encoder_calls += 1
        speech = torch.cat(speech)
        summary.utterances_encoded += len(loaded)
        slot = {index: position for position, (index, _) in enumerate(loaded)}
        batch_requests = [r for index, _ in loaded for r in pending[index]]
        tokenized = _prompts(batch_requests, hf_tokenizer, utterances, config)
        by_length = sorted(range(len(batch_requests)), key=lambda i: len(tokenized[i].prompt_ids))
        group = len(by_length) if engine.batches_whole_chunk else config.batch
        for first in range(0, len(by_length), group):
            picked = by_length[first:first + group]
            rows = torch.tensor([slot[batch_requests[i].entry] for i in picked], device=device)
            outputs = engine.decode(speech[rows], [tokenized[i] for i in picked], counters)
            # tags are added tokens, not special ones: they stay in the text (SRT needs them)
            write([(batch_requests[i], hf_tokenizer.decode(ids, skip_special_tokens=True))
                   for i, ids in zip(picked, outputs)])


def _decode_with_audio(engine: Engine, hf_tokenizer, utterances: Utterances, pending: dict[int, list[Request]],
                       config: TranslateConfig, summary: TranslateSummary, counters: DecodeCounters,
                       write: Callable[[list[tuple[Request, str]]], None]) -> None:
    """The engine encodes: each chunk of ``config.batch`` requests goes over as (samples, prompt)
    pairs in one call, an utterance's requests side by side and sharing its samples (vLLM's encoder
    cache then encodes it once); the engine's encoder counts go into the summary."""
    calls_before, items_before = engine.encoder_counts()
    for chunk in _utterance_chunks(pending, utterances.seconds, config.batch, float("inf")):
        loaded = [(index, samples) for index in chunk if (samples := utterances.load(index)) is not None]
        if not loaded:
            continue
        batch = [(request, samples) for index, samples in loaded for request in pending[index]]
        tokenized = _prompts([request for request, _ in batch], hf_tokenizer, utterances, config)
        outputs = engine.decode_audio([(samples, example) for (_, samples), example in zip(batch, tokenized)], counters)
        calls, items = engine.encoder_counts()
        summary.encoder_calls += calls - calls_before
        summary.utterances_encoded += items - items_before
        calls_before, items_before = calls, items
        # tags are added tokens, not special ones: they stay in the text (SRT needs them)
        write([(request, hf_tokenizer.decode(ids, skip_special_tokens=True)) for (request, _), ids in zip(batch, outputs)])


def _record(request: Request, meta: dict, text: str, task: Task, summary: TranslateSummary) -> dict:
    record = {"id": request.id, "order": request.order, "src": request.src, "tgt": request.tgt, "output": text}
    if task == "srt":
        parts = split_srt_output(text, request.src, request.tgt)
        summary.srt_malformed += not parts.well_formed
        record.update(hyp=parts.translation, hyp_transcript=parts.transcript, well_formed=parts.well_formed)
    else:
        record["hyp"] = text.strip()
    if request.tgt is not None:
        record["ref"] = meta.get("translations", {}).get(request.tgt)
    record["src_ref"] = meta.get("transcript")
    return record


def output_order(entries: list[IndexEntry], config: TranslateConfig) -> dict[str, int]:
    """Request id -> position in the data's full plan (every direction): the order of the merged
    output, whichever directions each run into it asked for."""
    return {request.id: request.order for request in plan_requests(entries, replace(config, directions="all"))}


@torch.no_grad()
def translate(speech_side: SpeechSide | None, engine: Engine, hf_tokenizer, data_dir: str | Path, out: str | Path,
              config: TranslateConfig, rank: int = 0, world_size: int = 1, barrier=None,
              done: dict[str, dict] | None = None) -> TranslateSummary:
    """Translate every request of ``data_dir`` not yet in ``out``; see the module docstring.
    ``done``: the outputs already there, as every rank read them before any rank wrote (read here
    when not given: one process)."""
    started = time.perf_counter()
    out = Path(out)
    data_dir = Path(data_dir)
    entries = load_index(data_dir)
    requests = plan_requests(entries, config)
    if done is None:
        done = read_outputs(out)
    summary = TranslateSummary(requests=len(requests), already_done=sum(r.id in done for r in requests))
    mine = [r for r in requests if r.id not in done and r.entry % world_size == rank]
    pending: dict[int, list[Request]] = defaultdict(list)
    for request in mine:
        pending[request.entry].append(request)

    reader = ShardReader(data_dir)
    counters = DecodeCounters()
    metas: dict[int, dict] = {}
    window = speech_window(speech_side, engine)

    def load(index: int):
        entry = entries[index]
        try:
            metas[index] = read_sample_meta(reader, entry)
            samples = decode_audio(reader.read(entry.shard, entry.audio))
            if samples.size > window.samples:
                seconds = round(samples.size / SAMPLE_RATE, 3)
                if config.long_audio == "skip":
                    summary.long_audio_skipped[entry.key] = seconds
                    raise AudioError(f"{seconds:.2f} s is longer than the {window.seconds:g} s window")
                summary.trimmed_audio[entry.key] = seconds
                samples = samples[:window.samples]
        except (DataError, AudioError, OSError) as error:
            summary.skipped_audio[entry.key] = f"{entry.shard}: {error}"
            return None
        return samples

    part_file = part_path(out, rank)
    try:
        with appending(part_file) as part:

            def write(outputs: list[tuple[Request, str]]) -> None:
                for request, text in outputs:
                    part.write(json.dumps(_record(request, metas[request.entry], text, config.task, summary),
                                          ensure_ascii=False) + "\n")
                    summary.written += 1
                part.flush()

            utterances = Utterances(seconds=lambda index: entries[index].seconds, load=load,
                                    transcript=lambda index: metas[index].get("transcript"))
            decode_utterances(speech_side, engine, hf_tokenizer, utterances, pending, config, summary, counters, write)
    except OSError as error:  # audio reads are caught in load(): this is the part file (a full disk)
        raise naming(error, part_file) from None
    summary.decode_steps, summary.token_rows, summary.output_tokens = (
        counters.decode_steps, counters.token_rows, counters.output_tokens)
    summary.engine = config.engine
    summary.seconds = time.perf_counter() - started
    if barrier is not None:
        barrier()
    if rank == 0:
        merge_outputs(out, output_order(entries, config))
        write_atomically(out.with_name(out.name + ".summary.json"), json.dumps(asdict(summary), indent=1) + "\n")
    return summary

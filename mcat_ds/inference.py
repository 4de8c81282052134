"""Batched translation of prepared shards: ``mcat translate``.

What makes it fast:
- the encoder and adapter run once per utterance, however many target languages it is translated
  into (an utterance's speech embeddings serve all its prompts);
- utterances are encoded longest first in batches, requests are decoded in batches sorted by prompt
  length, so padding stays small;
- the ``fast`` decoder is a greedy loop over the LLM's KV cache that computes the LM head for the last
  position only (Gemma's vocabulary is 256k: full-prompt logits would dwarf the prompt's compute) and
  drops finished sequences from the batch and the cache, so they stop costing compute. It gives the
  tokens HF ``generate`` gives (greedy, same no-repeat n-gram rule); beam search uses ``generate``.

Output: one JSON line per request, with at least ``id``, ``src``, ``tgt``, ``hyp`` (the translation;
the transcript for ASR), ``hyp_transcript`` (SRT), ``ref`` and ``src_ref`` (reference translation
and transcript), written as batches finish and rewritten in input order at the end. Re-running skips
the ids already in the output (and in the per-rank part files of an interrupted run). With several
processes (``torchrun``/``deepspeed`` set RANK and WORLD_SIZE) each takes every WORLD_SIZE-th
utterance; rank 0 merges. Audio longer than the encoder's window is trimmed to it, as the release
does, so an evaluation scores every utterance (``long_audio="skip"`` skips it instead); both are
counted. A summary (counts, malformed SRT outputs, skipped audio, encoder calls,
decode steps, timing) goes next to the output as ``<out>.summary.json``.
"""

from __future__ import annotations

import inspect
import json
import os
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch

from mcat_ds.batching import collate_examples, tokenize_example
from mcat_ds.config import Task
from mcat_ds.data.audio import SAMPLE_RATE, AudioError, FeatureWindow, LogMelSpectrogram, decode_audio, feature_frames, pad_waveforms
from mcat_ds.data.shards import DataError, IndexEntry, ShardReader, load_index
from mcat_ds.languages import get_language
from mcat_ds.model.attention import use_decoding_attention
from mcat_ds.model.mcat import GenerationOptions, MCATModel
from mcat_ds.prompts import build_prompt, split_srt_output

Decoder = Literal["fast", "hf"]


@dataclass(frozen=True)
class TranslateConfig:
    task: Task = "srt"
    directions: str = "all"
    """``all``, ``eng-x``, ``x-eng`` or a comma list of ``src-tgt`` (``x`` stands for any language)."""
    batch: int = 50
    """Requests decoded together."""
    encoder_batch: int = 32
    """Utterances encoded together (at most)."""
    beams: int = 1
    max_new_tokens: int = 256
    no_repeat_ngram_size: int = 0
    decoder: Decoder = "fast"
    long_audio: Literal["trim", "skip"] = "trim"
    """Audio longer than the encoder's window: ``trim`` to the window (what the release does, so an
    evaluation scores every utterance) or ``skip``. Either way it is counted in the summary."""


@dataclass(frozen=True)
class Request:
    order: int
    """Position in the input order (index order, then target language order)."""
    id: str
    entry: int
    src: str
    tgt: str | None


def parse_directions(spec: str) -> list[tuple[str, str]]:
    """``all`` / ``eng-x`` / ``x-eng`` / ``deu-fra,cmn-x`` -> (src, tgt) patterns, ``x`` = any."""
    if spec == "all":
        return [("x", "x")]
    patterns = []
    for part in spec.split(","):
        pieces = part.strip().split("-")
        if len(pieces) != 2 or not all(pieces):
            raise ValueError(f"direction {part!r} is not SRC-TGT (e.g. deu-fra, eng-x, x-eng)")
        for code in pieces:
            if code != "x":
                get_language(code)  # unknown codes fail with the near matches
        patterns.append((pieces[0], pieces[1]))
    return patterns


def _matches(patterns: list[tuple[str, str]], src: str, tgt: str | None) -> bool:
    return any(ps in ("x", src) and (tgt is None or pt in ("x", tgt)) for ps, pt in patterns)


def plan_requests(entries: list[IndexEntry], config: TranslateConfig) -> list[Request]:
    """ASR: one request per utterance. SMT/SRT: one per target language the utterance has a
    reference translation in, within ``directions``."""
    patterns = parse_directions(config.directions)
    requests = []
    for index, entry in enumerate(entries):
        if config.task == "asr":
            if _matches(patterns, entry.language, None):
                requests.append(Request(len(requests), entry.key, index, entry.language, None))
            continue
        for tgt in sorted(entry.translations):
            if tgt != entry.language and _matches(patterns, entry.language, tgt):
                requests.append(Request(len(requests), f"{entry.key}:{entry.language}-{tgt}", index, entry.language, tgt))
    return requests


# ---------------------------------------------------------------- decoding


def _ban_repeated_ngrams(logits, generated, rows, step: int, size: int):
    """-inf for each live row's tokens that would repeat one of its n-grams (HF's no_repeat_ngram_size)."""
    if step + 1 < size:
        return logits
    logits = logits.clone()
    history = generated[rows, :step].tolist()
    for live, tokens in enumerate(history):
        banned = _banned_ngram_tokens(tokens, size)
        if banned:
            logits[live, banned] = float("-inf")
    return logits


def _banned_ngram_tokens(tokens: list[int], size: int) -> list[int]:
    """Tokens that would repeat an n-gram of ``tokens`` (HF's no_repeat_ngram_size rule)."""
    if size <= 0 or len(tokens) + 1 < size:
        return []
    prefix = tuple(tokens[len(tokens) - size + 1:])
    return [tokens[i + size - 1] for i in range(len(tokens) - size + 1) if tuple(tokens[i:i + size - 1]) == prefix]


@dataclass
class DecodeCounters:
    decode_steps: int = 0
    """LLM forward calls after the prompt (one per generated position of the batch)."""
    token_rows: int = 0
    """Sequence rows the LLM computed over all decode steps (finished rows dropped cost none)."""
    output_tokens: int = 0


def _cache_argument(llm) -> str:
    """transformers 5.x names the KV cache argument ``cache``; 4.x ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(llm.forward).parameters else "past_key_values"


def _returned_cache(output):
    return output.cache if "cache" in output.keys() else output.past_key_values


@torch.no_grad()
def greedy_decode(llm, embeds: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, eos_token_id: int,
                  no_repeat_ngram_size: int = 0, counters: DecodeCounters | None = None) -> list[list[int]]:
    """Greedy decoding over the KV cache from left-padded prompt embeddings; new ids per row, up to
    (not including) end-of-sequence. Positions follow HF ``generate`` (cumulative mask, pads at 1)."""
    counters = counters or DecodeCounters()
    use_decoding_attention(llm)
    batch = embeds.shape[0]
    position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
    out = llm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
              use_cache=True, logits_to_keep=1)
    cache, logits = _returned_cache(out), out.logits[:, -1]
    device = embeds.device
    rows = torch.arange(batch, device=device)  # which original row each live row is
    generated = torch.full((batch, max_new_tokens), eos_token_id, dtype=torch.long, device=device)
    positions = position_ids[:, -1:]
    mask_column = attention_mask.new_ones(batch, 1)
    cache_argument = _cache_argument(llm)
    for step in range(max_new_tokens):
        if no_repeat_ngram_size:
            logits = _ban_repeated_ngrams(logits, generated, rows, step, no_repeat_ngram_size)
        tokens = logits.argmax(-1)
        generated[rows, step] = tokens
        finished = tokens == eos_token_id
        # one host sync per step: how many rows finished (HF generate syncs as often)
        done = int(finished.sum())
        if step == max_new_tokens - 1 or done == tokens.shape[0]:
            break
        if done:  # finished rows leave the batch and the cache: they stop costing compute
            keep = (~finished).nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            rows, tokens, attention_mask, positions = rows[keep], tokens[keep], attention_mask[keep], positions[keep]
        attention_mask = torch.cat([attention_mask, mask_column[: attention_mask.shape[0]]], dim=1)
        positions = positions + 1
        out = llm(input_ids=tokens[:, None], attention_mask=attention_mask, position_ids=positions,
                  use_cache=True, **{cache_argument: cache})
        cache, logits = _returned_cache(out), out.logits[:, -1]
        counters.decode_steps += 1
        counters.token_rows += tokens.shape[0]
    results = []
    for row in generated.tolist():
        results.append(row[: row.index(eos_token_id)] if eos_token_id in row else row)
    counters.output_tokens += sum(len(row) for row in results)
    return results


def decode_requests(model: MCATModel, speech: torch.Tensor, prompts, config: TranslateConfig,
                    counters: DecodeCounters) -> list[list[int]]:
    """Token ids per request: the fast greedy loop, or HF ``generate`` (beam search, or asked for)."""
    options = GenerationOptions(num_beams=config.beams, max_new_tokens=config.max_new_tokens,
                                no_repeat_ngram_size=config.no_repeat_ngram_size)
    if config.decoder == "hf" or config.beams > 1:
        return model.generate_from_speech(speech, prompts, options)
    embeds = model.input_embeddings(prompts, speech)
    return greedy_decode(model.llm, embeds, prompts.attention_mask, config.max_new_tokens, model.eos_token_id,
                         config.no_repeat_ngram_size, counters)


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
    decode_steps: int = 0
    token_rows: int = 0
    output_tokens: int = 0
    seconds: float = 0.0


def _read_done(paths: Iterable[Path]) -> dict[str, dict]:
    done = {}
    for path in paths:
        if not path.is_file():
            continue
        with open(path, encoding="utf-8") as lines:
            for line in lines:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill: the request runs again
                done[record["id"]] = record
    return done


def _part_path(out: Path, rank: int) -> Path:
    return out.with_name(f"{out.name}.part{rank}")


def _part_paths(out: Path) -> list[Path]:
    """Every rank's part file, whatever the world size of the run that wrote them."""
    return sorted(out.parent.glob(f"{out.name}.part*"))


def _utterance_chunks(pending: dict[int, list[Request]], entries: list[IndexEntry], config: TranslateConfig):
    """Utterances longest first, grouped until their requests fill a decode batch (or the encoder
    batch is full)."""
    order = sorted(pending, key=lambda index: -entries[index].seconds)
    chunk, requests = [], 0
    for index in order:
        chunk.append(index)
        requests += len(pending[index])
        if requests >= config.batch or len(chunk) >= config.encoder_batch:
            yield chunk
            chunk, requests = [], 0
    if chunk:
        yield chunk


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


@torch.no_grad()
def translate(model: MCATModel, tokenizer, data_dir: str | Path, out: str | Path, config: TranslateConfig,
              rank: int = 0, world_size: int = 1, barrier=None) -> TranslateSummary:
    """Translate every request of ``data_dir`` not yet in ``out``; see the module docstring."""
    started = time.perf_counter()
    out = Path(out)
    data_dir = Path(data_dir)
    entries = load_index(data_dir)
    requests = plan_requests(entries, config)
    done = _read_done([out, *_part_paths(out)])
    summary = TranslateSummary(requests=len(requests), already_done=sum(r.id in done for r in requests))
    mine = [r for r in requests if r.id not in done and r.entry % world_size == rank]
    pending: dict[int, list[Request]] = defaultdict(list)
    for request in mine:
        pending[request.entry].append(request)

    device = next(model.parameters()).device
    window = FeatureWindow(model.encoder.num_mel_bins, model.encoder.window_frames)
    log_mel = LogMelSpectrogram(window).to(device)
    reader = ShardReader(data_dir)
    counters = DecodeCounters()
    hf = tokenizer.hf
    part_path = _part_path(out, rank)
    with open(part_path, "a", encoding="utf-8") as part:
        if part.tell() and not part_path.read_bytes().endswith(b"\n"):
            part.write("\n")  # a line cut by a kill stays on its own line (and is ignored)
        for chunk in _utterance_chunks(pending, entries, config):
            loaded, metas = [], {}
            for index in chunk:
                entry = entries[index]
                try:
                    metas[index] = json.loads(reader.read(entry.shard, entry.meta))
                    samples = decode_audio(reader.read(entry.shard, entry.audio))
                    if samples.size > window.samples:
                        seconds = round(samples.size / SAMPLE_RATE, 3)
                        if config.long_audio == "skip":
                            summary.long_audio_skipped[entry.key] = seconds
                            raise AudioError(f"{seconds:.2f} s is longer than the {window.seconds:g} s window")
                        summary.trimmed_audio[entry.key] = seconds
                        samples = samples[:window.samples]
                except (DataError, AudioError, json.JSONDecodeError, OSError) as error:
                    summary.skipped_audio[entry.key] = f"{entry.shard}: {error}"
                    continue
                loaded.append((index, samples))
            if not loaded:
                continue
            waveforms, num_samples = pad_waveforms([samples for _, samples in loaded], window)
            features = log_mel(waveforms.to(device), num_samples.to(device))
            speech = model.speech_embeddings(features, feature_frames(num_samples).to(device))
            summary.utterances_encoded += len(loaded)
            summary.encoder_calls += 1
            slot = {index: position for position, (index, _) in enumerate(loaded)}
            batch_requests = [r for index, _ in loaded for r in pending[index]]
            tokenized = []
            for request in batch_requests:
                meta = metas[request.entry]
                prompt = build_prompt(config.task, request.src, request.tgt, transcript=meta.get("transcript"))
                tokenized.append(tokenize_example(hf, prompt))
            by_length = sorted(range(len(batch_requests)), key=lambda i: len(tokenized[i].prompt_ids))
            for first in range(0, len(by_length), config.batch):
                picked = by_length[first:first + config.batch]
                prompts = collate_examples([tokenized[i] for i in picked], model.num_speech_tokens, hf.pad_token_id,
                                           padding_side="left").to(device)
                rows = torch.tensor([slot[batch_requests[i].entry] for i in picked], device=device)
                outputs = decode_requests(model, speech[rows], prompts, config, counters)
                for i, ids in zip(picked, outputs):
                    request = batch_requests[i]
                    text = hf.decode(ids, skip_special_tokens=True)
                    part.write(json.dumps(_record(request, metas[request.entry], text, config.task, summary),
                                          ensure_ascii=False) + "\n")
                    summary.written += 1
                part.flush()
    summary.decode_steps, summary.token_rows, summary.output_tokens = (
        counters.decode_steps, counters.token_rows, counters.output_tokens)
    summary.seconds = time.perf_counter() - started
    if barrier is not None:
        barrier()
    if rank == 0:
        merge_outputs(out, requests)
        out.with_name(out.name + ".summary.json").write_text(json.dumps(asdict(summary), indent=1) + "\n")
    return summary


def merge_outputs(out: Path, requests: list[Request]) -> None:
    """Output and part files -> the output in input order (atomic replace), part files removed."""
    parts = _part_paths(out)
    done = _read_done([out, *parts])
    order = {r.id: r.order for r in requests}
    records = sorted((record for record in done.values() if record["id"] in order), key=lambda r: order[r["id"]])
    staging = out.with_name(out.name + ".tmp")
    with open(staging, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps({**record, "order": order[record["id"]]}, ensure_ascii=False) + "\n")
    os.replace(staging, out)
    for path in parts:
        path.unlink(missing_ok=True)

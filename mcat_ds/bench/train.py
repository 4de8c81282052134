"""Training throughput, side by side in one run: the naive path against ours.

- naive: the modules as they come: the adapter's PyTorch path with one K/V projection per layer over
  every frame, eager attention in the LLM, a batch padded to its longest sequence, logits over the
  whole sequence and the whole vocabulary;
- ours: the adapter's kernels (on CUDA) and one K/V GEMM over valid frames, the LLM's attention
  chosen by ``auto`` (flash-attn, else FlexAttention on CUDA), one packed padding-free row, LM head
  and cross-entropy fused over label tokens (liger-kernel on CUDA when installed, told its chunk;
  where it is, ours with the chunked PyTorch loss runs beside it).

Both train the same random model (a preset's real sizes, optionally only its first layers) on the
same batches: speech of FLEURS-like lengths, SRT-like prompts, targets of 20-120 tokens. Each step is
forward, backward and a fused AdamW step over the trainable parameters. Peak memory is the CUDA
allocator's peak on a GPU; on CPU it is read from the profiler's memory timeline of one extra,
untimed step (parameters, gradients, optimizer state and activations alike). Counted as well:
padding tokens removed by packing, and the most fp32 logits alive at once (naive: every position's;
ours: one chunk of label tokens, ``mcat_ds.model.loss``).

Optional variants: ours with selective or full activation checkpointing of the LLM. With
``per_layer``, every variant also runs at half the LLM depth; the difference gives the time and
memory of one LLM layer, and from it the step at the preset's full depth (how ``large-27b`` is
reported: its 62 layers do not fit one GPU).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, replace

import torch

from mcat_ds.architectures import llm_config
from mcat_ds.batching import TokenizedExample, collate_examples
from mcat_ds.bench.harness import Row, benchmark_parser, cpu_peak_memory, csv_target, report
from mcat_ds.build import count_parameters
from mcat_ds.config import MCATConfig
from mcat_ds.model.attention import packed_length_multiple
from mcat_ds.model.checkpointing import enable_activation_checkpointing
from mcat_ds.model.loss import CHUNK_ROWS, resolve_loss_implementation
from mcat_ds.model.mcat import MCATOutput
from mcat_ds.model.random import fleurs_like_lengths, random_log_mel, random_mcat_model
from mcat_ds.presets import get_preset
from mcat_ds.train.costs import peak_flops, step_flops


@dataclass(frozen=True)
class TrainBenchConfig:
    preset: str = "small-9b"
    batch: int = 8
    steps: int = 10
    warmup_steps: int = 2
    target_tokens: tuple[int, int] = (20, 120)
    llm_layers: int | None = None
    encoder_layers: int | None = None
    device: str = "cuda"
    dtype: torch.dtype = torch.bfloat16
    seed: int = 0
    checkpointing: tuple[str, ...] = ()
    """Extra variants: ours under these activation checkpointing policies (selective, full)."""
    per_layer: bool = False
    """Also run at half the LLM depth (needs ``llm_layers``) and report per-layer figures."""


NAIVE = "naive (padded, eager, full logits)"
OURS = "ours (packed, label logits)"
OURS_CHUNKED_LOSS = "ours, chunked PyTorch loss instead of liger's"


def variant_configs(config: TrainBenchConfig) -> dict[str, tuple[MCATConfig, bool]]:
    """name -> (model config, packed batches); a variant's ``runtime`` says its checkpointing."""
    base = get_preset(config.preset)
    naive = copy.deepcopy(base)
    naive.model.adapter = replace(naive.model.adapter, kernels="torch", kv_projection="per_layer")
    naive.model.llm.attn_implementation = "eager"
    ours = copy.deepcopy(base)
    ours.model.adapter = replace(ours.model.adapter, kernels="auto", kv_projection="varlen")
    ours.model.llm.attn_implementation = "auto"
    for variant in (naive, ours):
        variant.runtime.gradient_checkpointing = False
    variants = {NAIVE: (naive, False), OURS: (ours, True)}
    if resolve_loss_implementation("auto", torch.device(config.device)) == "liger":
        # ours takes liger's fused loss here; the same step with the chunked PyTorch loss beside it
        chunked = copy.deepcopy(ours)
        chunked.model.llm.loss_implementation = "chunked"
        variants[OURS_CHUNKED_LOSS] = (chunked, True)
    for policy in config.checkpointing:
        checkpointed = copy.deepcopy(ours)
        checkpointed.runtime.gradient_checkpointing = True
        checkpointed.runtime.checkpointing_policy = policy
        variants[f"ours + {policy} checkpointing"] = (checkpointed, True)
    return variants


def workload(config: TrainBenchConfig, window_frames: int, vocab: int, bos: int, eos: int):
    generator = torch.Generator().manual_seed(config.seed)
    batches = []
    for _ in range(config.warmup_steps + config.steps):
        lengths = fleurs_like_lengths(config.batch, window_frames, generator)
        examples = []
        for _ in range(config.batch):
            low, high = config.target_tokens
            target = torch.randint(4, vocab, (int(torch.randint(low, high + 1, (1,), generator=generator)),),
                                   generator=generator).tolist()
            prompt = (bos, *torch.randint(4, vocab, (2,), generator=generator).tolist())
            examples.append(TokenizedExample(prompt, tuple(target) + (eos,)))
        batches.append((lengths, examples))
    return batches


def _measure(config: TrainBenchConfig) -> dict[str, dict[str, float | None]]:
    """Every variant's metrics at ``config``'s depth."""
    cuda = config.device.startswith("cuda")
    results = {}
    for name, (model_config, packed) in variant_configs(config).items():
        model = random_mcat_model(model_config, config.device, config.dtype, config.seed,
                                  config.llm_layers, config.encoder_layers)
        model.encoder.requires_grad_(False)
        if model_config.runtime.gradient_checkpointing:
            enable_activation_checkpointing(model.llm, model_config.runtime.checkpointing_policy)
        model.train()
        counts = count_parameters(model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=cuda or None)
        llm = model.llm.get_base_model().config
        vocab = model.llm.get_input_embeddings().weight.shape[0]
        data = workload(config, model.encoder.window_frames, llm.vocab_size, llm.bos_token_id or 2, model.eos_token_id)
        batches = []
        for lengths, examples in data:
            batch = collate_examples(examples, model.num_speech_tokens, model.pad_token_id,
                                     "packed" if packed else "right", packed_length_multiple(model.llm))
            batches.append((lengths, batch))

        def train_step(step: int, lengths: torch.Tensor, batch) -> MCATOutput:
            ids = list(range(step * config.batch, (step + 1) * config.batch))
            features = random_log_mel(model, lengths, ids, config.device, config.dtype, config.seed)
            out = model(features, lengths.to(config.device), batch.to(config.device), full_logits=not packed)
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return out

        if cuda:
            torch.cuda.reset_peak_memory_stats()
        samples = tokens = label_tokens = padded_tokens = logit_rows = 0  # logit_rows: the most alive at once
        losses = []
        elapsed = 0.0
        for step, (lengths, batch) in enumerate(batches):
            if cuda:
                torch.cuda.synchronize()
            started = time.perf_counter()
            out = train_step(step, lengths, batch)
            if cuda:
                torch.cuda.synchronize()
            if step >= config.warmup_steps:
                elapsed += time.perf_counter() - started
                samples += len(lengths)
                tokens += batch.num_tokens
                label_tokens += out.num_label_tokens
                padded_tokens += batch.input_ids.numel()
                logit_rows = max(logit_rows, out.logits.shape[0] * out.logits.shape[1] if out.logits is not None
                                 else min(out.num_label_tokens, CHUNK_ROWS))
                losses.append(out.loss.item())
        if cuda:
            peak_memory = torch.cuda.max_memory_allocated()
        else:  # one more step, untimed, under the profiler; the first batch (after warm-up, all buffers exist)
            peak_memory = cpu_peak_memory(lambda: train_step(0, *batches[0]))
        flops = step_flops(counts, tokens, samples, model.encoder.window_frames // 2, model_config, model.encoder.width,
                           model.llm.get_input_embeddings().weight.numel(), label_tokens)
        peak = peak_flops(torch.cuda.get_device_name()) if cuda else None
        results[name] = {
            "samples_per_s": samples / elapsed, "tokens_per_s": tokens / elapsed,
            "step_ms": elapsed / config.steps * 1e3,
            "padding_fraction": 1 - tokens / padded_tokens,
            "logits_gib_fp32_alive": logit_rows * vocab * 4 / 2**30,
            "mfu": flops / elapsed / peak if peak else None,
            "peak_memory_gib": peak_memory / 2**30 if peak_memory is not None else None,
            "loss": sum(losses) / len(losses),
        }
        model = optimizer = trainable = batches = None  # freed before the next variant is built
        if cuda:
            torch.cuda.empty_cache()
    return results


def _add_per_layer(config: TrainBenchConfig, results: dict[str, dict[str, float | None]]) -> None:
    """Per-LLM-layer time and memory from a second run at half the depth, and the step extrapolated
    to the preset's full depth (same batches: the workload does not depend on the depth)."""
    deep = config.llm_layers
    shallow_layers = max(1, deep // 2)
    if not deep or shallow_layers == deep:
        raise ValueError("per-layer figures need llm_layers >= 2")
    shallow = _measure(replace(config, llm_layers=shallow_layers))
    full_depth = llm_config(get_preset(config.preset).model.llm.architecture).num_hidden_layers
    for name, values in results.items():
        layer_ms = (values["step_ms"] - shallow[name]["step_ms"]) / (deep - shallow_layers)
        values["ms_per_llm_layer"] = layer_ms
        if values["peak_memory_gib"] is not None and shallow[name]["peak_memory_gib"] is not None:
            values["peak_memory_gib_per_llm_layer"] = (
                values["peak_memory_gib"] - shallow[name]["peak_memory_gib"]) / (deep - shallow_layers)
        full_step_s = (values["step_ms"] + layer_ms * (full_depth - deep)) / 1e3
        values[f"samples_per_s_at_{full_depth}_layers"] = config.batch / full_step_s


RATIO_METRICS = ("samples_per_s", "tokens_per_s", "peak_memory_gib", "logits_gib_fp32_alive", "step_ms",
                 "ms_per_llm_layer", "peak_memory_gib_per_llm_layer")


def bench_training(config: TrainBenchConfig) -> list[Row]:
    results = _measure(config)
    if config.per_layer:
        _add_per_layer(config, results)
    shape = (f"{config.preset}{f' first {config.llm_layers} LLM layers' if config.llm_layers else ''}"
             f"{f', {config.encoder_layers} encoder layers' if config.encoder_layers else ''}, random weights, "
             f"batch {config.batch}, targets {config.target_tokens[0]}-{config.target_tokens[1]} tokens, "
             f"{str(config.dtype).split('.')[-1]}")
    baseline = results[NAIVE]
    rows = []
    for name, values in results.items():
        for metric, value in values.items():
            if value is None:
                continue
            ratio = None
            if (metric in RATIO_METRICS or metric.startswith("samples_per_s_at_")) and baseline.get(metric):
                ratio = value / baseline[metric]
            rows.append(Row("training", shape, name, metric, value, ratio))
    return rows


# ---------------------------------------------------------------- the script


def main(argv: list[str] | None = None, description: str | None = None) -> None:
    parser = benchmark_parser(description, "train.csv")
    cuda = torch.cuda.is_available()
    parser.add_argument("--preset", default="small-9b" if cuda else "tiny")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16" if cuda else "fp32")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--llm-layers", type=int, help="only the LLM's first N layers")
    parser.add_argument("--encoder-layers", type=int, help="only the encoder's first N layers")
    parser.add_argument("--checkpointing", default="",
                        help="comma-separated policies (selective, full): extra variants of ours")
    parser.add_argument("--per-layer", action="store_true",
                        help="also run at half --llm-layers: per-layer time/memory, step at full depth")
    args = parser.parse_args(argv)
    config = TrainBenchConfig(
        preset="tiny" if args.smoke else args.preset, device="cpu" if args.smoke else args.device,
        dtype=torch.float32 if args.smoke or args.dtype == "fp32" else torch.bfloat16,
        batch=4 if args.smoke else args.batch, steps=2 if args.smoke else args.steps,
        warmup_steps=1 if args.smoke else 2, llm_layers=args.llm_layers, encoder_layers=args.encoder_layers,
        checkpointing=tuple(policy for policy in args.checkpointing.split(",") if policy),
        per_layer=args.per_layer)
    rows = bench_training(config)
    report(rows, csv_target(args, "train.csv"))

"""FLOPs of a training step (for MFU) and the GPU memory a stage needs (checked before loading).

FLOP count per step, in multiply-adds x 2:
- LLM: 4 x P_llm per token: 2 for the forward pass and 2 for the backward pass's activation
  gradients; the frozen weights get no weight gradients (LoRA's are negligible), and activation
  recomputation is not counted (MFU counts useful work). The embedding table is a lookup, not a
  matmul: its P_head = vocabulary x width parameters count only as the LM head, which runs on the
  label tokens alone (4 x P_head per label token).
- Speech encoder: 2 x P_encoder per encoder frame, forward only (frozen, no backward).
- Adapter: 6 x P_adapter per query (forward, activation and weight gradients), plus the
  cross-attention K/V projections over every encoder frame.
Attention score FLOPs are left out: sequences are short (30 speech tokens + prompt + target).
"""

from __future__ import annotations

from dataclasses import dataclass

from mcat_ds.build import ParameterCounts, build_meta_model, count_parameters
from mcat_ds.config import MCATConfig

PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}
"""Dense bf16 tensor-core peaks (vendor datasheets, without sparsity)."""


def peak_flops(device_name: str) -> float | None:
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in device_name), None)


def step_flops(counts: ParameterCounts, llm_tokens: int, samples: int, encoder_frames: int,
               config: MCATConfig, encoder_width: int, head_parameters: int = 0, label_tokens: int = 0) -> float:
    adapter = config.model.adapter
    cross_layers = len(range(0, adapter.num_layers, adapter.cross_attention_every))
    kv_projection = 2 * cross_layers * encoder_width * adapter.hidden_size
    return (
        4.0 * (counts.llm - head_parameters) * llm_tokens
        + 4.0 * head_parameters * label_tokens
        + 2.0 * counts.encoder * encoder_frames * samples
        + 6.0 * counts.adapter * adapter.num_queries * samples
        + 6.0 * kv_projection * encoder_frames * samples
    )


@dataclass(frozen=True)
class MemoryEstimate:
    frozen_weights: float
    trainable_state: float
    activations: float
    logits: float

    @property
    def total(self) -> float:
        return self.frozen_weights + self.trainable_state + self.activations + self.logits

    def describe(self) -> str:
        parts = ", ".join(f"{name.replace('_', ' ')} {value / 2**30:.1f} GiB" for name, value in vars(self).items())
        return f"{self.total / 2**30:.1f} GiB ({parts})"


def estimate_gpu_memory(counts: ParameterCounts, config: MCATConfig, llm_width: int, llm_layers: int,
                        vocab: int, world_size: int, zero_stage: int, offload: bool,
                        tokens_per_sample: int = 230) -> MemoryEstimate:
    """A deliberately rough upper estimate per GPU; it exists to fail early, not to plan to the MB."""
    bytes_per_weight = 2  # bf16
    frozen = (counts.encoder + counts.llm) * bytes_per_weight / (world_size if zero_stage >= 3 else 1)
    sharded = world_size if zero_stage >= 1 else 1
    optimizer = 0 if offload else counts.trainable * 12 / sharded  # fp32 master + two AdamW moments
    gradients = counts.trainable * 2 / (world_size if zero_stage >= 2 else 1)
    trainable = counts.trainable * bytes_per_weight + gradients + optimizer
    tokens = config.stage.micro_batch_size * tokens_per_sample
    # Bytes per token and hidden unit one layer holds for backward in bf16: all of it ~34 (with the
    # MLP's 4x-wide intermediate); selective checkpointing keeps its matmul and attention outputs ~27
    # (q, k, v, attention, o, gate, up, down); full checkpointing keeps only its input (2), plus one layer's 34 while it is
    # recomputed.
    per_layer_input = tokens * llm_width * 2
    if not config.runtime.gradient_checkpointing:
        activations = llm_layers * 34 * tokens * llm_width
    elif config.runtime.checkpointing_policy == "selective":
        activations = llm_layers * 27 * tokens * llm_width
    else:
        activations = llm_layers * per_layer_input + 34 * tokens * llm_width
    logits = tokens * vocab * 4 * 2  # fp32 logits and their gradient
    return MemoryEstimate(frozen, trainable, activations, logits)


class InsufficientMemoryError(RuntimeError):
    pass


def check_memory_fits(config: MCATConfig, world_size: int, zero_stage: int, offload: bool, device_bytes: int,
                      device_name: str) -> MemoryEstimate:
    """The estimate for ``config`` on this device, or an error that says what would fit."""
    meta = build_meta_model(config)
    llm_config = meta.llm.get_base_model().config
    estimate = estimate_gpu_memory(
        count_parameters(meta), config, llm_config.hidden_size, llm_config.num_hidden_layers,
        meta.llm.get_input_embeddings().weight.shape[0], world_size, zero_stage, offload,
    )
    if estimate.total > 0.95 * device_bytes:
        raise InsufficientMemoryError(
            f"{config.preset} needs about {estimate.describe()} per GPU with engine {config.runtime.engine}, "
            f"{world_size} GPU(s) and micro-batch {config.stage.micro_batch_size}, but {device_name} has "
            f"{device_bytes / 2**30:.1f} GiB. Try --set runtime.engine=zero3 (shards the frozen weights), "
            f"runtime.engine=zero2_offload, a smaller stage.micro_batch_size with more stage.grad_accum_steps, "
            f"or runtime.gradient_checkpointing=true with runtime.checkpointing_policy=full"
        )
    return estimate

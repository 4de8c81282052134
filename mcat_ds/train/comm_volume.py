"""Bytes DeepSpeed moves between ranks per optimizer step, measured with its own comms logger.

Run under the launcher (``deepspeed --num_gpus 2 launch/measure_comm.py``): the tiny preset (or a
preset's first layers) with random weights, the real engine settings of ``ds_configs/``, a few steps;
rank 0 prints one JSON object: the trainable parameter count, and per collective the bytes each rank
sends into it per step, and their ratio to the trainable parameters' size in the gradient dtype.
The scaling model in the README is built on these figures.
"""

from __future__ import annotations

import json
from collections import defaultdict

import torch

from mcat_ds.batching import collate_examples
from mcat_ds.model.random import random_log_mel, random_mcat_model
from mcat_ds.presets import get_preset
from mcat_ds.train.distributed import remove_shared_memory_buffers, setup_distributed
from mcat_ds.train.engine import deepspeed_config, make_optimizer
from mcat_ds.bench.train import TrainBenchConfig, workload
from mcat_ds.optional import require

deepspeed = require("deepspeed")


def measure(preset: str = "tiny", engine: str = "zero2_bf16", steps: int = 3, llm_layers: int | None = None) -> dict:
    placement = setup_distributed()
    config = get_preset(preset)
    config.runtime.engine = engine
    config.stage.micro_batch_size = 4
    model = random_mcat_model(config, str(placement.device), torch.float32 if not placement.on_gpu else torch.bfloat16,
                              seed=0, llm_layers=llm_layers, encoder_layers=2 if llm_layers else None)
    model.encoder.requires_grad_(False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ds_config = deepspeed_config(config, placement.on_gpu)
    ds_config["comms_logger"] = {"enabled": True, "verbose": False, "prof_all": True, "debug": False}
    optimizer = make_optimizer(model, config, placement.on_gpu, offloaded=False)
    engine_, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    llm = model.llm.get_base_model().config
    batches = workload(TrainBenchConfig(batch=4, steps=steps + 1, warmup_steps=0), model.encoder.window_frames,
                       llm.vocab_size, llm.bos_token_id or 2, model.eos_token_id)
    logger = deepspeed.comm.comms_logger

    def run(lengths, examples):
        batch = collate_examples(examples, model.num_speech_tokens, model.pad_token_id, "packed")
        out = engine_(random_log_mel(model, lengths, list(range(len(lengths))), placement.device,
                                     next(model.adapter.parameters()).dtype),
                      lengths.to(placement.device), batch.to(placement.device))
        engine_.backward(out.loss)
        engine_.step()

    run(*batches[0])  # the first step also sets things up (buffers, optimizer states)
    logger.comms_dict.clear()
    for lengths, examples in batches[1:]:
        run(lengths, examples)
    per_op: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for op, sizes in logger.comms_dict.items():
        for size, record in sizes.items():
            per_op[op] += size * record[0] / steps
            calls[op] += record[0]
    gradient_bytes = 2 if placement.on_gpu else 4
    result = {
        "preset": preset, "engine": engine, "world_size": placement.world_size, "steps": steps,
        "trainable_parameters": trainable, "gradient_dtype_bytes": gradient_bytes,
        "bytes_per_step": dict(per_op), "calls_per_step": {op: n / steps for op, n in calls.items()},
        "ratio_to_trainable_gradients": {op: b / (trainable * gradient_bytes) for op, b in per_op.items()},
    }
    remove_shared_memory_buffers(placement)
    return result if placement.rank == 0 else {}


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--engine", default="zero2_bf16")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--llm-layers", type=int)
    args, _ = parser.parse_known_args()  # the launcher adds --local_rank
    result = measure(args.preset, args.engine, args.steps, args.llm_layers)
    if result:
        print("COMM_VOLUME " + json.dumps(result))


if __name__ == "__main__":
    main()

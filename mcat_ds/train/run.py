"""A training run: one stage or the whole curriculum in one run directory.

``launch/train.py`` (and ``python -m mcat_ds.train.run``) is this module's ``main``:

    deepspeed launch/train.py --stage srt --run-dir runs/x [--preset P] [--data DIR] [--set k=v ...]
                              [--init-from CKPT] [--max-steps N] [--save-every N] [--config FILE]

``--stage all`` runs the preset's curriculum in order and skips stages already complete, so running
the same command again after a crash continues where the run stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

from mcat_ds.checkpoint import adopt_trained_settings, read_checkpoint_config
from mcat_ds.config import ConfigError, MCATConfig
from mcat_ds.curriculum import stage_names
from mcat_ds.data.demo import build_demo_data
from mcat_ds.data.shards import ShardReader, load_index
from mcat_ds.presets import get_preset, resolve_config
from mcat_ds.rendezvous import RendezvousError
from mcat_ds.tiny import write_tiny_llm, write_tiny_whisper
from mcat_ds.train.distributed import remove_shared_memory_buffers, setup_distributed
from mcat_ds.train.preemption import PREEMPTED_EXIT_CODE, install_handlers
from mcat_ds.train.stage import Placement, run_stage

DEMO_DATA_DIR = "demo-data"
TINY_BASE_DIR = "base"


def _leader_first(placement: Placement, work) -> None:
    """Run ``work`` on rank 0 while the others wait, so that files are written once."""
    if placement.leader:
        work()
    if dist.is_initialized():
        dist.barrier()


def training_texts(data_dir: Path, limit: int = 100_000) -> list[str]:
    """Transcripts and translations of a prepared dataset (what a tiny tokenizer is trained on)."""
    reader = ShardReader(data_dir)
    texts = []
    for entry in load_index(data_dir)[:limit]:
        meta = json.loads(reader.read(entry.shard, entry.meta))
        texts.append(meta["transcript"])
        texts.extend(meta["translations"].values())
    return texts


def complete_run_config(config: MCATConfig, run_dir: Path, placement: Placement) -> MCATConfig:
    """Fill what the run provides itself: the demo corpus when no data is given, and, for the tiny
    preset only, random base checkpoints written into the run directory (and loaded like real ones)."""
    if config.data.path is None:
        demo = run_dir / DEMO_DATA_DIR
        _leader_first(placement, lambda: build_demo_data(demo))
        config.data.path = str(demo / "shards" / "train")
        config.data.validation = config.data.validation or str(demo / "shards" / "dev")
    if config.preset == "tiny" and (config.model.encoder.checkpoint is None or config.model.llm.checkpoint is None):
        base = run_dir / TINY_BASE_DIR

        def write_base() -> None:
            if not (base / "llm" / "config.json").is_file():
                write_tiny_whisper(base / "whisper", config.model.encoder.architecture, seed=config.runtime.seed)
                write_tiny_llm(base / "llm", training_texts(Path(config.data.path)), config.model.llm.architecture,
                               seed=config.runtime.seed)

        _leader_first(placement, write_base)
        config.model.encoder.checkpoint = config.model.encoder.checkpoint or str(base / "whisper")
        config.model.llm.checkpoint = config.model.llm.checkpoint or str(base / "llm")
    return config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train MCAT curriculum stages with DeepSpeed.")
    parser.add_argument("--stage", required=True, help="a curriculum stage (e.g. asr-l2, srt) or 'all'")
    parser.add_argument("--run-dir", required=True, help="directory holding one run's stages")
    parser.add_argument("--preset", default="small-9b", help="tiny, small-9b or large-27b (default: %(default)s)")
    parser.add_argument("--data", help="prepared training shards (default: the built-in demo corpus)")
    parser.add_argument("--config", dest="config_file", help="JSON or TOML file of config overrides")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--init-from", help="MCAT checkpoint to start the (first) stage from instead of its predecessor")
    parser.add_argument("--max-steps", type=int, help="override the stage's length in optimizer steps")
    parser.add_argument("--save-every", type=int, help="override the checkpoint interval in optimizer steps")
    # the DeepSpeed launcher appends it; LOCAL_RANK in the environment says the same
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return parser


def stage_config(args: argparse.Namespace, stage: str) -> MCATConfig:
    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.path={args.data}")
    if args.max_steps is not None:
        overrides.append(f"stage.max_steps={args.max_steps}")
    if args.save_every is not None:
        overrides.append(f"stage.save_every={args.save_every}")
    return resolve_config(args.preset, args.config_file, overrides, stage=stage)


def run(args: argparse.Namespace, placement: Placement) -> int:
    run_dir = Path(args.run_dir)
    stages = stage_names(get_preset(args.preset)) if args.stage == "all" else (args.stage,)
    # A run from another checkpoint (e.g. one imported from the release) trains the model it holds:
    # every stage of the run takes its trained settings, since each starts from the one before.
    start_config = read_checkpoint_config(args.init_from) if args.init_from else None
    for index, stage in enumerate(stages):
        config = complete_run_config(stage_config(args, stage), run_dir, placement)
        if start_config is not None:
            adopted = adopt_trained_settings(config, start_config)
            if adopted and index == 0 and placement.leader:
                print(f"--init-from {args.init_from}: the model's trained settings come from the checkpoint: "
                      + ", ".join(adopted), file=sys.stderr)
        init_from = Path(args.init_from) if args.init_from and index == 0 else None
        code = run_stage(config, run_dir, placement, init_from=init_from)
        if code != 0:
            return code
    return 0


PREEMPTION_MARKER_ENV = "MCAT_PREEMPTION_MARKER"
"""A file to create once a preempted stage's checkpoint is complete (the SLURM script sets it)."""


def _leave_preemption_marker(placement: Placement) -> None:
    marker = os.environ.get(PREEMPTION_MARKER_ENV)
    _leader_first(placement, lambda: Path(marker).write_text("checkpoint complete\n") if marker else None)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    install_handlers()
    try:
        placement = setup_distributed()
    except RendezvousError as error:
        print(f"rank {os.environ.get('RANK', '?')}: error: {error}", file=sys.stderr)
        return 2
    try:
        code = run(args, placement)
        if code == PREEMPTED_EXIT_CODE:
            _leave_preemption_marker(placement)
        return code
    except (ConfigError, ValueError, RuntimeError, OSError) as error:
        print(f"rank {placement.rank}: error: {error}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        remove_shared_memory_buffers(placement)


if __name__ == "__main__":
    sys.exit(main())

"""What a stage reports (rank 0): a progress bar, ``metrics.jsonl`` and TensorBoard event files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

METRICS_FILE = "metrics.jsonl"


def truncate_metrics(path: Path, after_step: int) -> None:
    """Drop lines logged after the checkpoint a run resumes from: the steps will be redone, and each
    step must appear once."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= after_step]
    path.write_text("".join(line + "\n" for line in kept))


class StageMonitor:
    def __init__(self, stage_dir: Path, stage: str, total_steps: int, start_step: int):
        stage_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = stage_dir / METRICS_FILE
        truncate_metrics(self.metrics_path, start_step)
        self.metrics = open(self.metrics_path, "a", encoding="utf-8")
        self.tensorboard = SummaryWriter(str(stage_dir / "tensorboard"), purge_step=start_step + 1)
        interactive = sys.stderr.isatty()
        self.progress = tqdm(total=total_steps, initial=start_step, desc=stage, dynamic_ncols=True,
                             mininterval=0.5 if interactive else 30.0, file=sys.stderr)

    def log(self, record: dict) -> None:
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.tensorboard.add_scalar(key, value, step)
        shown = {key: record[key] for key in ("loss", "val_loss", "lr", "samples_per_s", "tokens_per_s", "mfu")
                 if key in record}
        self.progress.set_postfix({k: f"{v:.3g}" for k, v in shown.items()}, refresh=False)
        self.progress.update(1)

    def message(self, text: str) -> None:
        self.progress.write(text, file=sys.stderr)

    def close(self) -> None:
        self.progress.close()
        self.tensorboard.close()
        self.metrics.close()

"""What a stage reports (rank 0): a progress bar, ``metrics.jsonl`` and TensorBoard event files."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from mcat_ds.files import naming, write_atomically

METRICS_FILE = "metrics.jsonl"


def _to_stderr(text: str) -> None:
    print(text, file=sys.stderr)


def truncate_metrics(path: Path, after_step: int, warn: Callable[[str], None] = _to_stderr) -> None:
    """Drop lines logged after the checkpoint a run resumes from: the steps will be redone, and each
    step must appear once. A line a kill cut (or any line that is not a metrics record) is dropped
    with a warning naming file and line; the file is replaced whole, so a kill here loses nothing."""
    if not path.is_file():
        return
    kept = []
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            step = json.loads(raw.decode("utf-8"))["step"]
            if not isinstance(step, int):
                raise TypeError(f"step is {step!r}")
        except (UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
            warn(f"{path}:{number}: dropped a line that is not a metrics record ({error.__class__.__name__}), "
                 "e.g. one a kill cut short")
            continue
        if step <= after_step:
            kept.append(raw + b"\n")
    write_atomically(path, b"".join(kept))


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
        try:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()
        except OSError as error:  # a full disk: say which file
            raise naming(error, self.metrics_path) from None
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

"""What ZeRO-2 really moves per step, measured with DeepSpeed's comms logger on 2 CPU ranks."""

import json
import subprocess
from pathlib import Path

import pytest

from conftest import deepspeed_command


@pytest.mark.slow
def test_zero2_moves_the_trainable_gradients_once_and_gathers_the_updated_half():
    command = deepspeed_command("--module", "mcat_ds.train.comm_volume", "--steps", "2")
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("COMM_VOLUME "))
    measured = json.loads(line[len("COMM_VOLUME "):])
    ratios = measured["ratio_to_trainable_gradients"]
    # the gradients of the trainable parameters only (the frozen 99% never travel), all-reduced once
    # per step (plus the 4-byte global norm), then each rank gathers the parameters the other updated
    assert ratios["all_reduce"] == pytest.approx(1.0, abs=1e-3)
    assert ratios["all_gather_into_tensor"] == pytest.approx(1 / measured["world_size"], abs=1e-3)
    # and the ranks removed DeepSpeed's per-run shared-memory buffers (66 MB each) on exit
    port = command[command.index("--master_port") + 1]
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))

"""Parameter counts of the real presets on the meta device, and the `mcat describe` interface."""

import json
import subprocess
import sys

import pytest

from mcat_ds.build import build_meta_model, count_parameters
from mcat_ds.presets import get_preset

LANGUAGES = 70


def qformer_parameters(width, layers, cross_every, intermediate, encoder_width, queries):
    linear = lambda fan_in, fan_out: fan_in * fan_out + fan_out  # noqa: E731
    norm = 2 * width
    self_attention = 4 * linear(width, width) + norm
    cross_attention = 2 * linear(width, width) + 2 * linear(encoder_width, width) + norm
    ffn = linear(width, intermediate) + linear(intermediate, width) + norm
    cross_layers = len(range(0, layers, cross_every))
    return queries * width + norm + layers * (self_attention + ffn) + cross_layers * cross_attention


@pytest.mark.parametrize(
    "preset, llm_width, layers, q_out, v_out, llm_millions",
    [
        ("small-9b", 3584, 42, 16 * 256, 8 * 256, 9241),
        ("large-27b", 5376, 62, 32 * 128, 16 * 128, 27009),
    ],
)
def test_real_preset_counts(preset, llm_width, layers, q_out, v_out, llm_millions):
    counts = count_parameters(build_meta_model(get_preset(preset)))
    qformer = qformer_parameters(768, 8, 2, 3072, 1280, 150)
    mlp = (768 * 2560 + 2560) + (2560 * llm_width + llm_width) + 2 * llm_width
    assert counts.adapter == qformer + mlp
    rank = 16
    lora = layers * rank * ((llm_width + q_out) + (llm_width + v_out))
    assert counts.lora == lora + LANGUAGES * llm_width  # LoRA + the tag rows
    assert counts.trainable == counts.adapter + counts.lora
    assert 85e6 < counts.trainable < 110e6  # the paper's "~100M trainable parameters"
    assert counts.encoder == 636_968_960  # whisper-large-v3's encoder
    assert counts.llm // 1_000_000 == llm_millions  # base weights, tag rows included


def run_mcat(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mcat_ds.cli", *args], capture_output=True, text=True, timeout=300)


def test_describe_json_is_one_object_with_integer_counts():
    result = run_mcat("describe", "--preset", "small-9b", "--json")
    assert result.returncode == 0, result.stderr
    described = json.loads(result.stdout)
    assert described["preset"] == "small-9b"
    params = described["params"]
    assert set(params) >= {"total", "trainable", "encoder", "adapter", "llm", "lora"}
    assert all(isinstance(value, int) for value in params.values())
    assert params["total"] == params["encoder"] + params["adapter"] + params["llm"] + params["lora"]
    assert described["config"]["model"]["adapter"]["num_queries"] == 150


def test_describe_text_and_overrides():
    result = run_mcat("describe", "--preset", "tiny", "--set", "model.lora.rank=4")
    assert result.returncode == 0, result.stderr
    assert '"rank": 4' in result.stdout and "trainable" in result.stdout


def test_describe_errors_exit_2_with_a_message():
    result = run_mcat("describe", "--preset", "medium")
    assert result.returncode == 2 and "unknown preset 'medium'" in result.stderr
    result = run_mcat("describe", "--set", "model.lora.rnak=4")
    assert result.returncode == 2 and "did you mean model.lora.rank" in result.stderr

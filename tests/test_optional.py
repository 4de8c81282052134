"""Optional packages are imported where they are used: the core imports with only what the stock GPU
image has, and a command that needs a missing package says so in one line."""

import os
import subprocess
import sys

import pytest

from conftest import REPO
from mcat_ds.optional import OPTIONAL, MissingDependency, require

BLOCKER = REPO / "tests" / "blocked_imports"
IMAGE_LACKS = ("soundfile", "_cffi_backend", "cffi", "soxr", "webdataset", "braceexpand", "deepspeed", "hjson",
               "pydantic", "pydantic_core", "liger_kernel", "comet", "vllm", "jiwer", "flash_attn", "silero_vad",
               "lingua")
"""What the GPU image has not (its package list), flash-attn and jiwer included."""

CORE_MODULES = (
    "mcat_ds.model.mcat", "mcat_ds.model.adapter", "mcat_ds.model.encoder", "mcat_ds.model.attention",
    "mcat_ds.model.loss", "mcat_ds.model.checkpointing", "mcat_ds.model.random", "mcat_ds.model.blip2_reference",
    "mcat_kernels.cross_attention", "mcat_kernels.layernorm_pool",
    "mcat_ds.config", "mcat_ds.presets", "mcat_ds.curriculum", "mcat_ds.build", "mcat_ds.checkpoint", "mcat_ds.tiny",
    "mcat_ds.train.costs", "mcat_ds.train.engine",
    "mcat_ds.bench.harness", "mcat_ds.bench.kernels", "mcat_ds.bench.train", "mcat_ds.bench.inference",
    "mcat_ds.bench.data", "mcat_ds.bench.acceptance",
    "mcat_ds.data.audio", "mcat_ds.data.prepare", "mcat_ds.data.loader", "mcat_ds.data.shards",
    "mcat_ds.infer.translate", "mcat_ds.infer.export", "mcat_ds.eval.evaluate", "mcat_ds.cli",
    "mcat_ds.infer.translate_command", "mcat_ds.infer.translate_audio", "mcat_ds.infer.segment",
    "mcat_ds.infer.subtitles", "mcat_ds.eval.checks", "mcat_ds.data.stream",
)


def run_without(packages, *command, **kwargs):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BLOCKER), os.environ.get("PYTHONPATH", "")]),
           "MCAT_BLOCKED_IMPORTS": ",".join(packages)}
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=300, **kwargs)


def test_the_core_imports_with_only_the_gpu_images_packages():
    code = ("import importlib, sys\n"
            f"for name in {CORE_MODULES!r}:\n"
            "    importlib.import_module(name)\n"
            f"print(sorted(name for name in {IMAGE_LACKS!r} if name in sys.modules))\n")
    result = run_without(IMAGE_LACKS, sys.executable, "-c", code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"  # none of them was imported, not even half-way


def test_the_blocker_really_hides_a_package():
    result = run_without(["soundfile"], sys.executable, "-c", "import importlib.util, soundfile")
    assert result.returncode != 0 and "No module named 'soundfile'" in result.stderr


@pytest.mark.parametrize("command, package", [
    ([sys.executable, "launch/train.py", "--stage", "asr-l2", "--run-dir", "unused"], "deepspeed"),
    ([sys.executable, "launch/bench_data.py", "--smoke", "--csv", "unused.csv"], "soundfile"),
    ([sys.executable, "-m", "mcat_ds.cli", "prepare", "--manifest", "setup.py", "--audio-root", ".",
      "--out", "unused"], "soundfile"),
])
def test_a_missing_package_is_one_line_naming_it_and_how_to_install_it(command, package, tmp_path):
    result = run_without(IMAGE_LACKS, *command[:1], *[str(tmp_path / arg) if arg.startswith("unused") else arg
                                                      for arg in command[1:]])
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"needs the Python package {package}" in lines[0] and f"pip install {package}" in lines[0]
    assert "gpu_acceptance.sh --pack" in lines[0]
    assert not list(tmp_path.iterdir())  # it stopped before writing anything


def test_require_names_the_extra_that_installs_a_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "comet", None)  # None in sys.modules: "import comet" raises ImportError
    with pytest.raises(MissingDependency, match=r"COMET scores needs the Python package unbabel-comet.*"
                                                r"pip install -e '\.\[comet\]'"):
        require("comet")
    assert require("numpy").__name__ == "numpy"  # an installed one is just the module


def test_every_optional_package_is_a_dependency_in_setup_py():
    setup = (REPO / "setup.py").read_text()
    for spec in OPTIONAL.values():
        assert f'"{spec.pip_name}' in setup, spec.pip_name

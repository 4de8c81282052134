"""vLLM's plugin hook for MCAT: registers the native audio-in model (``mcat_ds.infer.vllm_model``).

vLLM calls :func:`register` through the ``vllm.general_plugins`` entry point in every process it
starts (API server, engine core, workers), so that an ``mcat export`` folder, whose ``config.json``
names ``MCATForConditionalGeneration``, loads with ``vllm.LLM(model=EXPORT)`` or ``vllm serve
EXPORT``. The class is registered by name: the model module (and the speech side's imports) loads
only in the processes that build the model.
"""

from __future__ import annotations

from mcat_ds.infer.export import NATIVE_ARCHITECTURE

MODEL_CLASS = f"mcat_ds.infer.vllm_model:{NATIVE_ARCHITECTURE}"


def register() -> None:
    """Idempotent, as vLLM loads plugins once per process, in many processes."""
    from vllm import ModelRegistry

    if NATIVE_ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(NATIVE_ARCHITECTURE, MODEL_CLASS)

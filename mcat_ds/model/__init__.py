"""The MCAT model as plain modules: no DeepSpeed, no ranks, no files."""

from mcat_ds.model.adapter import SpeechAdapter
from mcat_ds.model.encoder import SpeechEncoder
from mcat_ds.model.mcat import GenerationOptions, MCATModel, MCATOutput

__all__ = ["GenerationOptions", "MCATModel", "MCATOutput", "SpeechAdapter", "SpeechEncoder"]

"""Shared fixtures: tiny random checkpoints written with save_pretrained, loaded like real ones."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch as _torch

# Without a GPU the Triton kernels run in Triton's interpreter; it must be chosen before they are
# imported. The model's "auto" kernels still take the PyTorch path on CPU tensors.
if not _torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from mcat_ds.config import apply_overrides
from mcat_ds.presets import get_preset
from mcat_ds.tiny import write_tiny_llm, write_tiny_multimodal_gemma3, write_tiny_whisper

REPO = Path(__file__).resolve().parent.parent
ANCHORS = Path(os.environ.get("MCAT_ANCHORS", REPO.parent / "shared" / "anchors"))

SENTENCES = [
    "Will it rain tomorrow?",
    "Regnet es morgen?",
    "Il va pleuvoir demain ?",
    "¿Lloverá mañana?",
    "Завтра будет дождь?",
    "明天会下雨吗？",
    "明日は雨が降りますか？",
    "هل ستمطر غدا؟",
    "क्या कल बारिश होगी?",
]


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {
        "whisper": write_tiny_whisper(root / "whisper"),
        "gemma2": write_tiny_llm(root / "gemma2", SENTENCES * 4, architecture="tiny-gemma2"),
        "gemma3": write_tiny_llm(root / "gemma3", SENTENCES * 4, architecture="tiny-gemma3"),
        "gemma3_multimodal": write_tiny_multimodal_gemma3(root / "gemma3_mm", SENTENCES * 4),
    }


@pytest.fixture
def tiny_config(tiny_dirs):
    """The tiny preset pointed at the tiny checkpoints, with ``key=value`` overrides."""

    def make(llm: str = "gemma2", *overrides: str):
        config = get_preset("tiny")
        config.model.encoder.checkpoint = str(tiny_dirs["whisper"])
        config.model.llm.checkpoint = str(tiny_dirs[llm])
        return apply_overrides(config, list(overrides))

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_dirs, tmp_path_factory):
    """An untrained tiny checkpoint (tag rows trainable), saved and loaded the way users' are."""
    from mcat_ds.build import build_model
    from mcat_ds.checkpoint import save_checkpoint

    config = get_preset("tiny")
    config.model.encoder.checkpoint = str(tiny_dirs["whisper"])
    config.model.llm.checkpoint = str(tiny_dirs["gemma2"])
    config = apply_overrides(config, ["model.llm.train_embeddings=tags"])
    torch.manual_seed(0)
    model, tokenizer = build_model(config)
    directory = tmp_path_factory.mktemp("checkpoint") / "ckpt"
    save_checkpoint(model, tokenizer, config, directory)
    return directory


def write_trained_checkpoint(config, directory: Path) -> Path:
    """A checkpoint of ``config`` whose trainable LLM weights (LoRA, tag rows) are non-zero, so that
    merging or exporting them changes what the model computes."""
    from mcat_ds.build import build_model
    from mcat_ds.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model, tokenizer = build_model(config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.llm.parameters():
            if parameter.requires_grad:
                parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))
    save_checkpoint(model, tokenizer, config, directory)
    return directory


def random_features(batch: int, lengths: list[int], seed: int = 0, mel_bins: int = 80, window: int = 500):
    """Log-mel-like inputs: values in Whisper's range, padding frames at the padded value."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.full((batch, mel_bins, window), -0.6)
    for row, length in enumerate(lengths):
        features[row, :, :length] = torch.rand(mel_bins, length, generator=generator) * 2 - 0.6
    return features, torch.tensor(lengths)


SMALL_LANGUAGES = ("eng", "deu", "fra", "cmn")


def write_small_fleurs(root: Path, sentences: int = 6, split: str = "train") -> Path:
    """A FLEURS-style folder of noise 'utterances' (0.5-2.5 s, 22.05 kHz) in four languages."""
    import numpy as np
    import soundfile

    from mcat_ds.languages import get_language

    rng = np.random.default_rng(0)
    for code in SMALL_LANGUAGES:
        folder = root / get_language(code).fleurs
        (folder / "audio" / split).mkdir(parents=True)
        rows = []
        for sentence in range(sentences):
            name = f"{sentence}.wav"
            seconds = 0.5 + 2.0 * rng.random()
            soundfile.write(folder / "audio" / split / name, (0.1 * rng.standard_normal(int(seconds * 22050))).astype("float32"), 22050)
            text = f"{code} sentence {sentence}"
            rows.append("\t".join([str(sentence), name, text, text, "x", "0", "MALE"]))
        (folder / f"{split}.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory) -> Path:
    """Prepared shards of the small FLEURS-style corpus: 24 utterances, 4 languages, 3 shards."""
    from mcat_ds.data.prepare import ShardLimits, prepare_shards
    from mcat_ds.data.sources import read_fleurs

    root = tmp_path_factory.mktemp("small_fleurs")
    fleurs = write_small_fleurs(root / "fleurs")
    prepare_shards(read_fleurs(fleurs, "train"), root / "shards", max_seconds=5.0,
                   limits=ShardLimits(max_samples=10), workers=1)
    return root / "shards"


needs_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None,
    reason="espeak-ng (Debian package) is not installed; .ci/run installs it",
)


TALK_PAUSES = (1.5, 0.3, 0.8, 1.5)
"""Between the five English sentences of ``recordings``: 0.3 s joins two into one segment, the others split."""


@pytest.fixture(scope="session")
def recordings(tmp_path_factory):
    """Five English sentences with known pauses between them (TALK_TALK_PAUSES), as a 16 kHz WAV in one folder;
    in another, the same talk at 22.05 kHz, backwards in stereo FLAC at 44.1 kHz, a silent file and
    a corrupt one."""
    import numpy as np
    import soundfile

    from mcat_ds.data.audio import SAMPLE_RATE
    from mcat_ds.data.demo import VOICES, demo_sentences, speak

    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    soxr = pytest.importorskip("soxr")
    root = tmp_path_factory.mktemp("audio")
    texts = [sentence.texts["eng"] for sentence in demo_sentences()[:len(TALK_PAUSES) + 1]]
    jobs = [(VOICES["eng"], text, root / f"s{index}.wav") for index, text in enumerate(texts)]
    speak(jobs, threads=2)
    pieces, rate = [], None
    for index, (_, _, path) in enumerate(jobs):
        samples, rate = soundfile.read(path, dtype="float32")
        loud = np.flatnonzero(np.abs(samples) > 1e-3)
        pieces += [np.zeros(round((TALK_PAUSES[index - 1] if index else 1.0) * rate), np.float32),
                   samples[loud[0]:loud[-1] + 1]]
        path.unlink()
    talk = np.concatenate(pieces + [np.zeros(rate, np.float32)])
    single = root / "single"
    folder = root / "folder"
    single.mkdir()
    folder.mkdir()
    soundfile.write(single / "talk.wav", soxr.resample(talk, rate, SAMPLE_RATE, quality="VHQ"), SAMPLE_RATE,
                    subtype="PCM_16")
    stereo = soxr.resample(talk[::-1].copy(), rate, 44100, quality="VHQ")  # another order of pauses
    soundfile.write(folder / "backwards.flac", np.stack([stereo, 0.5 * stereo], axis=1), 44100)
    soundfile.write(folder / "talk22k.wav", soxr.resample(talk, rate, 22050, quality="VHQ"), 22050)
    hiss = np.random.default_rng(0).standard_normal(4 * SAMPLE_RATE).astype(np.float32) * 1e-4
    soundfile.write(folder / "silent.wav", hiss, SAMPLE_RATE)
    (folder / "corrupt.wav").write_bytes(b"RIFF....WAVEfmt garbage")
    return single, folder


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> Path:
    from mcat_ds.data.demo import build_demo_data

    return build_demo_data(tmp_path_factory.mktemp("demo"))


def deepspeed_command(*args: str, ranks: int = 2) -> list[str]:
    """`deepspeed --num_gpus N ...` on a free port (CPU accelerator without a GPU)."""
    import socket
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launcher = Path(sys.executable).with_name("deepspeed")
    return [str(launcher), "--num_gpus", str(ranks), "--master_port", str(port), *args]


def deepspeed_training_command(*args: str, ranks: int = 2) -> list[str]:
    """`deepspeed --num_gpus N launch/train.py ...`."""
    return deepspeed_command(str(REPO / "launch" / "train.py"), *args, ranks=ranks)


def read_metrics(path: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

"""Recordings of any length, read block by block as mono float32 16 kHz samples.

:func:`~mcat_ds.data.audio.decode_audio` holds a whole file in memory, which suits utterances of a
few seconds. A lecture of two hours is 460 MB of float32 at 16 kHz, more before resampling; here
memory follows the block, not the file: libsndfile reads ``block_seconds`` of frames, they are
mixed down, and a streaming resampler (``soxr.ResampleStream``, same quality as ``decode_audio``)
carries its filter state from one block to the next. The concatenated blocks equal
``decode_audio`` of the same file (bit for bit with soxr 1.1 on the rates tested).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mcat_ds.data.audio import HIGHEST_RATE, LOWEST_RATE, SAMPLE_RATE, UNKNOWN_LENGTH, AudioError, open_front_to_back
from mcat_ds.optional import require

BLOCK_SECONDS = 30.0
RESAMPLE_QUALITY = "VHQ"
"""decode_audio's quality: the two readers must give the same samples."""


@dataclass(frozen=True)
class AudioInfo:
    """What a file's header says, before any sample is decoded."""

    seconds: float
    sample_rate: int
    channels: int
    frames: int
    """Frames at the file's own rate."""
    format: str
    """libsndfile's container name: WAV, FLAC, OGG, MP3, ..."""


def audio_info(path: str | Path) -> AudioInfo:
    """The header of an audio file, or AudioError saying why it cannot be read as a recording:
    missing, not audio (or a format libsndfile does not read), an absurd sample rate, a stream
    without a stated length, or no samples at all."""
    with _open(path) as sound:
        return _info(sound)


def read_blocks(path: str | Path, block_seconds: float = BLOCK_SECONDS) -> Iterator[np.ndarray]:
    """Mono float32 16 kHz samples of ``path``, about ``block_seconds`` per block (non-empty; the
    resampler's delay makes the first block a little shorter and the last one longer).

    Memory stays at a block or two whatever the file's length. The header is checked before the
    first block is yielded (AudioError as :func:`audio_info`); a read error inside the file is an
    AudioError too, raised when the generator reaches it.
    """
    if not block_seconds > 0:
        raise ValueError(f"block_seconds must be positive, got {block_seconds}")
    soundfile = require("soundfile")
    with _open(path) as sound:
        info = _info(sound)
        frames_per_block = max(1, round(block_seconds * info.sample_rate))
        resampler = None
        if info.sample_rate != SAMPLE_RATE:
            resampler = require("soxr").ResampleStream(
                info.sample_rate, SAMPLE_RATE, 1, dtype="float32", quality=RESAMPLE_QUALITY
            )
        produced = 0
        while True:
            try:
                block = sound.read(frames_per_block, dtype="float32", always_2d=True)
            except (soundfile.LibsndfileError, RuntimeError) as error:
                raise AudioError(f"unreadable audio: {path}: {error}") from None
            last = len(block) < frames_per_block
            mono = block.mean(axis=1) if block.shape[1] > 1 else block[:, 0]
            if resampler is not None:
                mono = resampler.resample_chunk(mono, last=last)
            if mono.size:
                produced += mono.size
                yield np.ascontiguousarray(mono, dtype=np.float32)
            if last:
                break
    if not produced:  # the header promised frames the file does not hold
        raise AudioError(f"empty audio: no samples could be read from {path}")


def _open(path: str | Path):
    soundfile = require("soundfile")
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"no such audio file: {path}")
    try:
        return open_front_to_back(path)
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as error:
        raise AudioError(f"not audio, or a format libsndfile cannot read: {path}: {error}") from None


def _info(sound) -> AudioInfo:
    rate = sound.samplerate
    if not LOWEST_RATE <= rate <= HIGHEST_RATE:
        raise AudioError(
            f"unsupported sample rate in {sound.name}: {rate} Hz (readable: {LOWEST_RATE}-{HIGHEST_RATE} Hz)"
        )
    if sound.frames == UNKNOWN_LENGTH:
        raise AudioError(f"unreadable audio: {sound.name} is a stream that does not state its length (re-encode it)")
    if sound.frames == 0:
        raise AudioError(f"empty audio: {sound.name} has 0 samples")
    return AudioInfo(sound.frames / rate, rate, sound.channels, sound.frames, sound.format)

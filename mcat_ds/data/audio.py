"""Audio in: decoding, down-mixing, resampling to 16 kHz, and Whisper's log-mel features in torch."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers.audio_utils import mel_filter_bank

from mcat_ds.optional import require

SAMPLE_RATE = 16_000
N_FFT = 400
HOP_LENGTH = 160
SILENCE_PEAK = 1e-4
"""Audio whose peak amplitude stays below this (about -80 dBFS) is treated as silent."""


class AudioError(ValueError):
    """The reason an audio file cannot be used, phrased for a report."""


def require_audio_packages() -> None:
    """Fails at once, in this process, where decoding would fail later in a worker (MissingDependency)."""
    require("soundfile")
    require("soxr")


LOWEST_RATE = 1_000
HIGHEST_RATE = 384_000
"""Sample rates outside these are damaged headers, not recordings: 1 Hz would resample 16 000-fold."""
UNKNOWN_LENGTH = 2**63 - 1
"""libsndfile's frame count for a stream that does not state its length (a FLAC piped from an encoder)."""
BLOCK_FRAMES = 1 << 20


def decode_audio(source: str | Path | bytes, max_seconds: float | None = None) -> np.ndarray:
    """Mono float32 samples at 16 kHz from wav/flac/ogg (anything libsndfile reads).

    The header is checked before any sample is decoded: an absurd sample rate, or (with
    ``max_seconds``) a length over that, raise AudioError at once, so a 3-hour file or a header
    claiming 1 Hz costs nothing instead of exhausting memory.
    """
    soundfile = require("soundfile")
    try:
        with open_front_to_back(source) as sound:
            rate = sound.samplerate
            if not LOWEST_RATE <= rate <= HIGHEST_RATE:
                raise AudioError(f"unsupported sample rate: {rate} Hz (readable: {LOWEST_RATE}-{HIGHEST_RATE} Hz)")
            if sound.frames == UNKNOWN_LENGTH:  # libsndfile cannot read past the first block of these
                raise AudioError("unreadable audio: a stream that does not state its length (re-encode it as a file)")
            _check_length(sound.frames / rate, max_seconds)
            data = _read_frames(sound)
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as error:
        raise AudioError(f"unreadable audio: {error}") from None
    if data.shape[0] == 0:
        raise AudioError("empty audio: 0 samples")
    mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if rate != SAMPLE_RATE:
        mono = require("soxr").resample(mono, rate, SAMPLE_RATE, quality="VHQ").astype(np.float32)
        _check_length(mono.size / SAMPLE_RATE, max_seconds)  # resampling may round up by a sample
    return np.ascontiguousarray(mono)


def open_front_to_back(source: str | Path | bytes):
    """A ``soundfile.SoundFile`` to be read from start to end, in blocks.

    python-soundfile keeps its position by seeking to it after every read of a seekable file. On MP3
    that seek goes through mpg123_seek, which resumes decoding about 10k samples off, so every block
    after the first would start with garbage (measured with libsndfile 1.2.2; one whole-file read
    never seeks and is right). Read front to back, the file never needs to seek."""
    sound = require("soundfile").SoundFile(io.BytesIO(source) if isinstance(source, bytes) else source)
    sound.seekable = lambda: False
    return sound


def _read_frames(sound) -> np.ndarray:
    """(frames, channels) float32, block by block: memory follows the audio that is there, not the
    length a damaged header claims (soundfile would allocate all of that at once)."""
    blocks = []
    while len(block := sound.read(BLOCK_FRAMES, dtype="float32", always_2d=True)):
        blocks.append(block)
    if len(blocks) == 1:
        return blocks[0]
    return np.concatenate(blocks) if blocks else np.zeros((0, sound.channels), np.float32)


def _check_length(seconds: float, max_seconds: float | None) -> None:
    if max_seconds is not None and seconds > max_seconds:
        raise AudioError(f"too long: {seconds:.2f} s > {max_seconds:g} s, the encoder's window")


def check_audio(samples: np.ndarray, max_seconds: float) -> float:
    """The duration in seconds, or AudioError for empty, silent or too long audio."""
    if samples.size == 0:
        raise AudioError("empty audio: 0 samples")
    seconds = samples.size / SAMPLE_RATE
    _check_length(seconds, max_seconds)
    if not np.isfinite(samples).all():
        raise AudioError("invalid samples: NaN or infinite values")
    if float(np.abs(samples).max()) < SILENCE_PEAK:
        raise AudioError(f"silent audio: peak amplitude below {SILENCE_PEAK:g}")
    return seconds


def encode_flac(samples: np.ndarray) -> bytes:
    """16 kHz 16-bit FLAC: lossless for the 16-bit sources speech corpora ship, half a WAV's size."""
    buffer = io.BytesIO()
    require("soundfile").write(buffer, samples, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


@dataclass(frozen=True)
class FeatureWindow:
    """The fixed input window of a Whisper encoder."""

    num_mel_bins: int
    frames: int
    """Mel frames of the window: 2 x max_source_positions (3000 = 30 s for large-v3)."""

    @property
    def samples(self) -> int:
        return self.frames * HOP_LENGTH

    @property
    def seconds(self) -> float:
        return self.samples / SAMPLE_RATE


def feature_frames(num_samples: torch.Tensor) -> torch.Tensor:
    """Mel frames that hold audio: ceil(samples / hop), as WhisperFeatureExtractor's mask counts."""
    return torch.div(num_samples + HOP_LENGTH - 1, HOP_LENGTH, rounding_mode="floor")


class LogMelSpectrogram(nn.Module):
    """Whisper's log-mel features of zero-padded waveforms, batched, on any device.

    Computes what ``WhisperFeatureExtractor`` does (STFT 400/160 with a Hann window, Slaney mel
    filters, log10, dynamic range clamped to 8 below the window's maximum, scaled (x + 4) / 4), so
    it can run in DataLoader workers or on the GPU inside the training step.
    """

    def __init__(self, window: FeatureWindow):
        super().__init__()
        self.window = window
        filters = mel_filter_bank(
            num_frequency_bins=1 + N_FFT // 2,
            num_mel_filters=window.num_mel_bins,
            min_frequency=0.0,
            max_frequency=SAMPLE_RATE / 2,
            sampling_rate=SAMPLE_RATE,
            norm="slaney",
            mel_scale="slaney",
        )
        self.register_buffer("mel_filters", torch.from_numpy(filters.T).float(), persistent=False)
        self.register_buffer("hann", torch.hann_window(N_FFT), persistent=False)

    @torch.no_grad()
    def forward(self, waveforms: torch.Tensor, num_samples: torch.Tensor | None = None) -> torch.Tensor:
        """(B, window.samples) float waveforms, zero after each utterance -> (B, mels, window.frames).

        With ``num_samples`` the STFT stops shortly after the longest utterance: frames that see
        only padding have zero power, so their value is known without computing them (a 3 s
        utterance in a 30 s window costs a tenth). The result is the same either way.
        """
        if waveforms.shape[-1] != self.window.samples:
            raise ValueError(f"expected waveforms of {self.window.samples} samples, got {waveforms.shape[-1]}")
        length = self.window.samples
        if num_samples is not None and num_samples.numel():
            # Past this point even the reflect padding at the end of the STFT mirrors only zeros.
            needed = int(num_samples.max()) + N_FFT
            length = min(length, -(-needed // HOP_LENGTH) * HOP_LENGTH)
        spectrum = torch.stft(waveforms[:, :length].float(), N_FFT, HOP_LENGTH, window=self.hann, return_complex=True)
        power = spectrum[..., :-1].abs() ** 2
        if power.shape[-1] < self.window.frames:
            power = F.pad(power, (0, self.window.frames - power.shape[-1]))
        log_mel = torch.clamp(self.mel_filters @ power, min=1e-10).log10()
        peak = log_mel.amax(dim=(1, 2), keepdim=True)
        return (torch.maximum(log_mel, peak - 8.0) + 4.0) / 4.0


def pad_waveforms(waveforms: list[np.ndarray], window: FeatureWindow) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad to the window: (B, window.samples) and the sample counts (B,)."""
    batch = torch.zeros(len(waveforms), window.samples)
    for row, samples in enumerate(waveforms):
        batch[row, : samples.size] = torch.from_numpy(samples)
    return batch, torch.tensor([samples.size for samples in waveforms])


def window_for(seconds: float, num_mel_bins: int) -> FeatureWindow:
    return FeatureWindow(num_mel_bins, math.ceil(seconds * SAMPLE_RATE / HOP_LENGTH))

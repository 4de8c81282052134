"""Streamed reading: the same samples as decode_audio, block by block, in memory that does not grow
with the file's length."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile

from mcat_ds.data.audio import SAMPLE_RATE, AudioError, decode_audio
from mcat_ds.data.stream import audio_info, read_blocks

SECONDS = 7.3
BLOCK_SECONDS = 1.3
"""Blocks that do not divide the file or any rate evenly, so that every join is a partial one."""
JOIN_TOLERANCE = 1e-6
"""What the blocks may differ from decode_audio by. Measured: 0.0 on every case below (the stream
resampler, given the same samples in pieces, computes exactly what the one-shot call does)."""


def _signal(rate: int, channels: int, seconds: float = SECONDS) -> np.ndarray:
    """A chirp with noise, different per channel: content at every frequency the resampler filters."""
    rng = np.random.default_rng(rate + channels)
    time = np.arange(round(seconds * rate)) / rate
    chirp = np.sin(2 * np.pi * (100 + 400 * time) * time)
    columns = [0.4 * chirp * (channel + 1) / channels + 0.05 * rng.standard_normal(time.size) for channel in range(channels)]
    return np.stack(columns, axis=1).astype(np.float32)


CASES = [
    (8000, 1, "WAV", "PCM_16"),
    (16000, 1, "FLAC", "PCM_16"),
    (22050, 1, "WAV", "PCM_16"),
    (44100, 1, "FLAC", "PCM_24"),
    (48000, 1, "WAV", "FLOAT"),
    (48000, 2, "WAV", "PCM_16"),
    (44100, 2, "OGG", "VORBIS"),
    (44100, 1, "MP3", "MPEG_LAYER_III"),
]


@pytest.mark.parametrize("rate,channels,container,subtype", CASES, ids=lambda value: str(value))
def test_blocks_equal_decode_audio(tmp_path, rate, channels, container, subtype):
    path = tmp_path / f"audio.{container.lower()}"
    soundfile.write(path, _signal(rate, channels), rate, format=container, subtype=subtype)

    blocks = list(read_blocks(path, block_seconds=BLOCK_SECONDS))
    whole = decode_audio(path)

    assert all(block.dtype == np.float32 and block.ndim == 1 and block.size for block in blocks)
    assert len(blocks) >= SECONDS // BLOCK_SECONDS
    # a block is about block_seconds; the resampler's delay moves a few hundred samples between blocks
    assert max(block.size for block in blocks) < (BLOCK_SECONDS + 0.1) * SAMPLE_RATE
    streamed = np.concatenate(blocks)
    assert streamed.size == whole.size
    assert float(np.abs(streamed - whole).max()) <= JOIN_TOLERANCE

    info = audio_info(path)
    assert (info.sample_rate, info.channels, info.format) == (rate, channels, container)
    assert info.seconds == pytest.approx(SECONDS, abs=0.06)  # MP3 states its length with encoder padding


def test_one_block_for_a_short_file(tmp_path):
    path = tmp_path / "short.wav"
    soundfile.write(path, _signal(16000, 1, seconds=0.5), 16000)
    blocks = list(read_blocks(path))
    assert len(blocks) == 1 and blocks[0].size == 8000


@pytest.mark.parametrize("case", ["missing", "text", "empty", "rate", "zero block"])
def test_unusable_files_say_why(tmp_path, case):
    path = tmp_path / "audio.wav"
    expected = {
        "missing": "no such audio file",
        "text": "not audio",
        "empty": "empty audio",
        "rate": "unsupported sample rate",
        "zero block": "block_seconds",
    }[case]
    if case == "text":
        path.write_text("WEBVTT\n\nnot a recording\n")
    elif case == "empty":
        soundfile.write(path, np.zeros((0, 1), np.float32), 16000)
    elif case == "rate":
        soundfile.write(path, np.zeros(400, np.float32), 400)
    elif case == "zero block":
        soundfile.write(path, np.zeros(400, np.float32), 16000)
    error = ValueError if case == "zero block" else AudioError
    with pytest.raises(error, match=expected):
        list(read_blocks(path, block_seconds=0 if case == "zero block" else 1.0))
    if case not in ("zero block",):
        with pytest.raises(AudioError, match=expected):
            audio_info(path)


READER = """
import json, sys
from mcat_ds.data.audio import decode_audio
from mcat_ds.data.stream import read_blocks

def status_mb(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field)) / 1024

def measure(read):
    # Writing 5 to clear_refs resets the peak (VmHWM) to the current RSS (Linux >= 4.0), so each
    # read is measured from where it starts, not under the import's transient peak.
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    base = status_mb("VmRSS:")
    seconds = read()
    return {"seconds": seconds, "base_mb": base, "growth_mb": status_mb("VmHWM:") - base}

def streamed(path):
    samples = 0
    for block in read_blocks(path):
        samples += block.size
        float((block.astype("float64") ** 2).sum())  # touch every sample, as a consumer would
    return samples / 16000

files = sys.argv[1:]
report = {"streamed": [measure(lambda: streamed(path)) for path in files],
          "decode_audio": measure(lambda: decode_audio(files[1]).size / 16000)}
print(json.dumps(report))
"""

RSS_GROWTH_BOUND_MB = 16
"""How much a 60-minute read may raise the reader's peak RSS above a 1-minute one. Measured, over
the RSS at the start of each read: 16 kHz 5.9 MB (1 min) / 1.6 MB (60 min), 8 kHz 12.9 / 10.5 MB
(the resampler's buffers too); the first read pays for allocator arenas that later reads reuse. decode_audio of the 60-minute file: +440 MB (115 MB of PCM16 on disk, 230 MB as float32,
held twice while its blocks are concatenated)."""


def _write_long(path, minutes: int, rate: int) -> None:
    """Written a minute at a time: the generator never holds the file either."""
    rng = np.random.default_rng(0)
    minute = (0.1 * rng.standard_normal(60 * rate)).astype(np.float32)
    with soundfile.SoundFile(path, "w", samplerate=rate, channels=1, subtype="PCM_16") as sound:
        for index in range(minutes):
            sound.write(minute * (0.5 + 0.5 * (index % 2)))


def test_peak_memory_does_not_grow_with_length(tmp_path):
    files = []
    for rate in (16000, 8000):  # 16 kHz: no resampler; 8 kHz: the stream resampler's state as well
        for minutes in (1, 60):
            path = tmp_path / f"{minutes}min_{rate}.wav"
            _write_long(path, minutes, rate)
            files.append(str(path))
    # A fresh process: pytest's own peak says nothing about the reader's.
    result = subprocess.run([sys.executable, "-c", READER, *files], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    growth = [entry["growth_mb"] for entry in report["streamed"]]
    print(f"peak RSS growth MB, 1 min / 60 min: 16 kHz {growth[0]:.1f} / {growth[1]:.1f}, "
          f"8 kHz {growth[2]:.1f} / {growth[3]:.1f}; decode_audio 60 min {report['decode_audio']['growth_mb']:.0f}")
    assert [round(entry["seconds"]) for entry in report["streamed"]] == [60, 3600, 60, 3600]
    assert growth[1] - growth[0] < RSS_GROWTH_BOUND_MB
    assert growth[3] - growth[2] < RSS_GROWTH_BOUND_MB
    # the measurement sees a whole file held in memory
    assert report["decode_audio"]["growth_mb"] > 200

import io

import numpy as np
import pytest
import soundfile
import torch
from transformers import WhisperFeatureExtractor

from mcat_ds.data.audio import (
    AudioError,
    FeatureWindow,
    LogMelSpectrogram,
    check_audio,
    decode_audio,
    encode_flac,
    feature_frames,
    pad_waveforms,
)


def tone(seconds: float, rate: int, frequency: float = 440.0, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    mono = 0.3 * np.sin(2 * np.pi * frequency * t).astype(np.float32)
    return np.stack([mono] * channels, axis=1) if channels > 1 else mono


def dominant_frequency(samples: np.ndarray, rate: int = 16000) -> float:
    spectrum = np.abs(np.fft.rfft(samples))
    return float(np.fft.rfftfreq(samples.size, 1 / rate)[spectrum.argmax()])


@pytest.mark.parametrize("fmt, subtype", [("WAV", "PCM_16"), ("FLAC", "PCM_16"), ("OGG", "VORBIS")])
@pytest.mark.parametrize("rate, channels", [(16000, 1), (22050, 1), (44100, 2), (8000, 2)])
def test_decode_any_format_rate_and_channel_count(tmp_path, fmt, subtype, rate, channels):
    path = tmp_path / f"a.{fmt.lower()}"
    soundfile.write(path, tone(1.0, rate, 440.0, channels), rate, format=fmt, subtype=subtype)
    samples = decode_audio(path)
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert abs(samples.size - 16000) <= 16  # 1 s at 16 kHz
    assert dominant_frequency(samples) == pytest.approx(440.0, abs=2.0)
    assert np.allclose(decode_audio(path.read_bytes()), samples)


def test_stereo_is_averaged():
    left = tone(0.5, 16000, 300.0)
    stereo = np.stack([left, np.zeros_like(left)], axis=1)
    buffer = io.BytesIO()
    soundfile.write(buffer, stereo, 16000, format="WAV", subtype="FLOAT")
    np.testing.assert_allclose(decode_audio(buffer.getvalue()), left / 2, atol=1e-7)


def test_bad_audio_is_named():
    with pytest.raises(AudioError, match="unreadable audio"):
        decode_audio(b"RIFF\x00\x00 definitely not audio")
    with pytest.raises(AudioError, match="empty audio"):
        check_audio(np.zeros(0, np.float32), 30)
    with pytest.raises(AudioError, match="silent audio"):
        check_audio(np.zeros(16000, np.float32), 30)
    with pytest.raises(AudioError, match=r"too long: 31.00 s > 30 s"):
        check_audio(tone(31, 16000), 30)
    assert check_audio(tone(2.5, 16000), 30) == pytest.approx(2.5)


def test_flac_round_trip_is_16_bit_exact():
    samples = tone(1.0, 16000)
    quantized = np.round(samples * 32767) / 32767
    np.testing.assert_allclose(decode_audio(encode_flac(samples)), quantized, atol=1 / 32767)


@pytest.mark.parametrize("mel_bins, seconds", [(128, 30), (80, 30), (80, 5)])
def test_log_mel_equals_whisper_feature_extractor(mel_bins, seconds):
    rng = np.random.default_rng(0)
    waves = [0.1 * rng.standard_normal(n).astype(np.float32) + tone(n / 16000, 16000, 200 + n % 500)
             for n in (16000, 33333, 5, seconds * 16000)]
    extractor = WhisperFeatureExtractor(feature_size=mel_bins, chunk_length=seconds)
    expected = extractor(waves, sampling_rate=16000, return_tensors="np", return_attention_mask=True)
    window = FeatureWindow(mel_bins, seconds * 100)
    batch, num_samples = pad_waveforms(waves, window)
    ours = LogMelSpectrogram(window)(batch)
    np.testing.assert_allclose(ours.numpy(), expected["input_features"], atol=1e-5, rtol=0)
    # stopping the STFT after the longest utterance changes nothing
    for rows in (slice(0, 4), slice(0, 3), slice(2, 3)):
        short = LogMelSpectrogram(window)(batch[rows], num_samples[rows])
        torch.testing.assert_close(short, ours[rows], atol=1e-5, rtol=0)
    assert feature_frames(num_samples).tolist() == expected["attention_mask"].sum(1).tolist()
    # the extractor's NumPy path (float64 STFT) agrees within float32 round-off
    numpy_path = np.stack([extractor._np_extract_fbank_features(row[None].numpy().astype(np.float64), "cpu")[0]
                           for row in batch[:2]])
    np.testing.assert_allclose(ours[:2].numpy(), numpy_path, atol=2e-3, rtol=0)


def test_log_mel_rejects_a_wrong_window():
    with pytest.raises(ValueError, match="expected waveforms of 80000 samples"):
        LogMelSpectrogram(FeatureWindow(80, 500))(torch.zeros(1, 480000))


def wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


@pytest.mark.parametrize("rate", [1, 999, 400_000])
def test_an_absurd_sample_rate_is_refused_before_resampling(rate):
    # 1 Hz would be resampled 16 000-fold: a damaged header must not cost gigabytes
    with pytest.raises(AudioError, match=rf"unsupported sample rate: {rate} Hz"):
        decode_audio(wav_bytes(tone(0.01, 16000), rate))


def test_too_long_audio_is_refused_from_its_header_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "long.flac"
    soundfile.write(path, tone(6, 16000), 16000, format="FLAC")
    reads = []
    monkeypatch.setattr(soundfile.SoundFile, "read", lambda *args, **kwargs: reads.append(args))
    with pytest.raises(AudioError, match=r"too long: 6.00 s > 5 s"):
        decode_audio(path, max_seconds=5)
    assert reads == []


def with_stated_length(flac: bytes, frames: int) -> bytes:
    """The FLAC with its STREAMINFO total-samples field (36 bits) set to ``frames``: 0 is what an
    encoder writing to a pipe leaves, anything else a damaged header."""
    data = bytearray(flac)
    streaminfo = 8  # after "fLaC" and the metadata block header
    data[streaminfo + 13] = (data[streaminfo + 13] & 0xF0) | (frames >> 32)
    data[streaminfo + 14:streaminfo + 18] = (frames & 0xFFFFFFFF).to_bytes(4, "big")
    return bytes(data)


def test_a_damaged_or_unstated_length_is_named_without_allocating_it():
    flac = encode_flac(tone(3.0, 16000))
    with pytest.raises(AudioError, match="a stream that does not state its length"):
        decode_audio(with_stated_length(flac, 0))
    # 2**34 frames are 64 GiB of float32: read block by block, the lie costs one block and what the
    # file really holds is read
    assert decode_audio(with_stated_length(flac, 2**34)).size == 3 * 16000
    with pytest.raises(AudioError, match=r"too long: 1073741.82 s > 30 s"):
        decode_audio(with_stated_length(flac, 2**34), max_seconds=30)
    assert decode_audio(with_stated_length(flac, 3 * 16000)).size == 3 * 16000
    with pytest.raises(AudioError, match="empty audio"):
        decode_audio(wav_bytes(np.zeros(0, np.float32), 16000))


def test_an_mp3_longer_than_one_read_block_decodes_as_one_whole_read(tmp_path):
    """Read in blocks, python-soundfile would seek back to its position after each one, and MP3 seeks
    land samples off: every block after the first started with garbage."""
    import soundfile
    import soxr

    rate = 44_100
    seconds = 30  # more than one 2**20-frame block at 44.1 kHz
    time = np.arange(seconds * rate) / rate
    path = tmp_path / "long.mp3"
    soundfile.write(path, (0.3 * np.sin(2 * np.pi * 220 * time) * np.sin(2 * np.pi * 0.5 * time)).astype(np.float32),
                    rate, format="MP3")
    whole, _ = soundfile.read(path, dtype="float32")
    expected = soxr.resample(whole, rate, 16_000, quality="VHQ")
    decoded = decode_audio(path)
    assert decoded.shape == expected.shape
    assert np.abs(decoded - expected).max() < 1e-5

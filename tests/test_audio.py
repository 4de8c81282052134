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

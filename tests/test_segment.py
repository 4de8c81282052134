"""Segmenting long recordings: the chunk planner on hand-made intervals, then Silero VAD and the
planner on real speech (espeak-ng speaking the demo corpus) with a known timeline."""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile

from mcat_ds.data.audio import SAMPLE_RATE, decode_audio
from mcat_ds.data.demo import VOICES, demo_sentences, speak
from mcat_ds.infer.segment import (
    CONTEXT,
    MIN_SILENCE,
    Chunk,
    EnergyEnvelope,
    plan_chunks,
    read_chunks,
    segment_file,
)

# --- the planner on hand-made intervals --------------------------------------------------------


def _spans(chunks: list[Chunk]) -> list[tuple[float, float]]:
    return [(round(chunk.start, 6), round(chunk.end, 6)) for chunk in chunks]


def test_pauses_of_min_silence_split_shorter_ones_join():
    chunks = plan_chunks([(1.0, 2.0), (2.4, 3.0), (3.5, 4.0)], window_seconds=30, min_silence=0.5)
    assert _spans(chunks) == [(1.0, 3.0), (3.5, 4.0)]


def test_context_before_and_after_inside_the_file():
    before, after = 0.1, 0.3
    chunks = plan_chunks([(0.05, 1.0), (3.0, 4.0)], window_seconds=5, duration=4.2, context=(before, after))
    assert chunks[0].audio_start == 0.0  # no audio before the file
    assert chunks[0].audio_end == pytest.approx(1.0 + after)
    assert chunks[1].audio_start == pytest.approx(3.0 - before)
    assert chunks[1].audio_end == pytest.approx(4.2)  # nor after it
    default = plan_chunks([(3.0, 4.0)], window_seconds=5)
    assert (default[0].audio_start, default[0].audio_end) == pytest.approx((3.0 - CONTEXT[0], 4.0 + CONTEXT[1]))
    unbounded = plan_chunks([(3.0, 4.0)], window_seconds=5, context=0.25)
    assert (unbounded[0].audio_start, unbounded[0].audio_end) == (2.75, 4.25)


def test_a_short_pause_between_chunks_is_shared_not_overlapped():
    chunks = plan_chunks([(1.0, 2.0), (2.2, 3.0)], window_seconds=5, min_silence=0.1, context=(0.1, 0.3))
    assert chunks[0].audio_end == pytest.approx(2.15)  # 0.2 s shared 1:3 between lead and tail
    assert chunks[1].audio_start == pytest.approx(2.15)


def test_a_stretch_longer_than_the_window_is_cut_at_its_longest_pause():
    speech = [(0.0, 1.5), (1.6, 3.0), (3.4, 4.5), (4.6, 6.0)]
    assert _spans(plan_chunks(speech, window_seconds=5, context=0)) == [(0.0, 3.0), (3.4, 6.0)]


def test_a_pause_too_early_to_be_worth_a_chunk_loses_to_a_later_one():
    speech = [(0.0, 0.5), (1.0, 3.9), (4.0, 6.0)]  # the 0.5 s pause leaves a 0.5 s piece
    assert _spans(plan_chunks(speech, window_seconds=5, min_silence=0.6, context=0)) == [(0.0, 3.9), (4.0, 6.0)]


def test_speech_without_a_pause_is_cut_at_its_quietest_point_near_the_window_end():
    frame = 0.032
    values = np.full(round(8 / frame), 0.3, np.float32)
    dip = round(5.2 / frame)
    values[dip - 1:dip + 2] = 0.01  # a 96 ms gap between words around 5.2 s
    values[round(2.0 / frame)] = 0.0  # quieter still, but far from where the window ends
    energy = EnergyEnvelope(values, frame)
    chunks = plan_chunks([(1.0, 7.5)], window_seconds=5, context=0, energy=energy)
    assert len(chunks) == 2
    assert chunks[0].end == pytest.approx(5.2, abs=frame)
    assert chunks[1].start == chunks[0].end and chunks[1].end == 7.5
    # without an envelope: exactly at the window's end
    assert _spans(plan_chunks([(1.0, 7.5)], window_seconds=5, context=0)) == [(1.0, 6.0), (6.0, 7.5)]


def test_random_intervals_keep_every_promise():
    rng = random.Random(7)
    for _ in range(300):
        window = rng.choice([5.0, 30.0, 2.0])
        time, speech = rng.uniform(0, 2), []
        for _ in range(rng.randint(0, 30)):
            length = rng.choice([rng.uniform(0.1, 1.5), rng.uniform(1, 3 * window)])
            speech.append((time, time + length))
            time += length + rng.choice([rng.uniform(0.05, 0.5), rng.uniform(0.5, 3)])
        duration = time + rng.uniform(0, 1)
        energy = EnergyEnvelope(np.asarray([rng.random() for _ in range(int(duration / 0.032) + 1)], np.float32))
        chunks = plan_chunks(speech, window, energy=energy, duration=duration)
        for chunk in chunks:
            assert chunk.seconds <= window + 1e-9
            assert 0 <= chunk.audio_start <= chunk.start < chunk.end <= chunk.audio_end <= duration
        for earlier, later in zip(chunks, chunks[1:]):
            assert earlier.audio_end <= later.audio_start + 1e-9
            # a pause of min_silence or more is always a boundary, and no chunk runs over it
            assert later.start - earlier.end >= -1e-9
        for start, end in speech:  # all speech is inside some chunk's span
            inside = [chunk for chunk in chunks if chunk.start < end and chunk.end > start]
            assert inside and inside[0].start <= start + 1e-9 and inside[-1].end >= end - 1e-9
            assert all(a.end == pytest.approx(b.start) for a, b in zip(inside, inside[1:]) if b.start < end)
        for earlier, later in zip(speech, speech[1:]):
            if later[0] - earlier[1] >= MIN_SILENCE:
                assert not any(chunk.start < earlier[1] and chunk.end > later[0] for chunk in chunks)


def test_planner_rejects_what_cannot_fit():
    with pytest.raises(ValueError, match="no room"):
        plan_chunks([(0, 1)], window_seconds=0.4, context=(0.1, 0.3))
    with pytest.raises(ValueError, match="not a speech interval"):
        plan_chunks([(2, 1)], window_seconds=5)
    assert plan_chunks([], window_seconds=5) == []


# --- real speech ---------------------------------------------------------------------------------

SENTENCES = 24
LANGUAGES = ("eng", "deu", "fra", "spa", "rus", "cmn", "jpn", "hin", "ara")
PAUSES = [0.3, 0.3, 1.5, 0.8, 0.3, 0.8, 1.5, 0.3, 0.3, 0.8, 0.3, 1.5, 0.8, 0.3, 0.8, 0.3, 0.3, 1.5, 0.8, 0.3, 1.5,
          0.8, 0.3]
"""Between the 24 sentences: 0.3 s (below MIN_SILENCE: joined), 0.8 and 1.5 s (above: split). Runs
of two 0.3 s pauses make stretches of three sentences, longer than the tiny preset's window."""
EDGE_SILENCE = 1.0
SPEECH_LEVEL = 1e-3
"""Amplitude above which a synthesized sample is speech (espeak-ng writes exact zeros around it)."""
TOLERANCE = 0.3
"""How far a chunk's speech start/end may lie from the known one. Measured: starts 0.00-0.05 s
early, ends 0.06-0.16 s late (the VAD's hangover plus Silero's 30 ms padding), on every variant."""
VARIANTS = ("22050", "8000", "16000", "44100", "48000", "48000-stereo")


@dataclass
class Recordings:
    sentences: list[tuple[float, float]]
    """The known speech timeline of the paused recordings, in seconds."""
    paused: dict[str, Path]
    continuous: Path
    continuous_speech: tuple[float, float]
    continuous_boundaries: list[float]
    silent: Path


@pytest.fixture(scope="module")
def recordings(tmp_path_factory) -> Recordings:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    soxr = pytest.importorskip("soxr")
    root = tmp_path_factory.mktemp("recordings")
    rng = random.Random(2026)
    corpus = demo_sentences()
    in_long_runs = {index for first, last in _stretches() if last - first >= 2 for index in range(first, last + 1)}
    jobs = []
    for index in range(SENTENCES):  # shuffled sentences and languages
        code = rng.choice(LANGUAGES)
        # three sentences joined by short pauses outgrow a 5 s window only if they are long ones
        choices = sorted(corpus, key=lambda sentence: -len(sentence.texts[code]))[:10] if index in in_long_runs else corpus
        jobs.append((VOICES[code], rng.choice(choices).texts[code], root / f"sentence{index}.wav"))
    speak(jobs, threads=2)
    clips, rate = [], None
    for _, _, path in jobs:
        samples, rate = soundfile.read(path, dtype="float32")
        loud = np.flatnonzero(np.abs(samples) > SPEECH_LEVEL)
        clips.append(samples[loud[0]:loud[-1] + 1])  # the pauses are exactly the ones inserted

    silence = [np.zeros(round(seconds * rate), np.float32) for seconds in PAUSES]
    edge = np.zeros(round(EDGE_SILENCE * rate), np.float32)
    pieces, sentences, position = [edge], [], edge.size
    for index, clip in enumerate(clips):
        if index:
            pieces.append(silence[index - 1])
            position += silence[index - 1].size
        sentences.append((position / rate, (position + clip.size) / rate))
        pieces.append(clip)
        position += clip.size
    paused = np.concatenate(pieces + [edge])

    paths = {}
    for variant in VARIANTS:
        target = int(variant.split("-")[0])
        samples = paused if target == rate else soxr.resample(paused, rate, target, quality="VHQ")
        if variant.endswith("stereo"):
            samples = np.stack([samples, 0.5 * samples], axis=1)
        paths[variant] = root / f"paused_{variant}.{'flac' if target == 44100 else 'wav'}"
        soundfile.write(paths[variant], samples, target, subtype="PCM_16")

    continuous = np.concatenate([edge, *clips, edge])  # sentence after sentence, not a pause anywhere
    boundaries = list(EDGE_SILENCE + np.cumsum([clip.size for clip in clips[:-1]]) / rate)
    continuous_path = root / "continuous.wav"
    soundfile.write(continuous_path, soxr.resample(continuous, rate, SAMPLE_RATE, quality="VHQ"), SAMPLE_RATE)
    speech = (EDGE_SILENCE, (continuous.size - edge.size) / rate)

    silent_path = root / "silent.wav"
    hiss = np.random.default_rng(0).standard_normal(10 * SAMPLE_RATE).astype(np.float32) * 1e-4
    soundfile.write(silent_path, hiss, SAMPLE_RATE)
    return Recordings(sentences, paths, continuous_path, speech, boundaries, silent_path)


def _stretches() -> list[tuple[int, int]]:
    """(first, last) sentence index of each run joined by pauses below MIN_SILENCE."""
    runs = [[0, 0]]
    for index in range(1, SENTENCES):
        if PAUSES[index - 1] < MIN_SILENCE:
            runs[-1][1] = index
        else:
            runs.append([index, index])
    return [tuple(run) for run in runs]


def test_the_fixture_exercises_both_windows(recordings):
    room = 5 - sum(CONTEXT)
    spans = [recordings.sentences[last][1] - recordings.sentences[first][0]
             for first, last in _stretches()]
    assert any(span > room + TOLERANCE for span in spans), "no stretch needs cutting at a 5 s window"
    assert any(span < room - TOLERANCE for span in spans if span > 2.5)
    assert all(end - start < room - TOLERANCE for start, end in recordings.sentences)


@pytest.mark.parametrize("variant", ["16000", "48000-stereo"])
def test_real_preset_window_gives_one_chunk_per_stretch(recordings, variant):
    segmented = segment_file(recordings.paused[variant], window_seconds=30)
    expected = [(recordings.sentences[first][0], recordings.sentences[last][1])
                for first, last in _stretches()]
    assert len(segmented.chunks) == len(expected)
    errors = []
    for chunk, (start, end) in zip(segmented.chunks, expected):
        errors += [chunk.start - start, chunk.end - end]
        assert abs(chunk.start - start) <= TOLERANCE and abs(chunk.end - end) <= TOLERANCE
    print(f"{variant}: boundary errors {min(errors):+.3f} .. {max(errors):+.3f} s")


@pytest.mark.parametrize("variant", VARIANTS)
def test_tiny_window_cuts_only_between_sentences(recordings, variant):
    sentences = recordings.sentences
    room = 5 - sum(CONTEXT)
    segmented = segment_file(recordings.paused[variant], window_seconds=5)
    assert segmented.duration == pytest.approx(sentences[-1][1] + EDGE_SILENCE, abs=1e-3)
    starts = np.array([start for start, _ in sentences])
    ends = np.array([end for _, end in sentences])
    covered = []
    errors = []
    for chunk in segmented.chunks:
        assert chunk.seconds <= 5 + 1e-9
        first = int(np.argmin(np.abs(starts - chunk.start)))
        last = int(np.argmin(np.abs(ends - chunk.end)))
        errors += [chunk.start - starts[first], chunk.end - ends[last]]
        assert abs(chunk.start - starts[first]) <= TOLERANCE, f"{chunk} starts inside a sentence"
        assert abs(chunk.end - ends[last]) <= TOLERANCE, f"{chunk} ends inside a sentence"
        assert all(PAUSES[index] < MIN_SILENCE for index in range(first, last)), f"{chunk} spans a long pause"
        covered += range(first, last + 1)
    assert covered == list(range(len(sentences)))  # each sentence in exactly one chunk, in order
    stretch_of = {index: number for number, (first, last) in enumerate(_stretches())
                  for index in range(first, last + 1)}
    for earlier, later in zip(segmented.chunks, segmented.chunks[1:]):
        last = int(np.argmin(np.abs(ends - earlier.end)))
        if stretch_of[last] == stretch_of[last + 1]:  # a cut at a short pause must have been needed
            assert later.end - earlier.start > room - TOLERANCE
    print(f"{variant}: {len(segmented.chunks)} chunks, boundary errors {min(errors):+.3f} .. {max(errors):+.3f} s")


@pytest.mark.parametrize("window", [5, 30])
def test_speech_without_pauses_is_cut_to_the_window_and_fully_covered(recordings, window):
    segmented = segment_file(recordings.continuous, window_seconds=window)
    start, end = recordings.continuous_speech
    chunks = segmented.chunks
    assert len(chunks) >= np.ceil((end - start) / window)
    assert all(chunk.seconds <= window + 1e-9 for chunk in chunks)
    assert abs(chunks[0].start - start) <= TOLERANCE and abs(chunks[-1].end - end) <= TOLERANCE
    for earlier, later in zip(chunks, chunks[1:]):
        assert later.start - earlier.end < MIN_SILENCE  # nothing left out but the VAD's short pauses
        assert earlier.audio_end <= later.audio_start + 1e-9
    cuts = [chunk.end for chunk in chunks[:-1]]
    nearest = [min(abs(cut - boundary) for boundary in recordings.continuous_boundaries) for cut in cuts]
    print(f"window {window}: cuts {np.round(cuts, 2).tolist()}, from the nearest sentence boundary "
          f"{np.round(nearest, 2).tolist()} s")


def test_silence_gives_no_chunks(recordings):
    segmented = segment_file(recordings.silent, window_seconds=5)
    assert segmented.speech == () and segmented.chunks == ()
    assert segmented.duration == pytest.approx(10.0)
    assert list(segmented.chunk_samples()) == []


@pytest.mark.parametrize("variant", ["16000", "44100"])
def test_chunk_samples_are_the_files_samples(recordings, variant):
    segmented = segment_file(recordings.paused[variant], window_seconds=5, block_seconds=2.0)
    whole = decode_audio(recordings.paused[variant])
    seen = []
    for chunk, samples in segmented.chunk_samples():
        first, stop = round(chunk.audio_start * SAMPLE_RATE), round(chunk.audio_end * SAMPLE_RATE)
        np.testing.assert_array_equal(samples, whole[first:stop])
        seen.append(chunk)
    assert seen == list(segmented.chunks)


def test_read_chunks_across_blocks_and_gaps(tmp_path):
    samples = (np.arange(10 * SAMPLE_RATE) / (10 * SAMPLE_RATE)).astype(np.float32)
    path = tmp_path / "ramp.wav"
    soundfile.write(path, samples, SAMPLE_RATE, subtype="FLOAT")
    chunks = [Chunk(7.0, 9.5, 6.9, 9.9), Chunk(0.2, 0.5, 0.1, 0.6), Chunk(0.55, 2.9, 0.6, 3.1)]
    got = list(read_chunks(path, chunks, block_seconds=0.7))
    assert [chunk for chunk, _ in got] == sorted(chunks, key=lambda chunk: chunk.audio_start)
    for chunk, piece in got:
        np.testing.assert_array_equal(piece, samples[round(chunk.audio_start * SAMPLE_RATE):round(chunk.audio_end * SAMPLE_RATE)])

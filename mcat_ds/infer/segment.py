"""Long recordings cut into chunks that fit the encoder's window, at pauses, in the file's seconds.

Three steps, each usable alone:

1. :func:`detect_speech`: Silero VAD over 16 kHz blocks (one streamed pass), giving speech
   intervals and the frames' energy;
2. :func:`plan_chunks`: intervals -> chunks: split at pauses of ``min_silence`` or more, joined across
   shorter ones, never longer than the window; speech that runs on past the window is cut at a
   shorter pause inside it, or at its quietest point near the window's end;
3. :func:`read_chunks`: a second streamed pass that hands out each chunk's samples.

:func:`segment_file` runs all three on a file. Memory follows a block and a window, never the
file's length: the first pass keeps only two numbers per 32 ms frame (speech probability and
energy, about 4 MB per hour of audio), the second at most one block plus one chunk of samples.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mcat_ds.data.audio import SAMPLE_RATE
from mcat_ds.data.stream import BLOCK_SECONDS, read_blocks
from mcat_ds.optional import require

FRAME_SAMPLES = 512
"""Silero VAD's frame at 16 kHz: one speech probability per 32 ms."""
FRAME_SECONDS = FRAME_SAMPLES / SAMPLE_RATE

MIN_SILENCE = 0.5
"""Pauses this long or longer end a chunk. The longest pause inside a demo sentence (a comma, as
espeak-ng speaks it) is 0.19 s and the clips end with 0.30 s of silence, so a sentence is never cut
at its comma; pauses between sentences in read or conversational speech are mostly longer."""
CONTEXT = (0.0, 0.2)
"""Seconds of audio kept before and after each stretch of speech the VAD found (its intervals carry
Silero's 30 ms padding already): what the demo corpus's clips have around the same VAD's
boundaries, so a chunk looks like the utterances the tiny model was trained on. Measured over all
360 espeak-ng clips, each placed in a recording between 1 s pauses: a clip starts 0.013 s after the
VAD's speech start (median; 5-95th percentile -0.06 to 0.04 s) and ends 0.21 s after its speech end
(0.17 to 0.28 s). The demo model remembers its clips to the frame: on a recording of 12 of them,
(0.1, 0.3) gave the clips' own outputs for 21% of its outputs, (0.05, 0.2) 33%, (0.0, 0.2) 57%."""
CUT_SEARCH = (0.25, 3.0)
"""Speech longer than the room is cut at its quietest point in its last quarter, or last 3 s where
that is shorter: with a 30 s window a quarter would allow cuts 7 s early, 3 s still spans several
word boundaries."""

SMOOTH_FRAMES = 3
"""Frames (of 32 ms) averaged when looking for the quietest point."""

VAD_THRESHOLD = 0.5
VAD_MIN_SPEECH_MS = 250
VAD_MIN_SILENCE_MS = 100
"""The VAD splits at every pause of 0.1 s or more (Silero's defaults): plan_chunks joins them up
again, and the short pauses are where it cuts speech that runs past the window."""
VAD_PAD_MS = 30


@dataclass(frozen=True)
class Chunk:
    """One piece for the model, in seconds of the original file."""

    start: float
    """Where its speech starts."""
    end: float
    """Where its speech ends."""
    audio_start: float
    """Where the audio handed to the model starts: ``start`` less the leading context."""
    audio_end: float

    @property
    def seconds(self) -> float:
        """The audio's length, what must fit the window."""
        return self.audio_end - self.audio_start


@dataclass(frozen=True)
class EnergyEnvelope:
    """Root-mean-square amplitude per frame; frame ``i`` covers ``[i, i + 1) * frame_seconds``."""

    values: np.ndarray
    frame_seconds: float = FRAME_SECONDS

    def quietest(self, start: float, end: float) -> float:
        """The time inside ``[start, end]`` where the envelope is lowest: the middle of the quietest
        run of ``SMOOTH_FRAMES`` whole frames (a gap between words rather than a stop consonant's
        closure; the last of equals, to keep pieces long); ``end`` where none fits."""
        first = int(np.ceil(start / self.frame_seconds - 1e-9))
        last = min(int(np.floor(end / self.frame_seconds + 1e-9)), self.values.size)
        runs = last - first - SMOOTH_FRAMES + 1
        if runs <= 0:
            return end
        sums = np.convolve(self.values[first:last].astype(np.float64), np.ones(SMOOTH_FRAMES), mode="valid")
        quietest = first + runs - 1 - int(np.argmin(sums[::-1]))
        return min(end, (quietest + SMOOTH_FRAMES / 2) * self.frame_seconds)


@dataclass(frozen=True)
class VoiceActivity:
    speech: tuple[tuple[float, float], ...]
    """Speech intervals in seconds, sorted, apart by at least the VAD's minimum silence."""
    energy: EnergyEnvelope
    duration: float


@dataclass(frozen=True)
class SegmentedFile:
    path: Path
    duration: float
    speech: tuple[tuple[float, float], ...]
    chunks: tuple[Chunk, ...]
    block_seconds: float = BLOCK_SECONDS

    def chunk_samples(self) -> Iterator[tuple[Chunk, np.ndarray]]:
        """Each chunk with its 16 kHz samples, from a second pass over the file (see read_chunks)."""
        return read_chunks(self.path, self.chunks, self.block_seconds)


def plan_chunks(
    speech: Iterable[tuple[float, float]],
    window_seconds: float,
    min_silence: float = MIN_SILENCE,
    context: float | tuple[float, float] = CONTEXT,
    energy: EnergyEnvelope | None = None,
    duration: float | None = None,
) -> list[Chunk]:
    """Chunks whose audio (speech and context) is at most ``window_seconds`` long.

    ``speech``: intervals in seconds (sorted or not; overlapping ones are merged). Intervals apart by
    less than ``min_silence`` join one chunk while it fits; a pause of ``min_silence`` or more always
    ends one. A joined stretch longer than the room (the window less both contexts) is cut at the
    longest pause that leaves a piece of at least a quarter of the room (the latest pause if none
    does); speech with no pause inside the room is cut at ``energy``'s quietest point near its end
    (``CUT_SEARCH``), or exactly at the room's end without an envelope.

    ``context``: seconds before and after (one number: both). Two chunks never share audio: where
    the pause between them is shorter than both contexts, it is divided between them in the
    contexts' proportion (nothing at a cut inside speech). ``duration`` keeps the last chunk's
    audio inside the file.
    """
    before, after = (context, context) if isinstance(context, (int, float)) else context
    if before < 0 or after < 0:
        raise ValueError(f"context must not be negative, got {context}")
    room = window_seconds - before - after
    if room < VAD_MIN_SPEECH_MS / 1000:  # the shortest speech the VAD reports must fit
        raise ValueError(f"a {window_seconds:g} s window leaves no room for speech with {before:g} + {after:g} s of context")
    stretches = []
    for stretch in _join(_merged(speech), min_silence):
        stretches.extend(_split(stretch, room, energy))
    return _with_context(stretches, before, after, duration)


def _merged(speech: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for start, end in sorted((float(start), float(end)) for start, end in speech):
        if end < start or start < 0:
            raise ValueError(f"not a speech interval: ({start}, {end})")
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        elif end > start:
            merged.append((start, end))
    return merged


def _join(intervals: list[tuple[float, float]], min_silence: float) -> list[list[tuple[float, float]]]:
    """Runs of intervals apart by less than ``min_silence``."""
    stretches: list[list[tuple[float, float]]] = []
    for interval in intervals:
        if stretches and interval[0] - stretches[-1][-1][1] < min_silence:
            stretches[-1].append(interval)
        else:
            stretches.append([interval])
    return stretches


def _split(stretch: list[tuple[float, float]], room: float, energy: EnergyEnvelope | None) -> list[tuple[float, float]]:
    """(start, end) pieces of at most ``room`` seconds covering the stretch's speech."""
    pieces = []
    rest = list(stretch)
    while rest[-1][1] - rest[0][0] > room:
        start = rest[0][0]
        limit = start + room
        pauses = [  # (length, piece length, index of the interval after the pause)
            (rest[k][0] - rest[k - 1][1], rest[k - 1][1] - start, k)
            for k in range(1, len(rest))
            if rest[k - 1][1] <= limit
        ]
        if pauses:
            long_enough = [pause for pause in pauses if pause[1] >= room / 4]
            _, _, k = max(long_enough) if long_enough else max(pauses, key=lambda pause: pause[2])
            pieces.append((start, rest[k - 1][1]))
            rest = rest[k:]
            continue
        # One interval runs past the room: cut inside it, where it is quietest.
        search = min(CUT_SEARCH[0] * room, CUT_SEARCH[1])
        cut = limit if energy is None else energy.quietest(limit - search, limit)
        pieces.append((start, cut))
        rest[0] = (cut, rest[0][1])
    pieces.append((rest[0][0], rest[-1][1]))
    return pieces


def _with_context(
    stretches: list[tuple[float, float]], before: float, after: float, duration: float | None
) -> list[Chunk]:
    chunks = []
    for index, (start, end) in enumerate(stretches):
        lead = min(before, start)
        if index > 0:
            lead = min(lead, _share(start - stretches[index - 1][1], before, after)[0])
        tail = after if duration is None else max(0.0, min(after, duration - end))
        if index + 1 < len(stretches):
            tail = min(tail, _share(stretches[index + 1][0] - end, before, after)[1])
        chunks.append(Chunk(start, end, start - lead, end + tail))
    return chunks


def _share(pause: float, before: float, after: float) -> tuple[float, float]:
    """How much of a pause goes to the next chunk's leading context and the previous one's trailing."""
    if pause >= before + after:
        return before, after
    return pause * before / (before + after), pause * after / (before + after)


@functools.lru_cache(maxsize=1)
def _vad_model():
    """Silero VAD from the installed wheel (TorchScript, loaded with torch.jit.load): nothing is
    downloaded. Cached: one model per process; it is stateful, so one file at a time."""
    threads = torch.get_num_threads()
    try:
        # silero_vad.model calls torch.set_num_threads(1) when imported, for the whole process.
        silero_vad = require("silero_vad")
    finally:
        torch.set_num_threads(threads)
    with warnings.catch_warnings():  # its loader's importlib.resources.path and torch.jit.load
        warnings.simplefilter("ignore", DeprecationWarning)
        return silero_vad.load_silero_vad()


def detect_speech(blocks: Iterable[np.ndarray], threshold: float = VAD_THRESHOLD) -> VoiceActivity:
    """Speech intervals of a 16 kHz mono stream, block by block: Silero VAD's per-frame probabilities
    turned into intervals by its own rules (threshold with hysteresis, 0.25 s minimum speech, 0.1 s
    minimum silence, 30 ms padding), and each frame's RMS energy for cutting long speech."""
    model = _vad_model()
    get_speech_timestamps_from_probs = require("silero_vad").get_speech_timestamps_from_probs
    model.reset_states()
    probabilities: list[float] = []
    energies: list[np.ndarray] = []
    pending = np.zeros(0, np.float32)
    total = 0
    with torch.no_grad():
        for block in blocks:
            total += block.size
            pending = np.concatenate((pending, np.asarray(block, np.float32)))
            whole = pending.size - pending.size % FRAME_SAMPLES
            _score(model, pending[:whole], probabilities, energies)
            pending = pending[whole:]
        if pending.size:  # the last partial frame, zero-padded as Silero's own loop does
            _score(model, np.pad(pending, (0, FRAME_SAMPLES - pending.size)), probabilities, energies)
    timestamps = get_speech_timestamps_from_probs(
        probabilities,
        sampling_rate=SAMPLE_RATE,
        threshold=threshold,
        min_speech_duration_ms=VAD_MIN_SPEECH_MS,
        min_silence_duration_ms=VAD_MIN_SILENCE_MS,
        speech_pad_ms=VAD_PAD_MS,
        audio_length_samples=total,
    )
    speech = tuple((stamp["start"] / SAMPLE_RATE, stamp["end"] / SAMPLE_RATE) for stamp in timestamps)
    values = np.concatenate(energies) if energies else np.zeros(0, np.float32)
    return VoiceActivity(speech, EnergyEnvelope(values), total / SAMPLE_RATE)


def _score(model, samples: np.ndarray, probabilities: list[float], energies: list[np.ndarray]) -> None:
    if not samples.size:
        return
    frames = samples.reshape(-1, FRAME_SAMPLES)
    energies.append(np.sqrt((frames.astype(np.float64) ** 2).mean(axis=1)).astype(np.float32))
    tensor = torch.from_numpy(frames)
    for frame in tensor:  # the model carries state from frame to frame: one at a time
        probabilities.append(float(model(frame, SAMPLE_RATE)))


def segment_file(
    path: str | Path,
    window_seconds: float,
    min_silence: float = MIN_SILENCE,
    context: float | tuple[float, float] = CONTEXT,
    block_seconds: float = BLOCK_SECONDS,
    threshold: float = VAD_THRESHOLD,
) -> SegmentedFile:
    """Voice activity over the whole file in one streamed pass, then the chunk plan (plan_chunks).
    The chunks' samples come from :meth:`SegmentedFile.chunk_samples`, a second pass."""
    path = Path(path)
    activity = detect_speech(read_blocks(path, block_seconds), threshold)
    chunks = plan_chunks(activity.speech, window_seconds, min_silence, context, activity.energy, activity.duration)
    return SegmentedFile(path, activity.duration, activity.speech, tuple(chunks), block_seconds)


def read_chunks(
    path: str | Path, chunks: Sequence[Chunk], block_seconds: float = BLOCK_SECONDS
) -> Iterator[tuple[Chunk, np.ndarray]]:
    """Each chunk (in order of its audio's start) with its samples ``[audio_start, audio_end)`` at
    16 kHz, from one streamed pass: the buffer holds at most one block plus one chunk, however long
    the file and however many chunks."""
    ordered = sorted(chunks, key=lambda chunk: (chunk.audio_start, chunk.audio_end))
    blocks = read_blocks(path, block_seconds)
    buffer = np.zeros(0, np.float32)
    buffer_start = 0  # the file's sample index of buffer[0]
    for chunk in ordered:
        first = round(chunk.audio_start * SAMPLE_RATE)
        stop = round(chunk.audio_end * SAMPLE_RATE)
        while True:
            # later chunks start later still: what lies before this one is done with
            drop = min(max(0, first - buffer_start), buffer.size)
            buffer, buffer_start = buffer[drop:], buffer_start + drop
            if buffer_start + buffer.size >= stop or (block := next(blocks, None)) is None:
                break
            buffer = np.concatenate((buffer, block))
        yield chunk, buffer[max(0, first - buffer_start):stop - buffer_start].copy()

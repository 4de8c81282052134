"""Timed text as SubRip (.srt) and WebVTT (.vtt) subtitle files.

A segment's text is wrapped into lines of at most ``MAX_LINE`` columns and cues of at most
``MAX_LINES`` lines (the usual broadcast limits, 42 x 2); a text too long for one cue becomes
several, its time shared between them in proportion to their characters. Lines are balanced (two
lines of 30 rather than 42 and 18). Columns count as a terminal shows them: CJK ideographs, kana and
hangul are two wide (21 to a line), combining marks nothing. Breaks fall at spaces, and between
characters of scripts written without them (never before closing punctuation such as 。or ?, nor
before a combining mark); a word wider than a line is broken where it must.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from mcat_ds.files import write_atomically

MAX_LINE = 42
MAX_LINES = 2


@dataclass(frozen=True)
class Segment:
    """Text spoken from ``start`` to ``end``, in seconds of the recording."""

    start: float
    end: float
    text: str


def format_timestamp(seconds: float, decimal: str = ",") -> str:
    """``HH:MM:SS,mmm`` (SRT) or, with ``decimal="."``, ``HH:MM:SS.mmm`` (WebVTT); hours grow
    past two digits rather than wrap."""
    return _format_milliseconds(_milliseconds(seconds), decimal)


def _milliseconds(seconds: float) -> int:
    if not seconds >= 0:
        raise ValueError(f"a subtitle time must be a non-negative number of seconds, got {seconds}")
    return math.floor(seconds * 1000 + 0.5)


def _format_milliseconds(milliseconds: int, decimal: str) -> str:
    seconds, milliseconds = divmod(milliseconds, 1000)
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours:02d}:{minutes:02d}:{seconds:02d}{decimal}{milliseconds:03d}"


def cues(segments: Iterable[Segment], max_line: int = MAX_LINE, max_lines: int = MAX_LINES) -> list[Segment]:
    """The cues the files hold: each segment's text wrapped (lines joined by ``\\n``) and split into
    as many cues as it needs; segments without text are left out. The segments must be in order
    and must not overlap (ValueError), so the cues are monotonic and do not overlap either."""
    if max_line < 2 or max_lines < 1:
        raise ValueError(f"cues need lines of at least 2 columns and at least 1 line, got {max_line} x {max_lines}")
    result = []
    previous_end = 0
    for segment in segments:
        start, end = _milliseconds(segment.start), _milliseconds(segment.end)
        if end < start:
            raise ValueError(f"segment ends before it starts: {segment}")
        if start < previous_end:
            raise ValueError(f"segments overlap or are out of order at {segment}")
        previous_end = end
        lines = wrap(segment.text, max_line)
        groups = [lines[index:index + max_lines] for index in range(0, len(lines), max_lines)]
        weights = [sum(len(line.replace(" ", "")) for line in group) for group in groups]
        total = sum(weights)
        done = 0
        for group, weight in zip(groups, weights):
            cue_start = start + round((end - start) * done / total)
            done += weight
            cue_end = start + round((end - start) * done / total)
            result.append(Segment(cue_start / 1000, cue_end / 1000, "\n".join(group)))
    return result


def srt_text(segments: Iterable[Segment], max_line: int = MAX_LINE, max_lines: int = MAX_LINES) -> str:
    blocks = []
    for number, cue in enumerate(cues(segments, max_line, max_lines), start=1):
        blocks.append(f"{number}\n{_span(cue, ',')}\n{cue.text}\n")
    return "\n".join(blocks)


def vtt_text(segments: Iterable[Segment], max_line: int = MAX_LINE, max_lines: int = MAX_LINES) -> str:
    blocks = ["WEBVTT\n"]
    for cue in cues(segments, max_line, max_lines):
        # WebVTT cue text is markup: '&' and '<' would start entities and tags, '-->' ends nothing
        text = cue.text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        blocks.append(f"{_span(cue, '.')}\n{text}\n")
    return "\n".join(blocks)


def write_srt(path: str | Path, segments: Iterable[Segment], max_line: int = MAX_LINE, max_lines: int = MAX_LINES) -> None:
    """Write (or replace, in one step) a SubRip file, UTF-8."""
    write_atomically(Path(path), srt_text(segments, max_line, max_lines))


def write_vtt(path: str | Path, segments: Iterable[Segment], max_line: int = MAX_LINE, max_lines: int = MAX_LINES) -> None:
    """Write (or replace, in one step) a WebVTT file, UTF-8."""
    write_atomically(Path(path), vtt_text(segments, max_line, max_lines))


def _span(cue: Segment, decimal: str) -> str:
    return f"{format_timestamp(cue.start, decimal)} --> {format_timestamp(cue.end, decimal)}"


# --- wrapping -----------------------------------------------------------------------------------

_NO_BREAK_BEFORE = set("、。，．・：；？！）」』】〕〉》”’,.:;?!)]}%‥…ー々ゝゞヽヾぁぃぅぇぉっゃゅょゎァィゥェォッャュョヮヵヶ")
_NO_BREAK_AFTER = set("（「『【〔〈《“‘([{")


def _width(text: str) -> int:
    return sum(_char_width(char) for char in text)


def _char_width(char: str) -> int:
    if unicodedata.combining(char) or unicodedata.category(char) in ("Mn", "Me", "Cf"):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def _unspaced(char: str) -> bool:
    """Characters of scripts written without spaces between words, where a line may break."""
    if unicodedata.east_asian_width(char) in ("W", "F"):
        return True
    name = unicodedata.name(char, "")
    return name.startswith(("THAI ", "LAO ", "KHMER ", "MYANMAR "))


def _atoms(text: str) -> list[tuple[str, bool]]:
    """(piece, preceded by a space): the units a line may break between."""
    atoms: list[tuple[str, bool]] = []
    for word in text.split():
        spaced = True
        for char in word:
            mark = unicodedata.combining(char) or unicodedata.category(char) in ("Mn", "Mc", "Me")
            joins = atoms and not spaced and (
                mark or char in _NO_BREAK_BEFORE or atoms[-1][0][-1] in _NO_BREAK_AFTER
                or not (_unspaced(char) or _unspaced(atoms[-1][0][-1]))
            )
            if joins:
                atoms[-1] = (atoms[-1][0] + char, atoms[-1][1])
            else:
                atoms.append((char, spaced and bool(atoms)))
            spaced = False
    return atoms


def _fit(atom: str, limit: int) -> list[str]:
    """An atom wider than a line, broken at character boundaries (not before a combining mark)."""
    pieces = [""]
    for char in atom:
        if pieces[-1] and _width(pieces[-1] + char) > limit and _char_width(char):
            pieces.append("")
        pieces[-1] += char
    return pieces


def _greedy(atoms: list[tuple[str, bool]], limit: int) -> list[str]:
    lines: list[str] = []
    for piece, spaced in atoms:
        joined = (lines[-1] + (" " if spaced else "") + piece) if lines else piece
        if lines and _width(joined) <= limit:
            lines[-1] = joined
        else:
            lines.append(piece)
    return lines


def wrap(text: str, max_line: int = MAX_LINE) -> list[str]:
    """Lines of at most ``max_line`` columns, as few as greedy filling gives, balanced: the narrowest
    limit that still needs no more lines is used (so 60 characters become 30 + 30, not 42 + 18)."""
    atoms = []
    for piece, spaced in _atoms(" ".join(text.split())):
        parts = _fit(piece, max_line) if _width(piece) > max_line else [piece]
        atoms += [(part, spaced and index == 0) for index, part in enumerate(parts)]
    if not atoms:
        return []
    needed = len(_greedy(atoms, max_line))
    low = max(_width(piece) for piece, _ in atoms)
    high = max_line
    while low < high:  # greedy filling needs fewer lines as the limit grows
        middle = (low + high) // 2
        if len(_greedy(atoms, middle)) <= needed:
            high = middle
        else:
            low = middle + 1
    return _greedy(atoms, low)

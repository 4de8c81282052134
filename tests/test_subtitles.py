"""Subtitle files: parsed back by independent parsers (srt, webvtt-py), in order, without overlaps,
covering every segment, with the text intact apart from where lines were broken."""

from __future__ import annotations

import html
import unicodedata

import pytest

from mcat_ds.data.demo import demo_sentences
from mcat_ds.infer.subtitles import (
    MAX_LINE,
    MAX_LINES,
    Segment,
    cues,
    format_timestamp,
    vtt_text,
    wrap,
    write_srt,
    write_vtt,
)

srt = pytest.importorskip("srt")
webvtt = pytest.importorskip("webvtt")

LANGUAGES = ("eng", "cmn", "deu", "fra", "spa", "rus", "ara", "hin", "jpn")
UNSPACED = ("cmn", "jpn")


def _width(text: str) -> int:
    """Columns as wcwidth counts them: nonspacing and enclosing marks and format characters none,
    East Asian wide and fullwidth characters two."""
    return sum(0 if unicodedata.category(char) in ("Mn", "Me", "Cf") else 2 if unicodedata.east_asian_width(char) in "WF"
               else 1 for char in text)


def _segments(code: str) -> list[Segment]:
    """Short and long segments: single sentences, then runs of 3, 8 and 15 sentences (several cues)."""
    texts = [sentence.texts[code] for sentence in demo_sentences()]
    joiner = "" if code in UNSPACED else " "
    pieces = [texts[0], texts[1], joiner.join(texts[2:5]), joiner.join(texts[5:13]), joiner.join(texts[13:28]),
              texts[28]]
    segments, time = [], 0.5
    for index, text in enumerate(pieces):
        length = 0.08 * len(text) + 0.5
        segments.append(Segment(round(time, 3), round(time + length, 3), text))
        time += length + (0.0 if index == 2 else 0.7)  # one pair of segments touching
    segments.append(Segment(3 * 3600 + 7.25, 3 * 3600 + 9.5, texts[29]))  # past hour 1
    return segments


def _seconds(timestamp: str) -> float:
    hours, minutes, seconds = timestamp.replace(",", ".").split(":")
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def _check_cues(parsed: list[tuple[float, float, str]], segments: list[Segment], code: str) -> None:
    """Monotonic, not overlapping, each segment covered exactly by its cues, text intact."""
    for (start, end, _), (next_start, _, _) in zip(parsed, parsed[1:]):
        assert start <= end <= next_start
    counted = 0
    for segment in segments:
        mine = [cue for cue in parsed if segment.start - 5e-4 <= cue[0] and cue[1] <= segment.end + 5e-4]
        counted += len(mine)
        assert mine, f"no cue for {segment}"
        assert mine[0][0] == pytest.approx(segment.start, abs=5e-4)
        assert mine[-1][1] == pytest.approx(segment.end, abs=5e-4)
        for earlier, later in zip(mine, mine[1:]):
            assert earlier[1] == later[0]  # a long segment's cues follow each other without a gap
        lines = [line for cue in mine for line in cue[2].split("\n")]
        assert all(_width(line) <= MAX_LINE for line in lines)
        assert all(len(cue[2].split("\n")) <= MAX_LINES for cue in mine)
        joiner = "" if code in UNSPACED else " "
        assert joiner.join(lines) == " ".join(segment.text.split())
        if len(mine) > 1:  # time shared in proportion to characters
            for start, end, text in mine:
                share = len(text.replace("\n", "").replace(" ", "")) / len(segment.text.replace(" ", ""))
                assert end - start == pytest.approx(share * (segment.end - segment.start), abs=0.01)
    assert counted == len(parsed)


@pytest.mark.parametrize("code", LANGUAGES)
def test_srt_parses_and_round_trips(tmp_path, code):
    segments = _segments(code)
    path = tmp_path / "out.srt"
    write_srt(path, segments)
    parsed = list(srt.parse(path.read_text(encoding="utf-8")))
    assert [subtitle.index for subtitle in parsed] == list(range(1, len(parsed) + 1))
    assert len(parsed) > len(segments)  # the long segments took several cues
    _check_cues([(item.start.total_seconds(), item.end.total_seconds(), item.content) for item in parsed], segments, code)


@pytest.mark.parametrize("code", LANGUAGES)
def test_vtt_parses_and_round_trips(tmp_path, code):
    segments = _segments(code)
    path = tmp_path / "out.vtt"
    write_vtt(path, segments)
    assert path.read_text(encoding="utf-8").startswith("WEBVTT\n\n")
    parsed = webvtt.read(str(path))
    _check_cues([(_seconds(cue.start), _seconds(cue.end), html.unescape(cue.text)) for cue in parsed], segments, code)


def test_markup_characters_survive_webvtt():
    segments = [Segment(0, 2, "a <b> & c --> d"), Segment(2, 3, "x > y")]
    text = vtt_text(segments)
    assert "a &lt;b&gt; &amp; c --&gt; d" in text and "<b>" not in text
    parsed = webvtt.from_string(text)
    assert [html.unescape(cue.text) for cue in parsed] == ["a <b> & c --> d", "x > y"]


def test_timestamps():
    assert format_timestamp(0) == "00:00:00,000"
    assert format_timestamp(3661.2345) == "01:01:01,235"
    assert format_timestamp(59.9996, ".") == "00:01:00.000"
    assert format_timestamp(100 * 3600 + 0.001) == "100:00:00,001"
    with pytest.raises(ValueError):
        format_timestamp(-0.5)


def test_lines_are_balanced_and_cjk_counts_double():
    text = "The quick brown fox jumps over the lazy dog near the river bank"  # 63 columns
    lines = wrap(text)
    assert len(lines) == 2 and abs(len(lines[0]) - len(lines[1])) <= 8
    chinese = "今天天气很好。我想要一杯咖啡。你能帮我吗？商店六点关门。"
    lines = wrap(chinese)
    assert all(_width(line) <= MAX_LINE for line in lines) and "".join(lines) == chinese
    assert not any(line.startswith(("。", "？")) for line in lines)
    assert wrap("x" * 100) == ["x" * 42, "x" * 42, "x" * 16]  # a word wider than a line is broken where it must


def test_bad_segments_are_refused_and_empty_ones_left_out():
    with pytest.raises(ValueError, match="overlap"):
        cues([Segment(0, 2, "a"), Segment(1.5, 3, "b")])
    with pytest.raises(ValueError, match="ends before"):
        cues([Segment(2, 1, "a")])
    assert cues([Segment(0, 1, "  \n "), Segment(1, 2, "b")]) == [Segment(1, 2, "b")]


def test_files_are_replaced_whole(tmp_path):
    path = tmp_path / "out.srt"
    path.write_text("old content that is much longer than the new one " * 20)
    write_srt(path, [Segment(0, 1, "new")])
    assert path.read_text() == "1\n00:00:00,000 --> 00:00:01,000\nnew\n"
    assert [entry.name for entry in tmp_path.iterdir()] == ["out.srt"]
    write_vtt(tmp_path / "empty.vtt", [])
    assert (tmp_path / "empty.vtt").read_text() == "WEBVTT\n"

"""Checks of one model output, shared by evaluation and the long-recording path: a decoding loop,
an empty output, a malformed SRT output, an output in the wrong language."""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np

from mcat_ds.languages import L70, get_language
from mcat_ds.optional import require
from mcat_ds.prompts import TAG_PATTERN, split_srt_output

# --- decoding loops -----------------------------------------------------------------------------

LOOP_REPEATS = 4
"""A short n-gram (up to LOOP_NGRAM units) this many times in a row is a loop."""
LOOP_NGRAM = 4
LOOP_COVERAGE = 0.5
LOOP_COVERAGE_REPEATS = 3
LOOP_COVERAGE_UNITS = 8
"""An n-gram of any length repeated LOOP_COVERAGE_REPEATS times in a row over at least
LOOP_COVERAGE of the output and LOOP_COVERAGE_UNITS units is a loop too (a whole sentence said
three times; not "No, no, no.")."""

_UNIT = re.compile(f"{TAG_PATTERN.pattern}|(?:(?!{TAG_PATTERN.pattern})\\S)+")
"""A language tag, or a run of non-space characters up to the next tag."""


def loop_units(text: str) -> list[str]:
    """What loops are counted in: words (case-folded, without the punctuation around them), each
    character of scripts written without spaces (CJK, Thai, Lao, Khmer, Burmese), and each language
    tag. Pure punctuation counts as nothing."""
    units: list[str] = []

    def add(word: str) -> None:
        start, end = 0, len(word)
        while start < end and unicodedata.category(word[start])[0] in "PS":
            start += 1
        while end > start and unicodedata.category(word[end - 1])[0] in "PS":
            end -= 1
        if end > start:
            units.append(word[start:end])

    for match in _UNIT.finditer(text):
        token = match.group(0)
        if TAG_PATTERN.fullmatch(token):
            units.append(token)
            continue
        word = ""
        for char in token.casefold():
            if _unspaced(char):
                add(word)
                word = ""
                units.append(char)
            else:
                word += char
        add(word)
    return units


def decoding_loop(
    text: str,
    repeats: int = LOOP_REPEATS,
    max_ngram: int = LOOP_NGRAM,
    coverage: float = LOOP_COVERAGE,
    coverage_repeats: int = LOOP_COVERAGE_REPEATS,
    coverage_units: int = LOOP_COVERAGE_UNITS,
) -> bool:
    """Whether the output repeats itself the way a decoder stuck in a loop does, in units of
    :func:`loop_units`: an n-gram of 1 to ``max_ngram`` units ``repeats`` times or more in a row
    ("la la la la", "谢谢谢谢"), or an n-gram of any length ``coverage_repeats`` times or more in a
    row covering at least ``coverage`` of the output and ``coverage_units`` units ("I am hungry. I am
    hungry. I am hungry.").
    Doubled words and a sentence said twice are not loops; a copy cut short at the end (the
    decoder ran out of tokens) is not counted, the whole ones are."""
    units = loop_units(text)
    if len(units) < min(repeats, coverage_repeats):
        return False
    numbering: dict[str, int] = {}
    ids = np.asarray([numbering.setdefault(unit, len(numbering)) for unit in units])
    for n in range(1, len(units) // min(repeats, coverage_repeats) + 1):
        same = ids[n:] == ids[:-n]  # unit i equals unit i + n: inside a run of period n
        for length in _run_lengths(same):
            copies = (length + n) // n
            covered = copies * n
            if (n <= max_ngram and copies >= repeats) or (
                copies >= coverage_repeats and covered >= coverage * len(units) and covered >= coverage_units
            ):
                return True
    return False


def _run_lengths(flags: np.ndarray) -> np.ndarray:
    """Lengths of the runs of True."""
    padded = np.concatenate(([False], flags, [False])).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return edges[1::2] - edges[::2]


def _unspaced(char: str) -> bool:
    if unicodedata.east_asian_width(char) in ("W", "F") and unicodedata.category(char).startswith("L"):
        return True
    return unicodedata.name(char, "").startswith(("THAI ", "LAO ", "KHMER ", "MYANMAR "))


# --- empty and malformed outputs ----------------------------------------------------------------


def is_empty(text: str) -> bool:
    """Nothing but whitespace, punctuation, symbols and language tags: no letter or digit."""
    return not any(unicodedata.category(char)[0] in "LN" for char in TAG_PATTERN.sub("", text))


def srt_malformed(output: str, src: str, tgt: str) -> bool:
    """An SRT output that is not ``transcript<|src|><|tgt|>translation`` with this pair of tags
    exactly once between a non-empty transcript and translation (split_srt_output's well_formed)."""
    return not split_srt_output(output, src, tgt).well_formed


# --- output language ----------------------------------------------------------------------------

LanguageCheck = Literal["ok", "off_target", "unchecked"]

MIN_LETTERS = 8
"""Shorter texts are not judged. Letters (and marks) are counted, a CJK ideograph, kana or hangul
syllable as 3: it carries about a word. Of the 360 demo sentences this leaves out 6 ("Bonjour.",
"J'ai faim.", "À demain." and three Arabic ones); with LANGUAGE_MARGIN, no text of the rest in the
right language was called off-target, detecting among the 9 demo languages or among all 58."""
LANGUAGE_MARGIN = 0.2
"""An output is off-target only when lingua rates the expected language below this fraction of its
top language's confidence; closer calls are "unchecked". Among all 58 candidates lingua takes 13 of
the demo sentences long enough to judge for a near neighbour (Spanish "Me llamo Anna." for
Hungarian, German "Regnet es morgen?" for Bokmål), yet rates the right language at 0.24 of the top
one or more; a sentence truly in another demo language rates the expected one below 0.2 in 2826 of
2880 pairs."""

_LINGUA_CODES = {"cmn": "ZHO", "yue": "ZHO", "azj": "AZE", "swh": "SWA"}
"""Our codes that lingua spells otherwise. lingua has one Chinese: Cantonese written in Chinese
characters is 'Chinese' too, so a Mandarin output for a Cantonese target passes."""


@functools.lru_cache(maxsize=None)
def lingua_language(code: str):
    """lingua's Language for one of our ISO 639-3 codes, or None where lingua does not know it
    (12 of our 70: amh asm glg jav kan khm kir lao mal mya npi uzb)."""
    lingua = _lingua()
    name = _LINGUA_CODES.get(get_language(code).code, code.upper())
    try:
        return lingua.Language.from_iso_code_639_3(lingua.IsoCode639_3.from_str(name))
    except ValueError:
        return None


def output_language(text: str, expected: str, candidates: Iterable[str] | None = None) -> LanguageCheck:
    """Whether ``text`` is in the language ``expected`` (one of our codes).

    ``candidates``: the languages an output might be in instead (for example a run's sources and
    targets); default: all of ours lingua knows. The detector is built once per set of candidates,
    lazily: lingua loads a language's models the first time a text in its script needs them.
    Measured on a shared 2-core CPU, first detections in the 6 scripts of the demo languages: with
    those 9 as candidates 1.7 s and +150 MB of RSS; with all 58, 17 s and +960 MB (Latin alone is
    40 of them); later detections take about a millisecond each.

    "unchecked": lingua does not know ``expected``, the text is shorter than MIN_LETTERS, or the
    call is too close (LANGUAGE_MARGIN).
    """
    return output_languages([text], [expected], candidates)[0]


def output_languages(texts: Sequence[str], expected: Sequence[str],
                     candidates: Iterable[str] | None = None) -> list[LanguageCheck]:
    """:func:`output_language` of many texts at once (``expected[i]`` for ``texts[i]``): one
    detector, the texts judged on all cores (lingua's parallel call), for scoring whole test sets."""
    if len(texts) != len(expected):
        raise ValueError(f"{len(texts)} texts but {len(expected)} expected languages")
    verdicts: list[LanguageCheck] = ["unchecked"] * len(texts)
    targets = [lingua_language(code) for code in expected]
    cleaned = [TAG_PATTERN.sub(" ", text) for text in texts]
    judged = [index for index, (target, text) in enumerate(zip(targets, cleaned))
              if target is not None and _letters(text) >= MIN_LETTERS]
    if not judged:
        return verdicts
    pool = L70 if candidates is None else candidates
    known = {language for code in pool if (language := lingua_language(code))}
    detector = _detector(frozenset(known | {targets[index] for index in judged}))
    values = detector.compute_language_confidence_values_in_parallel([cleaned[index] for index in judged])
    for index, confidences in zip(judged, values):
        verdicts[index] = _verdict(confidences, targets[index])
    return verdicts


def _verdict(confidences, target) -> LanguageCheck:
    if not confidences:
        return "unchecked"
    top = confidences[0]
    if top.language == target:
        return "ok"
    expected_confidence = next((value.value for value in confidences if value.language == target), 0.0)
    return "off_target" if expected_confidence < LANGUAGE_MARGIN * top.value else "unchecked"


def _letters(text: str) -> int:
    return sum(3 if unicodedata.east_asian_width(char) in ("W", "F") else 1
               for char in text if unicodedata.category(char)[0] in "LM")


@functools.lru_cache(maxsize=4)
def _detector(languages: frozenset):
    return _lingua().LanguageDetectorBuilder.from_languages(*languages).build()


def _lingua():
    return require("lingua")  # imported on first use: building its detector is the slow part, not this

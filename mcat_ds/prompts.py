"""Instructions and targets of the three tasks (paper Table III), and parsing SRT outputs.

| task | speech | instruction (prompt)         | prediction (target)                      |
|------|--------|------------------------------|------------------------------------------|
| ASR  | yes    | ``<|src|>``                  | transcript                               |
| SMT  | yes    | transcript ``<|src|><|tgt|>``| translation                              |
| SRT  | yes    | ``<|src|><|tgt|>``           | transcript ``<|src|><|tgt|>`` translation |

The SRT target is the release's ``gt`` field format.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from mcat_ds.config import Task
from mcat_ds.languages import get_language

TAG_PATTERN = re.compile(r"<\|([a-z]{3})\|>")
_TAG_RUN = re.compile(r"(?:<\|[a-z]{3}\|>)+")
_TRAILING_PARTIAL_TAG = re.compile(r"<(?:\|[a-z]{0,3}\|?)?$")


def tag(code: str) -> str:
    return get_language(code).tag


def build_prompt(task: Task, src: str, tgt: str | None = None, *, transcript: str | None = None) -> str:
    """The instruction text that follows the speech tokens."""
    if task == "asr":
        return tag(src)
    if tgt is None:
        raise ValueError(f"task {task} needs a target language")
    pair = tag(src) + tag(tgt)
    if task == "srt":
        return pair
    if task == "smt":
        if transcript is None:
            raise ValueError("task smt needs the transcript as part of its instruction")
        return transcript + pair
    raise ValueError(f"unknown task {task!r}; tasks are asr, smt, srt")


def build_target(
    task: Task, src: str, tgt: str | None = None, *, transcript: str | None = None, translation: str | None = None
) -> str:
    """The text the model must predict (the end-of-sequence token is added at tokenization)."""
    if task == "asr":
        if transcript is None:
            raise ValueError("task asr needs a transcript")
        return transcript
    if translation is None:
        raise ValueError(f"task {task} needs a translation")
    if task == "smt":
        return translation
    if task == "srt":
        if transcript is None:
            raise ValueError("task srt needs a transcript")
        return transcript + tag(src) + tag(tgt) + translation
    raise ValueError(f"unknown task {task!r}; tasks are asr, smt, srt")


@dataclass(frozen=True)
class SRTOutput:
    transcript: str
    translation: str
    well_formed: bool
    """Exactly one tag pair (the expected one when known) between a transcript and a translation."""


def split_srt_output(text: str, src: str | None = None, tgt: str | None = None) -> SRTOutput:
    """Split ``transcript<|src|><|tgt|>translation`` back into its parts, tolerating malformed text.

    - no tags at all: the whole text stands for both parts (what the release's scorer does);
    - repeated tags or a repeated translation (a decoding loop): the transcript is what precedes the
      first tag run and the translation is the first non-empty piece after it;
    - a tag cut off at the end of the text (``...<|de``) is dropped.
    """
    cleaned = _TRAILING_PARTIAL_TAG.sub("", text)
    runs = list(_TAG_RUN.finditer(cleaned))
    if not runs:
        stripped = cleaned.strip()
        return SRTOutput(stripped, stripped, well_formed=False)
    transcript = cleaned[: runs[0].start()].strip()
    pieces = [piece.strip() for piece in _TAG_RUN.split(cleaned[runs[0].end() :])]
    translation = next((piece for piece in pieces if piece), "")
    expected = None if src is None or tgt is None else tag(src) + tag(tgt)
    well_formed = (
        len(runs) == 1
        and len(TAG_PATTERN.findall(runs[0].group())) == 2
        and (expected is None or runs[0].group() == expected)
        and bool(transcript)
        and bool(translation)
        and cleaned == text
    )
    return SRTOutput(transcript, translation, well_formed)


SRTSplitRule = Literal["first", "release"]


def split_srt_output_release(text: str, src: str, tgt: str) -> SRTOutput:
    """The release's scorer (``evaluation/test_metric_n.py``): split on the prompt's own tag pair;
    exactly one occurrence gives (transcript, translation), anything else takes the whole text as the
    transcript and the text after the last ``|>`` as the translation."""
    pair = tag(src) + tag(tgt)
    pieces = text.split(pair)
    if len(pieces) == 2:
        transcript, translation = pieces[0].strip(), pieces[1].strip()
        return SRTOutput(transcript, translation, well_formed=bool(transcript) and bool(translation))
    return SRTOutput(text.strip(), text.split("|>")[-1].strip(), well_formed=False)


def split_srt(text: str, src: str, tgt: str, rule: SRTSplitRule = "first") -> SRTOutput:
    """``first``: :func:`split_srt_output` (the first piece after the first tag run); ``release``:
    :func:`split_srt_output_release` (the text after the last ``|>``)."""
    if rule == "release":
        return split_srt_output_release(text, src, tgt)
    if rule == "first":
        return split_srt_output(text, src, tgt)
    raise ValueError(f"unknown SRT split rule {rule!r}; rules are first, release")

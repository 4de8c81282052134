"""What users have: the release's JSONL manifests, FLEURS-style folders, and our own JSONL.

Each reader yields :class:`Utterance` records (one per audio file, with every translation known for
it) and :class:`Skipped` entries for input that cannot be used, naming the file, the line and why.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mcat_ds.languages import BY_CODE, BY_FLEURS_LOCALE

_TAG_PAIR = re.compile(r"^<\|([a-z]{3})\|><\|([a-z]{3})\|>$")
OWN_FIELDS = {"audio", "language", "transcript", "translations", "id"}


@dataclass
class Utterance:
    key: str
    """Unique sample key in the shards (webdataset keys hold no dots)."""
    audio: Path
    language: str
    transcript: str
    translations: dict[str, str] = field(default_factory=dict)
    origin: str = ""
    """Where the record came from (manifest path or FLEURS tsv), for reports."""
    line: int | None = None


@dataclass(frozen=True)
class Skipped:
    file: str
    reason: str
    line: int | None = None
    language: str | None = None
    origin: str | None = None
    """The manifest that named ``file`` when ``file`` is an audio file."""

    def to_json(self) -> dict:
        entry = {"file": self.file, "reason": self.reason}
        if self.line is not None:
            entry["line"] = self.line
        if self.origin is not None:
            entry["manifest"] = self.origin
        if self.language is not None:
            entry["language"] = self.language
        return entry


def _key(language: str, name: str) -> str:
    return f"{language}_{re.sub(r'[^A-Za-z0-9_-]', '_', name)}"


def _hashed_key(language: str, relative: str) -> str:
    return _key(language, hashlib.sha1(relative.encode("utf-8")).hexdigest()[:20])


def resolve_inside(root: Path, relative: str) -> Path | None:
    """The path under ``root``, or None when it would leave the root (``..``, absolute, links) or
    cannot name a file at all (a NUL character)."""
    if "\x00" in relative:
        return None
    root = root.resolve()
    path = (root / relative).resolve()
    return path if path == root or root in path.parents else None


def read_manifest(manifest: Path, audio_root: Path) -> Iterator[Utterance | Skipped]:
    """A JSONL manifest in the release's format or ours, detected line by line.

    Release lines (``prompt``, ``gt``, ``source``, ``audio``) that name the same audio file are merged
    into one utterance holding all their translations.
    """
    merged: dict[Path, Utterance] = {}
    for number, raw in _text_lines(manifest):
        where = dict(file=str(manifest), line=number)
        if isinstance(raw, UnicodeDecodeError):
            yield Skipped(reason=f"malformed manifest line: {describe_bad_utf8(raw)}", **where)
            continue
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as error:
            yield Skipped(reason=f"malformed manifest line: not JSON ({error.msg})", **where)
            continue
        except RecursionError:
            yield Skipped(reason="malformed manifest line: not JSON (nested too deeply)", **where)
            continue
        if not isinstance(record, dict):
            yield Skipped(reason="malformed manifest line: not a JSON object", **where)
            continue
        release = "gt" in record or "prompt" in record
        parsed = _parse_release_line(record) if release else _parse_own_line(record)
        if isinstance(parsed, str):
            yield _skipped_line(record, parsed, _line_language(record, release), manifest, number, audio_root)
            continue
        language, relative, transcript, translations = parsed
        audio = resolve_inside(audio_root, relative)
        if audio is None:
            yield Skipped(reason=f"audio path outside the audio root: {relative!r} leaves {audio_root}",
                          language=language, **where)
            continue
        previous = merged.get(audio)
        if previous is None:
            key = record.get("id") if isinstance(record.get("id"), str) else None
            merged[audio] = Utterance(
                key=_key(language, key) if key else _hashed_key(language, relative),
                audio=audio, language=language, transcript=transcript, translations=dict(translations),
                origin=str(manifest), line=number,
            )
        elif (previous.language, previous.transcript) != (language, transcript):
            yield Skipped(
                reason=f"conflicting manifest line: audio {relative!r} has another language or transcript on line {previous.line}",
                language=language, **where,
            )
        else:
            previous.translations.update(translations)
    yield from merged.values()


def _text_lines(path: Path) -> Iterator[tuple[int, str | UnicodeDecodeError]]:
    """(number, text) for each line, or the decoding error for a line that is not UTF-8: one bad
    byte costs its line, not the whole file."""
    with open(path, "rb") as lines:
        for number, raw in enumerate(lines, start=1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as error:
                yield number, error


def describe_bad_utf8(error: UnicodeDecodeError) -> str:
    """'not UTF-8 (byte 0xff at column 7)': the first bad byte and its place, for a report."""
    column = len(error.object[:error.start].decode("utf-8", errors="replace")) + 1
    return f"not UTF-8 (byte 0x{error.object[error.start]:02x} at column {column})"


def _skipped_line(record: dict, reason: str, language: str | None, manifest: Path, line: int,
                  audio_root: Path) -> Skipped:
    """A rejected line names its audio file (and the manifest and line) when the line is well formed
    and names one inside the root, like the audio it could not use; otherwise the manifest itself."""
    relative = record.get("audio")
    audio = resolve_inside(audio_root, relative) if isinstance(relative, str) and relative else None
    if audio is None or reason.startswith("malformed manifest line"):
        return Skipped(file=str(manifest), line=line, reason=reason, language=language)
    return Skipped(file=str(audio), line=line, reason=reason, language=language, origin=str(manifest))


def _line_language(record: dict, release: bool) -> str | None:
    """The language a rejected line was about, when it says so clearly (for per-language counts)."""
    if release:
        match = _TAG_PAIR.match(str(record.get("prompt", "")))
        code = match.group(1) if match else None
    else:
        code = record.get("language")
    return code if isinstance(code, str) and code in BY_CODE else None


def _parse_release_line(record: dict) -> tuple[str, str, str, dict[str, str]] | str:
    missing = [name for name in ("prompt", "gt", "audio") if not isinstance(record.get(name), str)]
    if missing:
        return f"malformed manifest line: missing or non-string field(s) {', '.join(missing)}"
    match = _TAG_PAIR.match(record["prompt"])
    if not match:
        return f"malformed manifest line: prompt {record['prompt']!r} is not '<|src|><|tgt|>'"
    src, tgt = match.groups()
    for code in (src, tgt):
        if code not in BY_CODE:
            return f"unknown language: {code!r} in prompt {record['prompt']!r}"
    parts = record["gt"].split(record["prompt"])
    if len(parts) != 2:
        return f"malformed manifest line: gt does not hold the tag pair {record['prompt']} exactly once"
    transcript, translation = (part.strip() for part in parts)
    if not transcript:
        return "empty transcript"
    translations = {tgt: translation} if translation and tgt != src else {}
    return src, record["audio"], transcript, translations


def _parse_own_line(record: dict) -> tuple[str, str, str, dict[str, str]] | str:
    unknown = sorted(set(record) - OWN_FIELDS)
    if unknown:
        return f"malformed manifest line: unknown field(s) {', '.join(unknown)} (fields: {', '.join(sorted(OWN_FIELDS))})"
    missing = [name for name in ("audio", "language", "transcript") if not isinstance(record.get(name), str)]
    if missing:
        return f"malformed manifest line: missing or non-string field(s) {', '.join(missing)}"
    language = record["language"]
    if language not in BY_CODE:
        return f"unknown language: {language!r}"
    transcript = record["transcript"].strip()
    if not transcript:
        return "empty transcript"
    translations = record.get("translations", {})
    if not isinstance(translations, dict) or not all(isinstance(v, str) for v in translations.values()):
        return "malformed manifest line: translations must map language codes to strings"
    unknown_targets = sorted(code for code in translations if code not in BY_CODE)
    if unknown_targets:
        return f"unknown language: {', '.join(map(repr, unknown_targets))} in translations"
    kept = {code: text.strip() for code, text in translations.items() if text.strip() and code != language}
    return language, record["audio"], transcript, kept


FLEURS_COLUMNS = 7
"""id, file name, raw transcription, normalized transcription, characters, samples, gender."""


def read_fleurs(root: Path, split: str) -> Iterator[Utterance | Skipped]:
    """A FLEURS-style folder: ``<locale>/<split>.tsv`` and ``<locale>/audio/<split>/<file>``.

    The raw (cased, punctuated) transcription is the transcript. FLEURS speaks the same sentence ids
    in every language, so an utterance's translations are the other languages' transcripts of its id
    in the same split.
    """
    rows: list[tuple[str, Path, int, list[str]]] = []
    by_id: dict[str, dict[str, str]] = defaultdict(dict)
    tables = sorted(root.glob(f"*/{split}.tsv"))
    if not tables:
        yield Skipped(file=str(root), reason=f"not a FLEURS-style folder: no <locale>/{split}.tsv files")
        return
    for table in tables:
        locale = table.parent.name
        language = BY_FLEURS_LOCALE.get(locale)
        if language is None:
            yield Skipped(file=str(table), reason=f"unsupported FLEURS locale: {locale!r} is not one of the 70 languages")
            continue
        for number, text in _text_lines(table):
            if isinstance(text, UnicodeDecodeError):
                yield Skipped(file=str(table), line=number, language=language.code,
                              reason=f"malformed tsv row: {describe_bad_utf8(text)}")
                continue
            # FLEURS quotes nothing: a row is its line split at tabs (as csv's QUOTE_NONE reads it)
            text = text.rstrip("\r\n")
            cells = text.split("\t") if text else []
            if len(cells) != FLEURS_COLUMNS:
                yield Skipped(file=str(table), line=number, language=language.code,
                              reason=f"malformed tsv row: {len(cells)} columns, expected {FLEURS_COLUMNS}")
                continue
            sentence, transcript = cells[0], cells[2].strip()
            by_id[sentence].setdefault(language.code, transcript)
            rows.append((language.code, table, number, cells))
    for code, table, number, cells in rows:
        sentence, file_name, transcript = cells[0], cells[1], cells[2].strip()
        audio = resolve_inside(table.parent / "audio" / split, file_name)
        if audio is None:
            yield Skipped(file=str(table), line=number, language=code,
                          reason=f"audio path outside the audio root: {file_name!r} leaves the locale's audio folder")
            continue
        if not transcript:
            yield Skipped(file=str(audio), line=number, language=code, origin=str(table), reason="empty transcript")
            continue
        translations = {other: text for other, text in by_id[sentence].items() if other != code and text}
        yield Utterance(
            key=_key(code, Path(file_name).stem), audio=audio, language=code, transcript=transcript,
            translations=translations, origin=str(table), line=number,
        )

"""Reading prepared shards: the index, and samples by byte range.

The shards are plain webdataset tars (any webdataset pipeline streams them); ``index.jsonl`` adds
each member's byte range so that a sample is one seek and one read. That makes the epoch order a
free choice (a global seeded shuffle across all shards and languages) and resuming exact: the
position in the stream is a number, not the state of shuffle buffers.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from mcat_ds.data.prepare import INDEX_CHECK_FILE, INDEX_FILE
from mcat_ds.data.sources import describe_bad_utf8, resolve_inside


@dataclass(frozen=True)
class IndexEntry:
    key: str
    shard: str
    audio: tuple[int, int]
    meta: tuple[int, int]
    language: str
    seconds: float
    chars: int
    translations: tuple[str, ...]


class DataError(ValueError):
    pass


def load_index(directory: str | Path) -> list[IndexEntry]:
    """The samples of a prepared directory, in index order.

    Every line must be a whole entry whose shard lies inside ``directory``; where prepare recorded
    the index's entry count and sha256 (``index.check.json``), a cut or changed index is refused
    too. Each problem raises DataError naming the file (and the line).
    """
    directory = Path(directory)
    path = directory / INDEX_FILE
    if not path.is_file():
        raise DataError(f"{directory} holds no {INDEX_FILE}: prepare it first with `mcat prepare`")
    entries, digest = [], hashlib.sha256()
    root, shards_inside = directory.resolve(), {}
    with open(path, "rb") as lines:
        for number, raw in enumerate(lines, start=1):
            digest.update(raw)
            try:
                entry = _index_entry(raw)
            except UnicodeDecodeError as error:
                raise DataError(f"{path}:{number}: damaged index line ({describe_bad_utf8(error)})") from None
            except (json.JSONDecodeError, RecursionError, KeyError, TypeError, ValueError) as error:
                raise DataError(f"{path}:{number}: damaged index line ({type(error).__name__}: {error})") from None
            if entry.shard not in shards_inside:
                inside = resolve_inside(directory, entry.shard)
                shards_inside[entry.shard] = inside is not None and inside != root
            if not shards_inside[entry.shard]:
                raise DataError(f"{path}:{number}: shard {entry.shard!r} does not name a file inside {directory}")
            entries.append(entry)
    _check_index(directory, len(entries), digest.hexdigest())
    return entries


def _index_entry(raw: bytes) -> IndexEntry:
    record = json.loads(raw.decode("utf-8"))
    entry = IndexEntry(
        key=record["key"], shard=record["shard"], audio=_byte_range(record["audio"]),
        meta=_byte_range(record["meta"]), language=record["language"], seconds=float(record["seconds"]),
        chars=int(record["chars"]), translations=tuple(record["translations"]),
    )
    if not all(isinstance(text, str) for text in (entry.key, entry.shard, entry.language)):
        raise TypeError("key, shard and language must be strings")
    if not isinstance(record["translations"], list) or not all(isinstance(code, str) for code in entry.translations):
        raise TypeError("translations must be a list of language codes")
    return entry


def _byte_range(value) -> tuple[int, int]:
    if isinstance(value, list) and len(value) == 2 and all(type(number) is int and number >= 0 for number in value):
        return value[0], value[1]
    raise ValueError(f"byte range {value!r} is not [offset, size]")


def _check_index(directory: Path, entries: int, sha256: str) -> None:
    """Compares the index with what prepare recorded of it; indexes from before the record pass."""
    path, check = directory / INDEX_FILE, directory / INDEX_CHECK_FILE
    if not check.exists():
        return
    try:
        recorded = json.loads(check.read_bytes().decode("utf-8"))
        expected, expected_sha256 = int(recorded["entries"]), str(recorded["sha256"])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise DataError(f"{check}: damaged ({type(error).__name__}: {error}); prepare the data again") from None
    advice = f"prepare the data again, or delete {check.name} if the index was edited on purpose"
    if entries != expected:
        raise DataError(f"{path}: {entries} entries, but {check.name} records {expected}: "
                        f"the index was cut short or changed; {advice}")
    if sha256 != expected_sha256:
        raise DataError(f"{path}: its sha256 differs from the one {check.name} records: "
                        f"the index was damaged or changed; {advice}")


class ShardReader:
    """Reads byte ranges from shard files, keeping a few open (one reader per DataLoader worker)."""

    def __init__(self, directory: str | Path, max_open: int = 16):
        self.directory = Path(directory)
        self.max_open = max_open
        self._open: OrderedDict[str, object] = OrderedDict()

    def read(self, shard: str, span: tuple[int, int]) -> bytes:
        handle = self._open.pop(shard, None)
        if handle is None:
            try:
                handle = open(self.directory / shard, "rb")
            except OSError as error:
                raise DataError(f"{self.directory / shard}: cannot open ({error.strerror})") from None
            if len(self._open) >= self.max_open:
                self._open.popitem(last=False)[1].close()
        self._open[shard] = handle
        offset, size = span
        handle.seek(offset)
        data = handle.read(size)
        if len(data) != size:
            raise DataError(f"{self.directory / shard}: truncated at byte {offset + len(data)} (wanted {size} bytes)")
        return data

    def close(self) -> None:
        for handle in self._open.values():
            handle.close()
        self._open.clear()

    def __getstate__(self) -> dict:
        # Open files do not cross into worker processes; each worker opens its own.
        return {"directory": self.directory, "max_open": self.max_open, "_open": OrderedDict()}


def read_sample_meta(reader: ShardReader, entry: IndexEntry) -> dict:
    """A sample's metadata from its shard: a dict with a str ``transcript`` and ``translations``
    mapping language codes to str. Anything else raises DataError naming the shard and the key."""
    where = f"{reader.directory / entry.shard}: sample {entry.key}"
    blob = reader.read(entry.shard, entry.meta)
    try:
        meta = json.loads(blob.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise DataError(f"{where}: metadata is {describe_bad_utf8(error)}") from None
    except (json.JSONDecodeError, RecursionError) as error:
        raise DataError(f"{where}: metadata is not JSON ({error})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{where}: metadata is not a JSON object")
    if not isinstance(meta.get("transcript"), str):
        raise DataError(f"{where}: metadata has no transcript string")
    translations = meta.get("translations")
    if not isinstance(translations, dict) or not all(isinstance(text, str) for text in translations.values()):
        raise DataError(f"{where}: metadata translations do not map language codes to strings")
    return meta

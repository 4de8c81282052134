"""Reading prepared shards: the index, and samples by byte range.

The shards are plain webdataset tars (any webdataset pipeline streams them); ``index.jsonl`` adds
each member's byte range so that a sample is one seek and one read. That makes the epoch order a
free choice (a global seeded shuffle across all shards and languages) and resuming exact: the
position in the stream is a number, not the state of shuffle buffers.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from mcat_ds.data.prepare import INDEX_FILE


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
    """The samples of a prepared directory, in index order."""
    directory = Path(directory)
    path = directory / INDEX_FILE
    if not path.is_file():
        raise DataError(f"{directory} holds no {INDEX_FILE}: prepare it first with `mcat prepare`")
    entries = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            try:
                record = json.loads(line)
                entries.append(IndexEntry(
                    key=record["key"], shard=record["shard"], audio=tuple(record["audio"]),
                    meta=tuple(record["meta"]), language=record["language"], seconds=float(record["seconds"]),
                    chars=int(record["chars"]), translations=tuple(record["translations"]),
                ))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
                raise DataError(f"{path}:{number}: damaged index line ({error})") from None
    return entries


class ShardReader:
    """Reads byte ranges from shard files, keeping a few open (one reader per DataLoader worker)."""

    def __init__(self, directory: str | Path, max_open: int = 16):
        self.directory = Path(directory)
        self.max_open = max_open
        self._open: OrderedDict[str, object] = OrderedDict()

    def read(self, shard: str, span: tuple[int, int]) -> bytes:
        handle = self._open.pop(shard, None)
        if handle is None:
            handle = open(self.directory / shard, "rb")
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

"""Bad bytes: every reader of user or prepared data, given a cut, flipped bytes or bytes that are not
UTF-8, reads what it can, reports what it cannot use with its file and line, or raises an error
naming the file; never a hang, never a bare UnicodeDecodeError, KeyError or TypeError."""

import io
import json
import random
import shutil
import signal

import numpy as np
import pytest
import soundfile

from mcat_ds.data.audio import AudioError, FeatureWindow, decode_audio, encode_flac
from mcat_ds.data.loader import ExampleDataset, LoadedExample, SkippedExample
from mcat_ds.data.plan import PlannedExample
from mcat_ds.data.prepare import INDEX_CHECK_FILE, INDEX_FILE
from mcat_ds.data.shards import load_index
from mcat_ds.data.sources import Skipped, Utterance, read_fleurs, read_manifest

VARIANTS = range(24)
NOT_UTF8 = (b"\xff", b"\xc3", b"\xe2\x82", b"\x80", b"\xed\xa0\x80")
"""A byte no UTF-8 text holds, a lead byte without its continuation, a stray continuation, a surrogate."""
CUT, FLIP, INSERT = range(3)


@pytest.fixture(autouse=True)
def no_hang():
    def expire(*_):
        raise TimeoutError("a reader hung on damaged input")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def damage(data: bytes, seed: int, start: int = 0, end: int | None = None) -> tuple[bytes, int, int]:
    """``data`` cut, with one to four bytes flipped, or with bytes that are not UTF-8 inserted, at
    seeded places between ``start`` and ``end``. Returns the damaged bytes, the kind and the place."""
    rng = random.Random(seed)
    kind, end = seed % 3, len(data) if end is None else end
    at = rng.randrange(start, end)
    if kind == CUT:
        return data[:at], kind, at
    if kind == FLIP:
        flipped = bytearray(data)
        for place in [at] + [rng.randrange(start, end) for _ in range(rng.randrange(4))]:
            flipped[place] ^= rng.randrange(1, 256)
        return bytes(flipped), kind, at
    return data[:at] + rng.choice(NOT_UTF8) + data[at:], kind, at


def line_of(data: bytes, at: int) -> int:
    return data[:at].count(b"\n") + 1


def read_or_named_error(read, path):
    """What ``read()`` returns, or None when it raised a ValueError (DataError, AudioError) naming ``path``."""
    try:
        return read()
    except ValueError as error:
        assert not isinstance(error, (UnicodeDecodeError, json.JSONDecodeError)), repr(error)
        assert str(path) in str(error), repr(error)
        return None


def assert_reported(records, path, kind, line):
    assert all(isinstance(record, (Utterance, Skipped)) for record in records)
    for record in records:
        if isinstance(record, Skipped):
            assert record.reason and record.file and (record.line is not None or record.file == str(path))
    if kind == INSERT:  # the line that holds the bad bytes is skipped and named, the others still read
        assert any(isinstance(record, Skipped) and record.line == line and "not UTF-8" in record.reason
                   and record.file == str(path) for record in records), records


MANIFEST_LINES = [
    {"audio": "a.wav", "language": "eng", "transcript": "Hello there.", "translations": {"deu": "Hallo.", "cmn": "你好。"}},
    {"prompt": "<|deu|><|eng|>", "gt": "Grüße aus Köln.<|deu|><|eng|>Greetings from Cologne.", "source": "x",
     "audio": "b.wav"},
    {"prompt": "<|deu|><|fra|>", "gt": "Grüße aus Köln.<|deu|><|fra|>Salutations de Cologne.", "source": "x",
     "audio": "b.wav"},
    {"audio": "c.wav", "language": "cmn", "transcript": "明天会下雨吗？", "id": "rain"},
    {"audio": "sub/d.flac", "language": "fra", "transcript": "Il va pleuvoir demain ?", "translations": {}},
]


@pytest.mark.parametrize("seed", VARIANTS)
def test_a_damaged_manifest_is_read_line_by_line(tmp_path, seed):
    original = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in MANIFEST_LINES).encode()
    data, kind, at = damage(original, seed)
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_bytes(data)
    records = read_or_named_error(lambda: list(read_manifest(manifest, tmp_path)), manifest)
    assert records is not None  # a manifest's problems are skipped lines, never an error
    assert_reported(records, manifest, kind, line_of(data, at))


def write_tsv(folder, rows):
    (folder / "audio" / "train").mkdir(parents=True)
    text = "".join("\t".join([sid, name, text, text.lower(), "x", "16000", "FEMALE"]) + "\n" for sid, name, text in rows)
    (folder / "train.tsv").write_bytes(text.encode())
    return folder / "train.tsv"


@pytest.mark.parametrize("seed", VARIANTS)
def test_a_damaged_fleurs_table_is_read_row_by_row(tmp_path, seed):
    write_tsv(tmp_path / "en_us", [("1", "1.wav", "Will it rain tomorrow?"), ("2", "2.wav", "Yes.")])
    table = write_tsv(tmp_path / "de_de", [("1", "10.wav", "Regnet es morgen?"), ("2", "11.wav", "Ja, größtenteils."),
                                           ("3", "12.wav", "Übermorgen nicht.")])
    data, kind, at = damage(table.read_bytes(), seed)
    table.write_bytes(data)
    records = read_or_named_error(lambda: list(read_fleurs(tmp_path, "train")), table)
    assert records is not None
    assert_reported(records, table, kind, line_of(data, at))


@pytest.mark.parametrize("with_check", [True, False])
@pytest.mark.parametrize("seed", VARIANTS)
def test_a_damaged_index_loads_or_is_refused_by_name(small_shards, tmp_path, seed, with_check):
    original = (small_shards / INDEX_FILE).read_bytes()
    data, _, _ = damage(original, seed)
    (tmp_path / INDEX_FILE).write_bytes(data)
    if with_check:
        shutil.copy(small_shards / INDEX_CHECK_FILE, tmp_path)
    entries = read_or_named_error(lambda: load_index(tmp_path), tmp_path / INDEX_FILE)
    if with_check and data != original:
        assert entries is None  # the recorded count and sha256 catch any change, even a whole-line cut


class ByteTokenizer:
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": list(text.encode())}


@pytest.mark.parametrize("seed", VARIANTS)
def test_a_damaged_shard_member_is_a_skipped_example_naming_the_shard(small_shards, tmp_path, seed):
    entries = load_index(small_shards)
    shard = entries[0].shard
    data_dir = tmp_path / "data"
    shutil.copytree(small_shards, data_dir)
    victim = random.Random(seed).choice([entry for entry in entries if entry.shard == shard])
    # the metadata, or the first bytes of the FLAC (its header: rate, length, block sizes)
    offset, size = victim.meta if seed % 2 else (victim.audio[0], min(victim.audio[1], 64))
    data, _, _ = damage((data_dir / shard).read_bytes(), seed, offset, offset + size)
    (data_dir / shard).write_bytes(data)
    plan = [PlannedExample(index, "srt" if entry.translations else "asr", entry.language,
                           entry.translations[0] if entry.translations else None)
            for index, entry in enumerate(entries) if entry.shard == shard]
    dataset = ExampleDataset(data_dir, entries, plan, ByteTokenizer(), FeatureWindow(80, 500))
    for index in range(len(dataset)):
        item = dataset[index]
        assert isinstance(item, (LoadedExample, SkippedExample))
        if isinstance(item, SkippedExample):
            assert shard in item.reason and item.key == entries[plan[index].entry].key


def audio_files() -> dict[str, bytes]:
    samples = (0.1 * np.random.default_rng(0).standard_normal(8000)).astype(np.float32)
    wav = io.BytesIO()
    soundfile.write(wav, samples, 22050, format="WAV", subtype="PCM_16")
    return {"wav": wav.getvalue(), "flac": encode_flac(samples)}


@pytest.mark.parametrize("seed", VARIANTS)
@pytest.mark.parametrize("kind", ["wav", "flac"])
def test_damaged_audio_decodes_or_raises_audio_error(seed, kind):
    original = audio_files()[kind]
    data, _, _ = damage(original, seed, 0, 128)  # where the headers are
    try:
        samples = decode_audio(data, max_seconds=30)
    except AudioError:
        return
    assert samples.dtype == np.float32 and 0 < samples.size <= 30 * 16000

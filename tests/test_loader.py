import json
import re
import shutil

import pytest
import torch
import transformers

from conftest import SENTENCES, SMALL_LANGUAGES
from mcat_ds.build import add_language_tags
from mcat_ds.data.audio import FeatureWindow, LogMelSpectrogram
from mcat_ds.data.loader import Collator, ExampleDataset, make_loader
from mcat_ds.data.plan import ExampleSelection, deal_to_rank, plan_epoch
from mcat_ds.data.shards import DataError, ShardReader, load_index, read_sample_meta
from mcat_ds.tiny import train_tokenizer

WINDOW = FeatureWindow(80, 500)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    train_tokenizer(SENTENCES + [f"{c} sentence {i}" for c in SMALL_LANGUAGES for i in range(6)], 500).save_pretrained(directory)
    loaded = transformers.AutoTokenizer.from_pretrained(directory)
    add_language_tags(loaded)
    return loaded


def loader_for(shards, tokenizer, selection, *, rank=0, world=1, start=0, workers=0, epoch=0, batch=3,
               features_in_workers=True):
    entries = load_index(shards)
    share = deal_to_rank(plan_epoch(entries, selection, seed=5, epoch=epoch), rank, world)
    dataset = ExampleDataset(shards, entries, share, tokenizer, WINDOW)
    collator = Collator(WINDOW, num_speech_tokens=30, pad_token_id=tokenizer.pad_token_id,
                        features_in_workers=features_in_workers)
    return make_loader(dataset, collator, batch, start, workers), share


def test_srt_examples_come_from_the_shard_metadata(small_shards, tokenizer):
    loader, share = loader_for(small_shards, tokenizer, ExampleSelection("srt", SMALL_LANGUAGES))
    batch = next(iter(loader))
    assert batch.features.shape == (3, 80, 500) and batch.llm.input_ids.shape[0] == 3
    for row, example in enumerate(batch.examples):
        sentence = batch.keys[row].split("_")[1]
        labels = batch.llm.labels[row]
        target = tokenizer.decode(labels[labels != -100][:-1])
        tags = f"<|{example.src}|><|{example.tgt}|>"
        assert target == f"{example.src} sentence {sentence}{tags}{example.tgt} sentence {sentence}"
        prompt = batch.llm.input_ids[row][30:][batch.llm.labels[row][30:] == -100]
        assert tokenizer.decode(prompt[prompt != tokenizer.pad_token_id], skip_special_tokens=True) == tags
    assert batch.consumed == 3 and batch.skipped == []
    assert (batch.feature_lengths > 0).all() and (batch.feature_lengths <= 500).all()


def keys_of(loader, limit=None):
    keys, consumed = [], 0
    for count, batch in enumerate(loader):
        if limit is not None and count == limit:
            break
        keys.extend((k, e.tgt) for k, e in zip(batch.keys, batch.examples))
        consumed += batch.consumed
    return keys, consumed


@pytest.mark.parametrize("workers", [0, 2])
def test_two_ranks_are_disjoint_and_a_restart_resumes_exactly(small_shards, tokenizer, workers):
    selection = ExampleSelection("srt", SMALL_LANGUAGES)
    uninterrupted = {}
    for rank in (0, 1):
        loader, share = loader_for(small_shards, tokenizer, selection, rank=rank, world=2, workers=workers)
        uninterrupted[rank], _ = keys_of(loader)
        assert len(uninterrupted[rank]) == len(share) == 12
        first, consumed = keys_of(loader_for(small_shards, tokenizer, selection, rank=rank, world=2,
                                             workers=workers)[0], limit=2)
        rest, _ = keys_of(loader_for(small_shards, tokenizer, selection, rank=rank, world=2, workers=workers,
                                     start=consumed)[0])
        assert consumed == 6 and first + rest == uninterrupted[rank]  # nothing repeated, nothing skipped
    assert not {k for k, _ in uninterrupted[0]} & {k for k, _ in uninterrupted[1]}
    assert len({k for k, _ in uninterrupted[0]} | {k for k, _ in uninterrupted[1]}) == 24
    next_epoch, _ = keys_of(loader_for(small_shards, tokenizer, selection, rank=0, world=2, epoch=1)[0])
    assert next_epoch != uninterrupted[0]


def test_features_on_the_device_equal_features_in_workers(small_shards, tokenizer):
    selection = ExampleSelection("asr", SMALL_LANGUAGES)
    in_workers = next(iter(loader_for(small_shards, tokenizer, selection)[0]))
    on_device = next(iter(loader_for(small_shards, tokenizer, selection, features_in_workers=False)[0]))
    assert on_device.features is None and on_device.waveforms.shape == (3, WINDOW.samples)
    torch.testing.assert_close(on_device.speech_features(LogMelSpectrogram(WINDOW), "cpu"), in_workers.features)


def test_a_damaged_sample_is_skipped_counted_and_named(small_shards, tokenizer, tmp_path):
    damaged = tmp_path / "shards"
    shutil.copytree(small_shards, damaged)
    entries = load_index(damaged)
    victim = entries[0]
    with open(damaged / victim.shard, "r+b") as shard:
        shard.seek(victim.audio[0])
        shard.write(b"\x00" * min(64, victim.audio[1]))
    loader, share = loader_for(damaged, tokenizer, ExampleSelection("asr", SMALL_LANGUAGES), batch=24)
    batch = next(iter(loader))
    assert batch.consumed == 24 and len(batch.keys) == 23
    assert [s.key for s in batch.skipped] == [victim.key]
    assert victim.shard in batch.skipped[0].reason and "unreadable audio" in batch.skipped[0].reason


@pytest.mark.parametrize("shard", ["../outside.tar", "/etc/passwd", "", "sub/../../outside.tar", "link.tar"])
def test_a_shard_named_outside_the_data_folder_is_refused(small_shards, tmp_path, shard):
    data = tmp_path / "data"
    shutil.copytree(small_shards, data)
    (tmp_path / "outside.tar").write_bytes(b"not yours")
    (data / "link.tar").symlink_to(tmp_path / "outside.tar")
    index = data / "index.jsonl"
    lines = index.read_text().splitlines(keepends=True)
    lines[2] = json.dumps({**json.loads(lines[2]), "shard": shard}) + "\n"
    index.write_text("".join(lines))
    (data / "index.check.json").unlink(missing_ok=True)
    with pytest.raises(DataError, match=re.escape(f"{index}:3: shard {shard!r} does not name a file inside {data}")):
        load_index(data)


def test_a_shard_that_cannot_be_opened_is_a_named_data_error(small_shards, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(small_shards, data)
    entry = load_index(data)[0]
    (data / entry.shard).unlink()
    with pytest.raises(DataError, match=re.escape(f"{data / entry.shard}: cannot open (No such file or directory)")):
        ShardReader(data).read(entry.shard, entry.meta)


def overwrite_meta(data, entry, blob: bytes) -> None:
    """The sample's metadata replaced in place, padded with spaces to the member's size."""
    assert len(blob) <= entry.meta[1]
    with open(data / entry.shard, "r+b") as shard:
        shard.seek(entry.meta[0])
        shard.write(blob.ljust(entry.meta[1]))


@pytest.mark.parametrize("blob, problem", [
    (b'{"transcript": "caf\xe9", "translations": {}}', "metadata is not UTF-8 (byte 0xe9 at column 20)"),
    (b'{"transcript": "x", "transl', "metadata is not JSON"),
    (b'["transcript"]', "metadata is not a JSON object"),
    (b'{"translations": {}}', "metadata has no transcript string"),
    (b'{"transcript": "x", "translations": ["deu"]}', "metadata translations do not map language codes to strings"),
    (b'{"transcript": "x", "translations": {"deu": 5}}', "metadata translations do not map language codes to strings"),
])
def test_damaged_metadata_is_a_data_error_naming_shard_and_key(small_shards, tmp_path, blob, problem):
    data = tmp_path / "data"
    shutil.copytree(small_shards, data)
    entry = load_index(data)[0]
    overwrite_meta(data, entry, blob)
    with pytest.raises(DataError, match=re.escape(f"{data / entry.shard}: sample {entry.key}: {problem}")):
        read_sample_meta(ShardReader(data), entry)


def test_a_sample_with_damaged_or_incomplete_metadata_is_skipped_not_a_crash(small_shards, tokenizer, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(small_shards, data)
    entries = load_index(data)
    broken, incomplete = entries[0], next(entry for entry in entries[1:] if entry.translations)
    overwrite_meta(data, broken, b'{"transcript": 5}')
    overwrite_meta(data, incomplete, json.dumps({"transcript": "x", "translations": {}}).encode())
    loader, share = loader_for(data, tokenizer, ExampleSelection("srt", SMALL_LANGUAGES), batch=100)
    batch = next(iter(loader))
    reasons = {item.key: item.reason for item in batch.skipped}
    assert reasons[broken.key] == f"{data / broken.shard}: sample {broken.key}: metadata has no transcript string"
    assert reasons[incomplete.key].startswith(f"{incomplete.shard}: the metadata has no ")
    assert batch.consumed == len(share) and len(batch.keys) + len(batch.skipped) == len(share)

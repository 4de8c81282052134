import json
import subprocess
import sys
import unicodedata
from collections import Counter

from conftest import needs_espeak
from mcat_ds.data.demo import VOICES, build_demo_data, demo_sentences
from mcat_ds.data.shards import ShardReader, load_index


def scripts_of(text: str) -> set[str]:
    names = {unicodedata.name(ch, "").split()[0] for ch in text if ch.isalpha()}
    return {"HAN" if name == "CJK" else name for name in names}


def test_the_corpus_has_40_sentences_in_9_languages_and_6_scripts():
    sentences = demo_sentences()
    assert len(sentences) >= 40
    assert all(set(sentence.texts) == set(VOICES) and all(sentence.texts.values()) for sentence in sentences)
    scripts = set().union(*(scripts_of(text) for sentence in sentences for text in sentence.texts.values()))
    assert {"LATIN", "HAN", "CYRILLIC", "ARABIC", "DEVANAGARI", "HIRAGANA"} <= scripts
    assert len({sentence.texts["eng"] for sentence in sentences}) == len(sentences)


@needs_espeak
def test_demo_data_is_spoken_sharded_and_reused(demo_shards):
    train, dev = load_index(demo_shards / "train"), load_index(demo_shards / "dev")
    assert len(train) == 40 * 9 and len(dev) == 10 * 9
    assert Counter(entry.language for entry in train) == {code: 40 for code in VOICES}
    assert all(0.5 < entry.seconds < 5.0 for entry in train + dev)
    assert all(len(entry.translations) == 8 for entry in train)
    report = json.loads((demo_shards / "train" / "report.json").read_text())
    assert report["written"] == 360 and report["skipped"] == []
    reader = ShardReader(demo_shards / "train")
    meta = json.loads(reader.read(train[0].shard, train[0].meta))
    assert meta["translations"]["eng"] in {s.texts["eng"] for s in demo_sentences()}
    # the dev split is another voice speaking the same sentences
    dev_reader = ShardReader(demo_shards / "dev")
    same = next(e for e in dev if e.key.replace("_dev", "_train") == train[0].key)
    assert json.loads(dev_reader.read(same.shard, same.meta))["transcript"] == meta["transcript"]
    assert dev_reader.read(same.shard, same.audio) != reader.read(train[0].shard, train[0].audio)
    mtime = (demo_shards / "train" / "index.jsonl").stat().st_mtime
    assert build_demo_data(demo_shards.parent) == demo_shards
    assert (demo_shards / "train" / "index.jsonl").stat().st_mtime == mtime  # built once


@needs_espeak
def test_data_report_of_a_stage(demo_shards):
    result = subprocess.run(
        [sys.executable, "-m", "mcat_ds.cli", "data-report", "--preset", "tiny", "--stage", "srt-balanced",
         "--data", str(demo_shards / "train"), "--json", "--set", "stage.max_per_direction=25"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["task"] == "srt" and len(report["languages"]) == 9 and len(report["directions"]) == 72
    assert all(d == {"available": 40, "per_epoch": 25} for d in report["directions"].values())
    assert report["examples_per_epoch"] == 72 * 25

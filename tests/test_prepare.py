import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from contextlib import contextmanager

import numpy as np
import pytest
import soundfile
import webdataset

from mcat_ds.data import prepare
from mcat_ds.data.audio import decode_audio
from mcat_ds.data.prepare import ShardLimits, prepare_shards
from mcat_ds.data.shards import DataError, ShardReader, load_index
from mcat_ds.data.sources import read_manifest

encode_utterance = prepare._encode_utterance


def speech_like(seconds: float, rate: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.2 * rng.standard_normal(int(seconds * rate))).astype(np.float32)


@pytest.fixture
def messy_corpus(tmp_path):
    audio = tmp_path / "audio"
    audio.mkdir()
    for index in range(6):
        soundfile.write(audio / f"good{index}.wav", speech_like(1 + index / 4, 22050, index), 22050)
    soundfile.write(audio / "stereo.flac", np.stack([speech_like(1, 44100, 9)] * 2, 1), 44100, format="FLAC")
    soundfile.write(audio / "silent.wav", np.zeros(16000, np.float32), 16000)
    soundfile.write(audio / "empty.wav", np.zeros(0, np.float32), 16000)
    soundfile.write(audio / "long.wav", speech_like(6, 16000, 7), 16000)
    (audio / "corrupt.wav").write_bytes(b"RIFF....WAVEfmt garbage")
    lines = [{"audio": f"good{i}.wav", "language": "eng", "transcript": f"Sentence {i}.",
              "translations": {"deu": f"Satz {i}.", "fra": f"Phrase {i}."}} for i in range(6)]
    lines += [
        {"prompt": "<|cmn|><|eng|>", "gt": "你好。<|cmn|><|eng|>Hello.", "source": "fleurs_cmn_eng", "audio": "stereo.flac"},
        {"audio": "silent.wav", "language": "eng", "transcript": "Nothing."},
        {"audio": "empty.wav", "language": "eng", "transcript": "Nothing."},
        {"audio": "long.wav", "language": "eng", "transcript": "Too long."},
        {"audio": "corrupt.wav", "language": "eng", "transcript": "Broken."},
        {"audio": "missing.wav", "language": "eng", "transcript": "Gone."},
        {"audio": "good0.wav", "language": "eng", "transcript": "   "},
        {"audio": "../outside.wav", "language": "eng", "transcript": "Escape."},
    ]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("\n".join(json.dumps(line, ensure_ascii=False) for line in lines) + "\nnot json\n",
                        encoding="utf-8")
    return manifest, audio


def test_prepare_writes_shards_index_and_a_full_report(messy_corpus, tmp_path):
    manifest, audio = messy_corpus
    out = tmp_path / "shards"
    report = prepare_shards(read_manifest(manifest, audio), out, max_seconds=5.0,
                            limits=ShardLimits(max_samples=3), workers=2)
    assert report["written"] == 7
    assert report["shards"] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    reasons = {entry.get("line"): entry["reason"] for entry in report["skipped"]}
    assert reasons[8].startswith("silent audio")
    assert reasons[9].startswith("empty audio")
    assert reasons[10].startswith("too long: 6.00 s > 5 s")
    assert reasons[11].startswith("unreadable audio")
    assert reasons[12] == "missing audio file"
    assert reasons[13] == "empty transcript"
    assert reasons[14].startswith("audio path outside the audio root")
    assert reasons[15].startswith("malformed manifest line")
    assert report["skipped_count"] == len(report["skipped"]) == 8
    by_file = {entry["file"]: entry for entry in report["skipped"]}
    assert by_file[str(audio / "corrupt.wav")]["manifest"] == str(manifest)
    # a line rejected for its content names the audio it is about, like the audio problems do
    empty = next(entry for entry in report["skipped"] if entry["reason"] == "empty transcript")
    assert empty == {"file": str((audio / "good0.wav").resolve()), "reason": "empty transcript", "line": 13,
                     "manifest": str(manifest), "language": "eng"}
    assert report["languages"]["eng"] == {"written": 6, "skipped": 7, "hours": pytest.approx(9.75 / 3600, abs=1e-3)}
    assert report["directions"] == {"cmn_eng": 1, "eng_deu": 6, "eng_fra": 6}
    assert json.loads((out / "report.json").read_text()) == report

    index = load_index(out)
    assert len(index) == 7
    reader = ShardReader(out)
    by_key = {entry.key: entry for entry in index}
    stereo = next(entry for entry in index if entry.language == "cmn")
    assert stereo.translations == ("eng",) and stereo.seconds == pytest.approx(1.0, abs=1e-3)
    meta = json.loads(reader.read(stereo.shard, stereo.meta))
    assert meta["transcript"] == "你好。" and meta["translations"] == {"eng": "Hello."}
    good0 = next(entry for entry in index if json.loads(reader.read(entry.shard, entry.meta))["transcript"] == "Sentence 0.")
    expected = decode_audio(audio / "good0.wav")
    np.testing.assert_allclose(decode_audio(reader.read(good0.shard, good0.audio)), expected, atol=1 / 32767)

    # the shards are ordinary webdataset tars
    streamed = list(webdataset.WebDataset([str(out / name) for name in report["shards"]], shardshuffle=False))
    assert sorted(sample["__key__"] for sample in streamed) == sorted(by_key)
    assert all(set(sample) >= {"flac", "json"} for sample in streamed)


def test_prepare_refuses_to_mix_with_existing_shards(messy_corpus, tmp_path):
    manifest, audio = messy_corpus
    prepare_shards(read_manifest(manifest, audio), tmp_path / "out", max_seconds=5.0, workers=1)
    with pytest.raises(FileExistsError, match="already holds prepared shards"):
        prepare_shards(read_manifest(manifest, audio), tmp_path / "out", max_seconds=5.0, workers=1)


def run_prepare(*args):
    return subprocess.run([sys.executable, "-m", "mcat_ds.cli", "prepare", *args],
                          capture_output=True, text=True, timeout=300)


def test_cli_exit_status_says_whether_anything_was_written(messy_corpus, tmp_path):
    manifest, audio = messy_corpus
    result = run_prepare("--manifest", str(manifest), "--audio-root", str(audio), "--out", str(tmp_path / "a"),
                         "--max-seconds", "5")
    assert result.returncode == 0, result.stderr
    assert "wrote 7 utterances" in result.stdout and "skipped 8" in result.stdout
    nothing = tmp_path / "nothing.jsonl"
    nothing.write_text(json.dumps({"audio": "missing.wav", "language": "eng", "transcript": "x"}) + "\n")
    result = run_prepare("--manifest", str(nothing), "--audio-root", str(audio), "--out", str(tmp_path / "b"))
    assert result.returncode == 1
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert report["written"] == 0 and report["skipped"] == [
        {"file": str(audio / "missing.wav"), "reason": "missing audio file", "line": 1, "manifest": str(nothing),
         "language": "eng"}
    ]


@contextmanager
def time_limit(seconds: int):
    """A hang fails the test instead of stalling the suite."""
    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def encode_or_die(job):
    """Stands for the kernel's OOM killer or a crash in a codec: the worker dies on one file."""
    if job[0].audio.name == "good3.wav":
        os.kill(os.getpid(), signal.SIGKILL)
    return encode_utterance(job)


def test_a_worker_that_dies_stops_prepare_with_its_file_named(messy_corpus, tmp_path, monkeypatch):
    manifest, audio = messy_corpus
    monkeypatch.setattr(prepare, "_encode_utterance", encode_or_die)
    out = tmp_path / "out"
    with time_limit(120), pytest.raises(RuntimeError, match="a worker process died") as error:
        prepare_shards(read_manifest(manifest, audio), out, max_seconds=5.0, workers=2)
    assert str(audio / "good3.wav") in str(error.value) and f"{manifest} line 4" in str(error.value)
    assert not out.exists() and list(tmp_path.glob("out.partial-*")) == []


def test_results_come_in_input_order_with_a_bounded_number_in_flight():
    taken = []

    def jobs():
        for number in range(50):
            taken.append(number)
            yield -number

    with time_limit(120):
        for expected, result in enumerate(prepare.in_worker_processes(abs, jobs(), workers=2)):
            assert result == expected and len(taken) - expected <= 2 * prepare.JOBS_PER_WORKER
    assert len(taken) == 50


def test_a_failed_prepare_leaves_nothing_behind_and_a_rerun_starts_over(messy_corpus, tmp_path):
    manifest, audio = messy_corpus
    out = tmp_path / "out"

    def cut_short():
        for number, record in enumerate(read_manifest(manifest, audio)):
            if number == 8:  # some utterances are in a shard by now
                raise RuntimeError("the input went away")
            yield record

    with pytest.raises(RuntimeError, match="the input went away"):
        prepare_shards(cut_short(), out, max_seconds=5.0, limits=ShardLimits(max_samples=2), workers=1)
    assert not out.exists() and list(tmp_path.glob("out.partial-*")) == []
    assert prepare_shards(read_manifest(manifest, audio), out, max_seconds=5.0, workers=1)["written"] == 7


def test_partial_folders_of_dead_runs_are_removed_and_a_live_runs_kept(messy_corpus, tmp_path):
    manifest, audio = messy_corpus
    host = socket.gethostname()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    stale = tmp_path / f"out.partial-{host}-{dead}"
    (stale / "nested").mkdir(parents=True)
    live = tmp_path / f"out.partial-{host}-{os.getppid()}"
    live.mkdir()
    elsewhere = tmp_path / f"out.partial-another-node-{dead}"  # its pid means nothing on this host
    elsewhere.mkdir()
    (tmp_path / "out").mkdir()  # an empty directory is taken
    prepare_shards(read_manifest(manifest, audio), tmp_path / "out", max_seconds=5.0, workers=1)
    assert not stale.exists() and live.is_dir() and elsewhere.is_dir()
    assert len(load_index(tmp_path / "out")) == 7
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an empty directory"):
        prepare_shards(read_manifest(manifest, audio), tmp_path / "other", max_seconds=5.0, workers=1)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_a_cut_or_changed_index_is_refused_and_one_without_a_check_still_loads(small_shards, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(small_shards, data)
    index = data / "index.jsonl"
    lines = index.read_bytes().splitlines(keepends=True)
    assert json.loads((data / "index.check.json").read_text())["entries"] == len(lines) == 24
    index.write_bytes(b"".join(lines[:-1]))  # cut at a line boundary: every line is whole
    with pytest.raises(DataError, match=re.escape(f"{index}: 23 entries, but index.check.json records 24")):
        load_index(data)
    index.write_bytes(b"".join([lines[1], lines[0], *lines[2:]]))
    with pytest.raises(DataError, match=re.escape(f"{index}: its sha256 differs")):
        load_index(data)
    (data / "index.check.json").unlink()  # as prepared before the check was recorded
    assert [entry.key for entry in load_index(data)][:2] == [json.loads(lines[1])["key"], json.loads(lines[0])["key"]]

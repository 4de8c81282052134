"""Files cut by a killed job, with flipped bits or bytes that are not UTF-8: every reader names the file
in a clear error (or, for the sentence-score cache, skips and counts the damaged lines), never a bare
traceback."""

import hashlib
import json
import random
import re
import warnings

import pytest

from mcat_ds.build import CheckpointError
from mcat_ds.checkpoint import read_checkpoint_config, write_checkpoint_metadata
from mcat_ds.config import ConfigError
from mcat_ds.eval.evaluate import EvaluationError, _load_sentence_cache, read_hypotheses
from mcat_ds.infer.export import export_matches, read_export_description
from mcat_ds.presets import get_preset
from test_export import write_fake_checkpoint, write_fake_export

DAMAGES = ("cut", "flip", "invalid")


def damage(data: bytes, kind: str, seed: int) -> bytes:
    """``data`` cut at a random byte, with one random bit flipped, or with bytes no UTF-8 text has."""
    rng = random.Random(seed)
    at = rng.randrange(1, len(data) - 1)
    if kind == "cut":
        return data[:at]
    if kind == "flip":
        return data[:at] + bytes([data[at] ^ (1 << rng.randrange(8))]) + data[at + 1:]
    return data[:at] + rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80\x80"]) + data[at:]


VARIANTS = [(kind, seed) for kind in DAMAGES for seed in range(5)]


def hypotheses_file(directory):
    records = [{"id": f"{n}:eng-deu", "src": "eng", "tgt": "deu", "hyp": f"Wird es morgen regnen {n}?",
                "ref": "Regnet es morgen?", "src_ref": "Will it rain tomorrow?"} for n in range(4)]
    path = directory / "hyps.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def sentence_cache_file(directory):
    # keys far apart, so that no single flipped bit turns one into another
    records = [{"key": hashlib.sha1(str(n).encode()).hexdigest(), "id": f"{n}:eng-deu", "direction": "eng_deu",
                "comet": 0.5 + n / 100, "comet_model": "0123456789abcdef", "chrf": 40.0 + n} for n in range(4)]
    path = directory / "sentences.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def checkpoint_config_file(directory):
    write_checkpoint_metadata(directory, get_preset("tiny"), {"eng": 7, "deu": 8})
    return directory / "mcat_config.json"


def export_description_file(directory):
    checkpoint = write_fake_checkpoint(directory / "ckpt")
    return write_fake_export(directory / "export", checkpoint, "bfloat16", "0" * 32)


@pytest.mark.parametrize("kind,seed", VARIANTS)
def test_damaged_hypotheses_name_file_and_line(tmp_path, kind, seed):
    path = hypotheses_file(tmp_path)
    path.write_bytes(damage(path.read_bytes(), kind, seed))
    try:
        hypotheses = read_hypotheses(path)
    except EvaluationError as error:
        assert f"{path}:" in str(error)
    else:  # a flip inside a text, or a cut at a line's end, leaves lines that still read
        assert 1 <= len(hypotheses) <= 4


@pytest.mark.parametrize("kind,seed", VARIANTS)
def test_damaged_sentence_cache_lines_are_skipped_and_counted(tmp_path, kind, seed):
    path = sentence_cache_file(tmp_path)
    damaged = damage(path.read_bytes(), kind, seed)
    path.write_bytes(damaged)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cache = _load_sentence_cache(path)
    messages = [str(w.message) for w in caught]
    skipped = sum(int(re.search(r"skipped (\d+) damaged line", m).group(1)) for m in messages)
    assert all(str(path) in m for m in messages)
    assert len(cache) + skipped == len([line for line in damaged.splitlines() if line.strip()])
    if kind == "invalid":  # only the line with the bad bytes goes
        assert (len(cache), skipped) == (3, 1)


@pytest.mark.parametrize("kind,seed", VARIANTS)
def test_damaged_checkpoint_config_names_the_file(tmp_path, kind, seed):
    path = checkpoint_config_file(tmp_path)
    path.write_bytes(damage(path.read_bytes(), kind, seed))
    try:
        read_checkpoint_config(tmp_path)
    except (CheckpointError, ConfigError) as error:
        assert str(path) in str(error)


@pytest.mark.parametrize("kind,seed", VARIANTS)
def test_damaged_export_description_names_the_file(tmp_path, kind, seed):
    path = export_description_file(tmp_path)
    path.write_bytes(damage(path.read_bytes(), kind, seed))
    try:
        read_export_description(tmp_path / "export")
        difference = export_matches(tmp_path / "export", tmp_path / "ckpt", "bfloat16")
    except ValueError as error:
        assert str(path) in str(error)
    else:  # what still reads holds another fingerprint than the fake checkpoint's: said in words
        assert "export again" in difference or "not bfloat16" in difference

"""Atomic writes: a reader sees the old file or the new one, never a cut one, and no temporary file stays."""

import os

import pytest

from mcat_ds import files
from mcat_ds.files import fsync_tree, write_atomically


def test_write_atomically_replaces_the_file_and_leaves_nothing_else(tmp_path):
    path = tmp_path / "summary.md"
    write_atomically(path, "first\n")
    write_atomically(path, "zweite Fassung\n")
    assert path.read_text(encoding="utf-8") == "zweite Fassung\n"
    write_atomically(path, b"\x89PNG")
    assert path.read_bytes() == b"\x89PNG"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.md"]


def test_a_failed_write_keeps_the_old_content(tmp_path, monkeypatch):
    path = tmp_path / "directions.csv"
    write_atomically(path, "iso3,n\neng_deu,6\n")

    def disk_full(descriptor):
        raise OSError("no space left on device")

    monkeypatch.setattr(files.os, "fsync", disk_full)
    with pytest.raises(OSError, match="no space left"):
        write_atomically(path, "iso3,n\neng_deu,7\n")
    assert path.read_text() == "iso3,n\neng_deu,6\n"
    assert [p.name for p in tmp_path.iterdir()] == ["directions.csv"]


def test_fsync_tree_flushes_every_file_and_folder(tmp_path, monkeypatch):
    (tmp_path / "out" / "lora").mkdir(parents=True)
    (tmp_path / "out" / "lora" / "adapter_model.safetensors").write_bytes(b"w")
    (tmp_path / "out" / "mcat_config.json").write_text("{}")
    flushed = []
    real_fsync = os.fsync

    def record(descriptor):
        flushed.append(os.fstat(descriptor).st_ino)
        real_fsync(descriptor)

    monkeypatch.setattr(files.os, "fsync", record)
    fsync_tree(tmp_path / "out")
    expected = ["out/lora/adapter_model.safetensors", "out/lora", "out/mcat_config.json", "out"]
    assert sorted(flushed) == sorted((tmp_path / name).stat().st_ino for name in expected)

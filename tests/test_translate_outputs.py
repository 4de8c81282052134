"""mcat translate's outputs under kills, reruns with other settings, odd names and a changed manifest."""

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from mcat_ds.cli import main
from mcat_ds.infer.outputs import identity_path, merge_outputs, part_paths, read_records

JAPANESE = {"id": "u1:jpn-eng", "output": "明日は雨が降りますか？", "hyp": "明日は雨が降りますか？"}


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def translate(checkpoint, data, out, *flags):
    return main(["translate", "--checkpoint", str(checkpoint), "--data", str(data), "--out", str(out),
                 "--max-new-tokens", "4", "--batch", "8", *flags])


def test_a_line_cut_anywhere_even_inside_a_character_is_dropped_and_nothing_else(tmp_path):
    first = json.dumps({"id": "u0:eng-jpn", "hyp": "ok"}) + "\n"
    last = json.dumps(JAPANESE, ensure_ascii=False).encode("utf-8")
    part = tmp_path / "hyps.jsonl.part0"
    warnings = []
    for cut in range(1, len(last)):
        part.write_bytes(first.encode() + last[:cut])
        assert list(read_records([part], warnings.append)) == ["u0:eng-jpn"], cut
    assert not warnings  # a cut last line is what a kill leaves: no noise
    part.write_bytes(first.encode() + last[:7] + b"\n" + last + b"\n")  # damage mid-file is named
    assert list(read_records([part], warnings.append)) == ["u0:eng-jpn", JAPANESE["id"]]
    assert warnings == [f"{part}:2: dropped a damaged output line (JSONDecodeError); its request runs again"]


def test_part_files_are_matched_exactly_whatever_the_output_name(tmp_path):
    out = tmp_path / "hyps[fleurs].jsonl"
    (tmp_path / "hyps[fleurs].jsonl.part0").write_text(json.dumps({"id": "a", "hyp": "x"}) + "\n")
    (tmp_path / "hyps[fleurs].jsonl.part12").write_text(json.dumps({"id": "b", "hyp": "y"}) + "\n")
    backup = tmp_path / "hyps[fleurs].jsonl.partial-backup"
    backup.write_text("mine\n")
    (tmp_path / "hypsf.jsonl.part0").write_text(json.dumps({"id": "other", "hyp": "z"}) + "\n")
    assert [p.name for p in part_paths(out)] == ["hyps[fleurs].jsonl.part0", "hyps[fleurs].jsonl.part12"]
    assert merge_outputs(out, {"b": 0, "a": 1}) == 2
    assert [r["id"] for r in read_jsonl(out)] == ["b", "a"]
    assert backup.read_text() == "mine\n" and (tmp_path / "hypsf.jsonl.part0").is_file()


def test_a_rerun_resumes_from_a_part_file_cut_inside_a_character(tiny_checkpoint, small_shards, tmp_path):
    out = tmp_path / "hyps.jsonl"
    assert translate(tiny_checkpoint, small_shards, out, "--task", "asr") == 0
    records = read_jsonl(out)
    out.unlink()
    half = records[: len(records) // 2]
    cut = json.dumps({**JAPANESE, "id": records[-1]["id"]}, ensure_ascii=False).encode("utf-8")[:25]
    (tmp_path / "hyps.jsonl.part1").write_bytes(
        b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in half) + cut)
    assert translate(tiny_checkpoint, small_shards, out, "--task", "asr") == 0
    assert [(r["id"], r["output"]) for r in read_jsonl(out)] == [(r["id"], r["output"]) for r in records]
    summary = json.loads((tmp_path / "hyps.jsonl.summary.json").read_text())
    assert summary["already_done"] == len(half) and not part_paths(out)


def test_outputs_of_another_task_or_checkpoint_are_never_counted_as_done(tiny_checkpoint, small_shards, tmp_path, capsys):
    out = tmp_path / "hyps.jsonl"
    assert translate(tiny_checkpoint, small_shards, out, "--task", "srt", "--directions", "eng-x") == 0
    before = out.read_bytes()
    assert json.loads(identity_path(out).read_text())["task"] == "srt"

    assert translate(tiny_checkpoint, small_shards, out, "--task", "smt", "--directions", "eng-x") == 2
    error = capsys.readouterr().err
    assert "holds outputs of another run (task: 'srt' there, 'smt' now" in error and "another --out" in error

    retrained = tmp_path / "retrained"  # the same path later holds new weights: so does a copy here
    shutil.copytree(tiny_checkpoint, retrained)
    adapter = load_file(retrained / "adapter.safetensors")
    save_file({k: v + 0.01 for k, v in adapter.items()}, str(retrained / "adapter.safetensors"))
    assert translate(retrained, small_shards, out, "--task", "srt", "--directions", "eng-x") == 2
    assert "holds outputs of another run (model: " in capsys.readouterr().err
    assert translate(tiny_checkpoint, small_shards, out, "--task", "srt", "--directions", "eng-x",
                     "--max-new-tokens", "5") == 2
    assert "generation: " in capsys.readouterr().err
    assert out.read_bytes() == before  # nothing written by a refused run

    # another direction into the same output adds to it; the first run's records stay
    assert translate(tiny_checkpoint, small_shards, out, "--task", "srt", "--directions", "deu-x") == 0
    merged = read_jsonl(out)
    first = [json.loads(line)["id"] for line in before.decode().splitlines()]
    assert set(first) < {r["id"] for r in merged}
    assert {r["src"] for r in merged} == {"eng", "deu"}
    assert [r["order"] for r in merged] == list(range(len(merged)))


def test_a_changed_manifest_is_sharded_again_and_its_outputs_kept_apart(tiny_checkpoint, tmp_path, capsys):
    import numpy as np
    import soundfile

    audio = tmp_path / "audio"
    audio.mkdir()
    lines = []
    for number in range(3):
        samples = 0.1 * np.random.default_rng(number).standard_normal(16000).astype("float32")
        soundfile.write(audio / f"{number}.wav", samples, 16000)
        lines.append(json.dumps({"audio": f"{number}.wav", "language": "eng", "transcript": f"sentence {number}",
                                 "translations": {"deu": f"Satz {number}"}}))
    manifest = tmp_path / "test.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    out = tmp_path / "hyps.jsonl"
    flags = ["--audio-root", str(audio), "--task", "srt"]
    assert translate(tiny_checkpoint, manifest, out, *flags) == 0
    assert len(read_jsonl(out)) == 3

    manifest.write_text("\n".join(lines[:2]) + "\n")  # one utterance fewer
    assert translate(tiny_checkpoint, manifest, out, *flags) == 2
    error = capsys.readouterr().err
    assert "sharding again" in error and "data_sha256" in error
    assert len((tmp_path / "hyps.jsonl.shards" / "index.jsonl").read_text().splitlines()) == 2
    assert len(read_jsonl(out)) == 3  # the earlier run's outputs are untouched
    assert translate(tiny_checkpoint, manifest, tmp_path / "fresh.jsonl", *flags) == 0


def test_ranks_wait_for_each_other_longer_than_the_default_timeout(tiny_checkpoint, small_shards, tmp_path, monkeypatch):
    """The slowest rank's share can take hours: the barrier before the merge must not give up after
    torch's default 10 minutes."""
    from datetime import timedelta

    import torch.distributed as dist

    from mcat_ds.infer import translate_command

    seen = {}

    class Joined(Exception):
        pass

    def init_process_group(backend, timeout=None):
        seen["timeout"] = timeout
        raise Joined

    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    monkeypatch.setattr("mcat_ds.rendezvous.prepare_rendezvous", lambda environment: "local")
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": "29999"}.items():
        monkeypatch.setenv(name, value)
    job = translate_command.TranslateJob(checkpoint=str(tiny_checkpoint), data=str(small_shards),
                                         out=str(tmp_path / "h.jsonl"))
    with pytest.raises(Joined):
        translate_command.run_translate_job(job)
    assert seen["timeout"] >= timedelta(hours=6)

"""mcat translate-audio on synthesized recordings: the same outputs as mcat translate on the same
chunk audio, subtitle files that parse, resumable and identity-checked output folders, bad inputs."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import soundfile
import srt
import webvtt

from mcat_ds.cli import main
from mcat_ds.data.audio import SAMPLE_RATE
from mcat_ds.prompts import split_srt_output

TARGETS = ("deu", "fra")
FLAGS = {"loop", "malformed", "empty", "off_target", "unchecked"}


def translate_audio(checkpoint, out, *audio, to=",".join(TARGETS), extra=()):
    return main(["translate-audio", "--checkpoint", str(checkpoint), "--source", "eng", "--to", to,
                 "--out", str(out), "--max-new-tokens", "4", "--batch", "8", *extra, *map(str, audio)])


@pytest.fixture(scope="module")
def folder_run(tiny_checkpoint, recordings, tmp_path_factory):
    out = tmp_path_factory.mktemp("subtitles") / "out"
    assert translate_audio(tiny_checkpoint, out, recordings[1]) == 0
    return out


def read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def test_segments_equal_mcat_translate_on_the_chunk_audio(tiny_checkpoint, recordings, tmp_path):
    from mcat_ds.checkpoint import load_checkpoint
    from mcat_ds.infer.segment import segment_file
    from mcat_ds.infer.translate import speech_window

    talk = recordings[0] / "talk.wav"
    out = tmp_path / "out"
    assert translate_audio(tiny_checkpoint, out, talk) == 0
    record = read_json(out / "talk.json")

    model, _, _ = load_checkpoint(str(tiny_checkpoint))
    segmented = segment_file(talk, speech_window(model).seconds, 0.5)
    assert 2 < len(segmented.chunks) == len(record["segments"])
    clips = tmp_path / "clips"
    clips.mkdir()
    lines = []
    for index, (chunk, samples) in enumerate(segmented.chunk_samples()):
        soundfile.write(clips / f"c{index}.wav", samples, SAMPLE_RATE, subtype="FLOAT")
        assert (record["segments"][index]["start"], record["segments"][index]["end"]) == (
            round(chunk.start, 3), round(chunk.end, 3))
        lines.append({"id": f"c{index}", "audio": f"c{index}.wav", "language": "eng", "transcript": "-",
                      "translations": {tgt: "-" for tgt in TARGETS}})
    manifest = tmp_path / "clips.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    hyps = tmp_path / "hyps.jsonl"
    assert main(["translate", "--checkpoint", str(tiny_checkpoint), "--data", str(manifest), "--audio-root",
                 str(clips), "--out", str(hyps), "--engine", "fast", "--max-new-tokens", "4", "--batch", "8"]) == 0
    outputs = {}
    for line in hyps.read_text(encoding="utf-8").splitlines():
        translated = json.loads(line)
        outputs[int(re.search(r"c(\d+)", translated["id"]).group(1)), translated["tgt"]] = translated["output"]
    assert len(outputs) == len(segmented.chunks) * len(TARGETS)
    for index, segment in enumerate(record["segments"]):
        parts = {tgt: split_srt_output(outputs[index, tgt], "eng", tgt) for tgt in TARGETS}
        assert segment["translations"] == {tgt: parts[tgt].translation.strip() for tgt in TARGETS}
        transcripts = [parts[tgt].transcript.strip() for tgt in TARGETS if parts[tgt].well_formed]
        assert segment["transcript"] == (transcripts or [parts[TARGETS[0]].transcript.strip()])[0]
        assert set(segment["flags"]) == {"eng", *TARGETS}
        assert all(set(names) <= FLAGS for names in segment["flags"].values())
        assert ("malformed" in segment["flags"]["deu"]) == (not parts["deu"].well_formed)
    summary = read_json(out / "summary.json")
    assert summary["files"] == 1 and summary["segments"] == len(segmented.chunks)
    assert summary["audio_seconds"] == pytest.approx(segmented.duration, abs=1e-3)
    assert summary["real_time_factor"] == pytest.approx(summary["audio_seconds"] / summary["seconds"], rel=1e-2)
    assert not (out / ".work").exists()


def test_subtitle_files_parse_with_monotonic_cues_inside_the_recording(folder_run):
    for name in ("talk22k", "backwards"):
        record = read_json(folder_run / f"{name}.json")
        assert record["flags"] == [] and len(record["segments"]) > 2
        duration = record["duration"]
        for language in (*TARGETS, "eng"):
            subtitles = list(srt.parse((folder_run / f"{name}.{language}.srt").read_text(encoding="utf-8")))
            texts = [s["transcript"] if language == "eng" else s["translations"][language] for s in record["segments"]]
            assert len(subtitles) >= sum(bool(text) for text in texts)
            previous = 0.0
            for cue in subtitles:
                start, end = cue.start.total_seconds(), cue.end.total_seconds()
                assert previous <= start <= end <= duration + 1e-3
                previous = end
            # every cue lies inside the segment it came from
            spans = [(s["start"], s["end"]) for s, text in zip(record["segments"], texts) if text]
            assert all(any(a - 1e-3 <= c.start.total_seconds() and c.end.total_seconds() <= b + 1e-3
                           for a, b in spans) for c in subtitles)
        for tgt in TARGETS:
            vtt = webvtt.read(str(folder_run / f"{name}.{tgt}.vtt"))
            spans = re.findall(r"(\S+) --> (\S+)", (folder_run / f"{name}.{tgt}.srt").read_text(encoding="utf-8"))
            assert [(cue.start, cue.end) for cue in vtt] == [(a.replace(",", "."), b.replace(",", ".")) for a, b in spans]


def test_bad_inputs_are_skipped_a_silent_one_gives_empty_subtitles(folder_run):
    summary = read_json(folder_run / "summary.json")
    assert [Path(path).name for path in summary["skipped"]] == ["corrupt.wav"]
    assert "not audio" in next(iter(summary["skipped"].values()))
    assert sorted(summary["decoded"]) == ["backwards", "silent", "talk22k"] and summary["files"] == 3
    silent = read_json(folder_run / "silent.json")
    assert silent["flags"] == ["silent"] and silent["segments"] == []
    assert (folder_run / "silent.deu.srt").read_text() == "" and (folder_run / "silent.eng.srt").read_text() == ""
    assert summary["flags"]["silent"] == 1
    assert not (folder_run / "corrupt.json").exists()


def test_a_rerun_decodes_only_what_is_missing_and_refuses_other_settings(tiny_checkpoint, recordings, folder_run,
                                                                         tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(folder_run, out)
    kept = {path.name: path.read_bytes() for path in out.iterdir() if path.name.startswith(("talk22k.", "silent."))}
    for path in out.glob("backwards.*"):
        path.unlink()
    assert translate_audio(tiny_checkpoint, out, recordings[1]) == 0
    summary = read_json(out / "summary.json")
    assert summary["decoded"] == ["backwards"] and sorted(summary["already_done"]) == ["silent", "talk22k"]
    assert {name: (out / name).read_bytes() for name in kept} == kept
    assert read_json(out / "backwards.json") == read_json(folder_run / "backwards.json")

    before = {path.name: path.read_bytes() for path in out.iterdir()}
    assert translate_audio(tiny_checkpoint, out, recordings[1], to="deu") == 2
    assert "targets: ['deu', 'fra'] there, ['deu'] now" in capsys.readouterr().err
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before
    for path in out.glob("*.json"):  # without finished recordings the folder is free for other settings
        if path.name != "translate_audio.identity.json":
            path.unlink()
    assert translate_audio(tiny_checkpoint, out, recordings[1], to="deu") == 0
    assert read_json(out / "translate_audio.identity.json")["targets"] == ["deu"]


def test_a_run_killed_mid_decoding_resumes_to_the_same_outputs(tiny_checkpoint, recordings, tmp_path):
    """SIGKILL as soon as the first batch is on disk; the rerun takes what was decoded and ends on
    the files of an uninterrupted run."""
    command = [sys.executable, "-m", "mcat_ds.cli", "translate-audio", "--checkpoint", str(tiny_checkpoint),
               "--source", "eng", "--to", ",".join(TARGETS), "--max-new-tokens", "4", "--batch", "2"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run([*command, "--out", str(whole), str(recordings[1])], check=True, capture_output=True, timeout=300)
    process = subprocess.Popen([*command, "--out", str(killed), str(recordings[1])], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    part = killed / ".work" / "decoded.part0"
    deadline = time.monotonic() + 300
    while not (part.is_file() and part.stat().st_size) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not list(killed.glob("*.srt")), "the kill came after decoding: nothing left to resume"
    assert subprocess.run([*command, "--out", str(killed), str(recordings[1])], capture_output=True,
                          timeout=300).returncode == 0
    summary = read_json(killed / "summary.json")
    total = summary["segments"] * len(TARGETS)
    assert 0 < summary["outputs_resumed"] < total and read_json(whole / "summary.json")["outputs_resumed"] == 0
    assert not (killed / ".work").exists()
    outputs = sorted(path.name for path in whole.iterdir() if path.name != "summary.json")
    assert sorted(path.name for path in killed.iterdir() if path.name != "summary.json") == outputs
    assert {name: (killed / name).read_bytes() for name in outputs} == {name: (whole / name).read_bytes()
                                                                         for name in outputs}


def test_two_ranks_share_the_recordings_and_give_one_process_outputs(tiny_checkpoint, recordings, folder_run,
                                                                     tmp_path):
    from mcat_ds.train.distributed import free_port

    out = tmp_path / "ranks"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(free_port()), "-m", "mcat_ds.cli", "translate-audio", "--checkpoint", str(tiny_checkpoint),
               "--source", "eng", "--to", ",".join(TARGETS), "--max-new-tokens", "4", "--batch", "8",
               "--out", str(out), str(recordings[1])]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    summary, alone = read_json(out / "summary.json"), read_json(folder_run / "summary.json")
    for key in ("files", "audio_seconds", "segments", "flags", "decoded", "skipped"):
        assert summary[key] == alone[key], key
    outputs = sorted(path.name for path in folder_run.iterdir() if path.name != "summary.json")
    assert sorted(path.name for path in out.iterdir() if path.name != "summary.json") == outputs
    assert {name: (out / name).read_bytes() for name in outputs} == {name: (folder_run / name).read_bytes()
                                                                      for name in outputs}


def test_arguments_are_refused_before_any_weights_load(tiny_checkpoint, recordings, tmp_path, monkeypatch, capsys):
    import mcat_ds.checkpoint

    def refuse(*args, **kwargs):
        raise AssertionError("weights loaded")

    monkeypatch.setattr(mcat_ds.checkpoint, "load_checkpoint", refuse)
    cases = [
        (["--source", "xxq", "--to", "deu"], recordings[0], "xxq"),
        (["--source", "eng", "--to", "deu,zzz"], recordings[0], "zzz"),
        (["--source", "eng", "--to", "deu"], tmp_path / "missing.wav", "no such audio file or folder"),
        (["--source", "eng"], recordings[0], "--to needs at least one target"),
    ]
    for flags, audio, message in cases:
        assert main(["translate-audio", "--checkpoint", str(tiny_checkpoint), *flags, "--out", str(tmp_path / "o"),
                     str(audio)]) == 2
        assert message in capsys.readouterr().err
    assert main(["translate-audio", "--checkpoint", str(tmp_path / "nope"), "--source", "eng", "--to", "deu",
                 "--out", str(tmp_path / "o"), str(recordings[0])]) == 2
    assert "no such checkpoint" in capsys.readouterr().err


def test_task_asr_writes_the_transcript_only(tiny_checkpoint, recordings, tmp_path):
    out = tmp_path / "out"
    assert main(["translate-audio", "--checkpoint", str(tiny_checkpoint), "--source", "eng", "--task", "asr",
                 "--out", str(out), "--max-new-tokens", "4", str(recordings[0])]) == 0
    assert sorted(path.name for path in out.iterdir()) == [
        "summary.json", "talk.eng.srt", "talk.json", "translate_audio.identity.json"]
    record = read_json(out / "talk.json")
    assert record["targets"] == [] and all(s["translations"] == {} and set(s["flags"]) == {"eng"}
                                           for s in record["segments"])
    assert len(list(srt.parse((out / "talk.eng.srt").read_text(encoding="utf-8")))) >= sum(
        bool(s["transcript"]) for s in record["segments"])

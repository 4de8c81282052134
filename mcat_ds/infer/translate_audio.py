"""``mcat translate-audio``: long recordings -> transcript and translated subtitles.

Each recording is cut at pauses into chunks the encoder's window holds (``mcat_ds.infer.segment``);
the chunks of all recordings then go through the one decoding pass ``mcat translate`` uses
(:func:`mcat_ds.infer.translate.decode_utterances`: longest first, each chunk encoded once for every
target, requests batched by prompt length, any engine). Per recording, in ``--out``:

    <name>.<tgt>.srt, <name>.<tgt>.vtt   the translation into each target
    <name>.<src>.srt                     the transcript
    <name>.json                          segments (start, end, transcript, translations, flags); written
                                         last: its presence marks the recording done
    summary.json                         the last run: files (recordings it decoded), audio_seconds,
                                         segments, seconds (wall), real_time_factor (audio / wall),
                                         flags (counts), skipped (file -> why), decoded, already_done,
                                         outputs_resumed (chunk outputs a killed run had decoded)
    translate_audio.identity.json        what made the outputs (a rerun with other settings is refused)

A rerun skips the recordings whose ``<name>.json`` is there and decodes the rest, taking the chunks a
killed run decoded from ``--out/.work/decoded.part<RANK>`` (written as each batch finishes, so a kill
loses at most that batch). Under torchrun (or srun) each rank takes recordings, longest first to
the rank with the least audio; rank 0 writes the summary. A recording without
speech gets empty subtitle files and the flag ``silent``; one that cannot be read is skipped and named.
With ``--engine vllm`` an MCAT checkpoint is exported once to ``--export-dir`` (default
``OUT/.vllm.export``).

Chunk samples wait for decoding on disk, one float32 file per recording in ``--out/.work`` (removed
at the end), read back through ``np.memmap``: longest-first order across recordings needs random
access to every chunk, and in memory an hour of audio is ~230 MB, growing with the input; on disk
memory stays at one decoding chunk's audio.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mcat_ds.data.audio import AudioError
from mcat_ds.files import write_atomically
from mcat_ds.infer.requests import DEFAULT_BATCH, EngineName, Request, TranslateConfig
from mcat_ds.infer.segment import MIN_SILENCE, Chunk

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
IDENTITY_FILE = "translate_audio.identity.json"
IDENTITY_FORMAT = "mcat-translate-audio-outputs"
SUMMARY_FILE = "summary.json"
WORK_DIR = ".work"
DECODED = "decoded"
"""In WORK_DIR: ``decoded.part<RANK>``, each rank's decoded chunks as its batches finish (what a
rerun after a kill takes instead of decoding again)."""


@dataclass(frozen=True)
class TranslateAudioOptions:
    """The options of ``mcat translate-audio`` (see its --help)."""

    checkpoint: str
    source: str
    out: str
    audio: tuple[str, ...]
    to: tuple[str, ...] = ()
    task: str = "srt"
    """``srt``: transcript and translations; ``asr``: transcript only."""
    engine: EngineName = "fast"
    min_silence: float = MIN_SILENCE
    batch: int | None = None
    max_new_tokens: int | None = None
    no_repeat_ngram_size: int | None = None
    device: str | None = None
    dtype: str | None = None
    export_dir: str | None = None
    tensor_parallel: int = 1
    gpu_memory_utilization: float | None = None
    max_model_len: int | None = None


@dataclass
class Recording:
    path: Path
    name: str
    duration: float = 0.0
    chunks: tuple[Chunk, ...] = ()
    offsets: tuple[int, ...] = ()
    """Where each chunk's samples start in the recording's work file."""
    stamp: str = ""
    samples: np.ndarray | None = None
    outputs: dict[tuple[int, str | None], str] = field(default_factory=dict)
    """(chunk, target or None for ASR) -> decoded text."""


def _say(text: str) -> None:
    print(f"mcat translate-audio: {text}", file=sys.stderr, flush=True)


def check_options(options: TranslateAudioOptions) -> tuple[list[str], list[Path]]:
    """The targets and the recordings, or ValueError: everything checked before any weights load."""
    from mcat_ds.languages import get_language

    if not Path(options.checkpoint).is_dir():
        raise ValueError(f"--checkpoint {options.checkpoint}: no such checkpoint directory")
    if options.task not in ("srt", "asr"):
        raise ValueError(f"--task {options.task}: translate-audio does srt or asr")
    get_language(options.source)
    targets = [] if options.task == "asr" else list(dict.fromkeys(options.to))
    for code in targets:
        get_language(code)
        if code == options.source:
            raise ValueError(f"--to {code} is the source language: its transcript is <name>.{code}.srt already")
    if options.task == "srt" and not targets:
        raise ValueError("--to needs at least one target language for --task srt (or use --task asr)")
    if not options.min_silence > 0:
        raise ValueError(f"--min-silence must be positive, got {options.min_silence}")
    if not options.audio:
        raise ValueError("no audio given")
    recordings = []
    for given in map(Path, options.audio):
        if given.is_dir():
            recordings += sorted(path for path in given.iterdir() if path.is_file() and not path.name.startswith("."))
        elif given.is_file():
            recordings.append(given)
        else:
            raise ValueError(f"{given}: no such audio file or folder")
    out = Path(options.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; it names the folder to write subtitles to")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"--out {out}: cannot create it ({error.strerror})") from None
    return targets, recordings


def _identity(options: TranslateAudioOptions, targets: list[str], config: TranslateConfig, dtype: str) -> dict:
    from mcat_ds.infer.translate_command import model_fingerprint

    return {"format": IDENTITY_FORMAT, "checkpoint": str(Path(options.checkpoint).resolve()),
            "model": model_fingerprint(options.checkpoint), "dtype": dtype, "task": options.task,
            "source": options.source, "targets": targets, "min_silence": options.min_silence,
            "generation": {"max_new_tokens": config.max_new_tokens,
                           "no_repeat_ngram_size": config.no_repeat_ngram_size}}


IDENTITY_COMPARED = ("model", "dtype", "task", "source", "targets", "min_silence", "generation")


def check_identity(out: Path, identity: dict) -> None:
    """ValueError when ``out`` holds recordings made with other settings, naming what differs."""
    sidecar = out / IDENTITY_FILE
    finished = [path for path in out.glob("*.json") if path.name not in (IDENTITY_FILE, SUMMARY_FILE)]
    if not sidecar.is_file() or not finished:
        return  # nothing to protect: the identity of removed outputs is replaced
    try:
        saved = json.loads(sidecar.read_text(encoding="utf-8"))
        if not isinstance(saved, dict) or saved.get("format") != IDENTITY_FORMAT:
            raise ValueError("not a translate-audio identity")
    except ValueError as error:
        raise ValueError(f"{sidecar} is damaged ({error}): write to another --out, or remove {sidecar.name} and "
                         "the outputs in that folder to start over") from None
    differing = [f"{key}: {saved.get(key)!r} there, {identity[key]!r} now"
                 for key in IDENTITY_COMPARED if saved.get(key) != identity[key]]
    if differing:
        raise ValueError(f"--out {out} holds subtitles of another run ({'; '.join(differing)}). Write to another "
                         f"--out, or remove its outputs and {IDENTITY_FILE} to start over")


def _names(recordings: list[Path], skipped: dict[str, str]) -> list[Recording]:
    """One output name (the file's stem) per recording; a second file of the same stem is skipped."""
    taken: dict[str, Path] = {}
    result = []
    for path in recordings:
        if path.suffix.lower() not in AUDIO_SUFFIXES:
            skipped[str(path)] = f"not a {'/'.join(s[1:] for s in AUDIO_SUFFIXES)} file"
        elif path.stem in taken:
            skipped[str(path)] = f"its outputs would be named like those of {taken[path.stem]}"
        else:
            taken[path.stem] = path
            result.append(Recording(path, path.stem))
    return result


def _segment(recording: Recording, window_seconds: float, min_silence: float, work_file: Path) -> None:
    """Chunks of the recording, their samples written one after another to its work file."""
    from mcat_ds.infer.segment import segment_file

    segmented = segment_file(recording.path, window_seconds, min_silence)
    recording.duration = segmented.duration
    chunks, offsets, position = [], [], 0
    with open(work_file, "wb") as handle:
        for chunk, samples in segmented.chunk_samples():
            chunks.append(chunk)
            offsets.append(position)
            handle.write(np.ascontiguousarray(samples, np.float32).tobytes())
            position += samples.size
    offsets.append(position)
    recording.chunks, recording.offsets = tuple(chunks), tuple(offsets)
    if position:
        recording.samples = np.memmap(work_file, np.float32, mode="r", shape=(position,))


def _share(recordings: list[Recording], rank: int, world_size: int) -> list[Recording]:
    """This rank's recordings: longest first, each to the rank with the least audio so far (lengths
    from the headers; an unreadable file counts as empty and is skipped by the rank it falls to)."""
    if world_size == 1:
        return recordings
    from mcat_ds.data.stream import audio_info

    def seconds(recording: Recording) -> float:
        try:
            return audio_info(recording.path).seconds
        except (AudioError, OSError):
            return 0.0

    loads, mine = [0.0] * world_size, []
    for length, recording in sorted(((seconds(r), r) for r in recordings), key=lambda pair: -pair[0]):
        least = loads.index(min(loads))
        loads[least] += length
        if least == rank:
            mine.append(recording)
    return mine


def _stamp(path: Path) -> str:
    """Which version of a file a decoded chunk came from: a recording replaced under the same name
    between a killed run and its rerun is decoded again."""
    status = path.stat()
    return f"{status.st_size}:{status.st_mtime_ns}"


def run_translate_audio(options: TranslateAudioOptions) -> int:
    """``mcat translate-audio``: see the module docstring. Returns the exit code."""
    from mcat_ds.infer.outputs import part_paths, read_records
    from mcat_ds.infer.translate_command import (
        TORCH_DTYPES,
        decoding_device,
        generation_settings,
        join_ranks,
        process_rank,
    )

    started = time.perf_counter()
    rank, world_size = process_rank(options.engine, options.tensor_parallel)
    targets, paths = check_options(options)  # every rank, before any waits or loads
    out = Path(options.out)
    skipped: dict[str, str] = {}
    recordings = _names(paths, skipped)
    generation = generation_settings(options.checkpoint)
    config = TranslateConfig(
        task=options.task, batch=options.batch or DEFAULT_BATCH[options.engine],
        max_new_tokens=generation.max_new_tokens if options.max_new_tokens is None else options.max_new_tokens,
        no_repeat_ngram_size=(generation.no_repeat_ngram_size if options.no_repeat_ngram_size is None
                              else options.no_repeat_ngram_size),
        engine=options.engine)
    barrier = join_ranks(config.engine, rank, world_size, _say)
    device = decoding_device(options.device, config.engine)
    dtype_name = TORCH_DTYPES[options.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    identity = _identity(options, targets, config, dtype_name)
    check_identity(out, identity)  # every rank: all refuse or none
    work = out / WORK_DIR
    done = [r.name for r in recordings if (out / f"{r.name}.json").is_file()]
    todo = [r for r in recordings if r.name not in done]
    decoded = read_records(part_paths(work / DECODED), warn=_say if rank == 0 else None)
    if barrier is not None:
        barrier()  # every rank has read what a killed run decoded before any rank writes
    if rank == 0:
        write_atomically(out / IDENTITY_FILE, json.dumps(identity, indent=1, ensure_ascii=False) + "\n")
    summary = {"files": 0, "audio_seconds": 0.0, "segments": 0, "seconds": 0.0, "real_time_factor": 0.0,
               "flags": {}, "skipped": skipped if rank == 0 else {}, "decoded": [], "already_done": done,
               "outputs_resumed": 0}
    if todo:
        work.mkdir(exist_ok=True)
        model_path = _model_path(options, dtype_name, rank, barrier)
        mine = _share(todo, rank, world_size)
        if mine:
            from mcat_ds.infer.translate_command import load_decoder

            speech_side, engine, hf_tokenizer = load_decoder(
                model_path, config, device, dtype_name, tensor_parallel=options.tensor_parallel,
                max_model_len=options.max_model_len, gpu_memory_utilization=options.gpu_memory_utilization)
            _translate(speech_side, engine, hf_tokenizer, mine, targets, options, config, work, rank, decoded,
                       summary)
    if barrier is not None:
        summary = _gather_summaries(summary, work, rank, world_size, barrier)
    if rank == 0:
        shutil.rmtree(work, ignore_errors=True)  # every recording is written: nothing left to resume
        summary["seconds"] = round(time.perf_counter() - started, 3)
        summary["real_time_factor"] = (round(summary["audio_seconds"] / summary["seconds"], 3) if summary["seconds"]
                                       else 0.0)
        write_atomically(out / SUMMARY_FILE, json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
        print(f"mcat translate-audio: {summary['files']} recordings ({summary['audio_seconds']:.1f} s of audio, "
              f"{summary['segments']} segments) in {summary['seconds']:.1f} s; {len(done)} already done; "
              f"{len(summary['skipped'])} skipped -> {out}")
    return 0


def _gather_summaries(summary: dict, work: Path, rank: int, world_size: int, barrier) -> dict:
    """Every rank's counts, summed by rank 0 (through files in the work folder: the ranks share a
    file system and a barrier, nothing else)."""
    work.mkdir(parents=True, exist_ok=True)
    write_atomically(work / f"summary.rank{rank}.json", json.dumps(summary, ensure_ascii=False))
    barrier()
    if rank:
        return summary
    total = dict(summary, files=0, audio_seconds=0.0, segments=0, flags={}, decoded=[], skipped={}, outputs_resumed=0)
    for other in range(world_size):
        part = json.loads((work / f"summary.rank{other}.json").read_text(encoding="utf-8"))
        total["files"] += part["files"]
        total["audio_seconds"] = round(total["audio_seconds"] + part["audio_seconds"], 3)
        total["segments"] += part["segments"]
        total["outputs_resumed"] += part["outputs_resumed"]
        total["decoded"] += part["decoded"]
        total["skipped"].update(part["skipped"])
        for flag, count in part["flags"].items():
            total["flags"][flag] = total["flags"].get(flag, 0) + count
    total["decoded"].sort()
    return total


def _model_path(options: TranslateAudioOptions, dtype_name: str, rank: int, barrier) -> str:
    """The checkpoint, or with ``--engine vllm`` its export (made once, by rank 0)."""
    if options.engine != "vllm":
        return options.checkpoint
    from mcat_ds.infer.translate_command import TranslateJob, vllm_export

    job = TranslateJob(checkpoint=options.checkpoint, data="", out=str(Path(options.out) / ".vllm"),
                       export_dir=options.export_dir)
    return vllm_export(job, dtype_name, rank, barrier)


def _translate(speech_side, engine, hf_tokenizer, mine: list[Recording], targets: list[str],
               options: TranslateAudioOptions, config: TranslateConfig, work: Path, rank: int,
               decoded: dict[str, dict], summary: dict) -> None:
    """This rank's recordings: segmented, decoded (what a killed run decoded is taken from its part
    files), written."""
    import torch

    from mcat_ds.files import naming
    from mcat_ds.infer.decoding import DecodeCounters
    from mcat_ds.infer.outputs import appending, part_path
    from mcat_ds.infer.translate import TranslateSummary, Utterances, decode_utterances, speech_window

    window = speech_window(speech_side, engine)
    segmented = []
    try:
        for number, recording in enumerate(mine):
            try:
                recording.stamp = _stamp(recording.path)
                _segment(recording, window.seconds, options.min_silence, work / f"samples.rank{rank}.{number}.f32")
            except (AudioError, OSError) as error:
                summary["skipped"][str(recording.path)] = str(error)
                continue
            segmented.append(recording)
        # every chunk of every recording: (recording, chunk index)
        chunks = [(recording, index) for recording in segmented for index in range(len(recording.chunks))]
        pending: dict[int, list[Request]] = defaultdict(list)
        for entry, (recording, index) in enumerate(chunks):
            for position, tgt in enumerate(targets or [None]):
                key = json.dumps([recording.name, index, tgt])
                earlier = decoded.get(key)
                if earlier is not None and earlier.get("stamp") == recording.stamp and isinstance(earlier.get("text"), str):
                    recording.outputs[index, tgt] = earlier["text"]
                    summary["outputs_resumed"] += 1
                else:
                    pending[entry].append(Request(entry * len(targets or [None]) + position, key, entry,
                                                  options.source, tgt))

        def load(entry: int) -> np.ndarray:
            recording, index = chunks[entry]
            samples = recording.samples[recording.offsets[index]:recording.offsets[index + 1]]
            return np.array(samples[:window.samples])  # rounding may add a sample past the window

        part_file = part_path(work / DECODED, rank)
        try:
            with appending(part_file) as part:
                def write(outputs: list[tuple[Request, str]]) -> None:
                    for request, text in outputs:
                        recording, index = chunks[request.entry]
                        recording.outputs[index, request.tgt] = text
                        part.write(json.dumps({"id": request.id, "stamp": recording.stamp, "text": text},
                                              ensure_ascii=False) + "\n")
                    part.flush()  # a kill loses at most the batch being decoded

                utterances = Utterances(seconds=lambda entry: chunks[entry][0].chunks[chunks[entry][1]].seconds,
                                        load=load)
                with torch.no_grad():
                    decode_utterances(speech_side, engine, hf_tokenizer, utterances, pending, config,
                                      TranslateSummary(), DecodeCounters(), write)
        except OSError as error:  # the part file (a full disk): audio was read before
            raise naming(error, part_file) from None
    finally:
        for recording in mine:
            recording.samples = None  # the memmaps close before their files go
        for samples_file in work.glob(f"samples.rank{rank}.*.f32"):
            samples_file.unlink()
    languages = {options.source, *targets}
    for recording in segmented:
        flags = _write_recording(recording, options, targets, Path(options.out), languages)
        summary["files"] += 1
        summary["audio_seconds"] = round(summary["audio_seconds"] + recording.duration, 3)
        summary["segments"] += len(recording.chunks)
        summary["decoded"].append(recording.name)
        for flag, count in flags.items():
            summary["flags"][flag] = summary["flags"].get(flag, 0) + count


def _write_recording(recording: Recording, options: TranslateAudioOptions, targets: list[str], out: Path,
                     languages: set[str]) -> Counter:
    """A recording's subtitle files, then its json (the mark that it is done); returns its flag counts."""
    from mcat_ds.eval.checks import decoding_loop, is_empty, output_language, srt_malformed
    from mcat_ds.infer.subtitles import Segment, write_srt, write_vtt
    from mcat_ds.prompts import split_srt_output

    def checked(text: str, language: str) -> list[str]:
        flags = [name for name, bad in (("loop", decoding_loop(text)), ("empty", is_empty(text))) if bad]
        verdict = output_language(text, language, languages)
        return flags + ([verdict] if verdict != "ok" and not is_empty(text) else [])

    segments, counts = [], Counter()
    for index, chunk in enumerate(recording.chunks):
        translations, flags, transcripts = {}, {}, []
        for tgt in targets:
            output = recording.outputs[index, tgt]
            parts = split_srt_output(output, options.source, tgt)
            translations[tgt] = parts.translation.strip()
            transcripts.append((not parts.well_formed, parts.transcript.strip()))
            flags[tgt] = checked(translations[tgt], tgt) + (["malformed"] if srt_malformed(output, options.source, tgt)
                                                            else [])
        # each target's output repeats the transcript: the first well-formed one's
        transcript = (next((text for malformed, text in transcripts if not malformed), transcripts[0][1]) if targets
                      else recording.outputs[index, None].strip())
        flags[options.source] = checked(transcript, options.source)
        for names in flags.values():
            counts.update(names)
        segments.append({"start": round(chunk.start, 3), "end": round(chunk.end, 3), "transcript": transcript,
                         "translations": translations, "flags": flags})
    for tgt in targets:
        timed = [Segment(s["start"], s["end"], s["translations"][tgt]) for s in segments]
        write_srt(out / f"{recording.name}.{tgt}.srt", timed)
        write_vtt(out / f"{recording.name}.{tgt}.vtt", timed)
    write_srt(out / f"{recording.name}.{options.source}.srt", [Segment(s["start"], s["end"], s["transcript"])
                                                               for s in segments])
    file_flags = [] if segments else ["silent"]
    counts.update(file_flags)
    record = {"audio": str(recording.path), "duration": round(recording.duration, 3), "source": options.source,
              "targets": targets, "flags": file_flags, "segments": segments}
    write_atomically(out / f"{recording.name}.json", json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    return counts


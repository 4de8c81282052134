"""Serving: what ``mcat serve`` (vLLM's OpenAI server) answers per second with 1, 8 and 32 requests in
flight, beside the offline engine (``vllm.LLM``, every request in one ``generate`` call) on the same
clips and requests, in the same run.

The offline engine is the ceiling: the same model, scheduler and settings without HTTP, multipart
uploads, WAV decoding or requests trickling in, so the ratio server / offline is what serving costs
(at low concurrency, mostly what a scheduler with few sequences leaves unused). The client runs on
the same machine as the server: on a few CPU cores it takes its share of them.

- Clips: English demo sentences spoken by espeak-ng (as the long-recording benchmark makes them),
  silence trimmed, 16 kHz 16-bit WAV; ``--clips`` (256: timed passes of seconds, not one or two) of them, the 40 sentences coming round again
  (quieter) past the last. Each clip is sent into two targets (``en`` -> ``de``, ``fr``), its two
  requests next to each other: the second finds the clip's encoder output in vLLM's encoder cache,
  on both sides.
- Model: the tiny preset with random weights (``mcat_ds.tiny.write_random_checkpoint``), exported
  once (fp32 on CPU, bf16 on GPU, as ``mcat serve`` picks) and served from the export. Greedy,
  ``--max-new-tokens`` (24: about a 3-second sentence's translation); random weights seldom stop
  early, and both sides decode the same tokens (the server's texts are the offline engine's), so
  the work is the same. The shape records the mean new tokens per request the offline engine decoded.
- Server: ``python -m mcat_ds.cli serve --checkpoint EXPORT --max-num-seqs 32`` as a user starts it
  (no length or memory flags; ``VLLM_CPU_KVCACHE_SPACE`` dropped from its environment), requests to
  ``/v1/audio/translations`` (``language`` and ``to_language``, ``max_completion_tokens``) from the
  official ``openai`` client (AsyncOpenAI, a semaphore holding the concurrency), a few untimed
  warm-up requests first. Concurrencies above 32 queue in the server.
- Offline: ``vllm.LLM(model=EXPORT)`` with what ``mcat serve`` gives the server (length and CPU KV
  cache from ``resolve_settings``, eager and no multimodal profiling on CPU, the no-repeat logits
  processor the package installs, ``max_num_seqs`` 32), MCAT's prompt ids and the samples the server decodes from
  the WAV, one untimed warm-up call first. It starts after the server has stopped: one engine at a
  time.

vLLM caches an audio's encoder output (and its processed features) by the audio's content hash and
evicts only when it needs room: every timed pass would find the previous pass's clips encoded. So
each pass (warm-ups included) sends the clips at its own gain (1.0, 0.95, 0.90, ...): other samples,
other hashes, the same log-mel features to within rounding.

Rows (benchmarks/serving.csv, the harness's columns), per concurrency and for the offline engine:
``requests_per_second`` and ``real_time_factor``, the audio seconds answered per wall second, a
clip's seconds counted once per request (so twice per clip, once per target: simple, and what the
work scales with); ratio = server / offline. A pass's wall time runs from the first request sent to
the last answer received (the offline engine's: its generate call).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mcat_ds.bench.harness import Row, benchmark_parser, csv_target, report
from mcat_ds.data.audio import SAMPLE_RATE

CSV_NAME = "serving.csv"
SOURCE = "eng"
TARGETS = ("deu", "fra")
MAX_NUM_SEQS = 32
"""The server's and the offline engine's sequences per step: the highest concurrency fits one step."""
GAIN_STEP = 0.05
"""Each pass's clips are scaled by 1 - GAIN_STEP * pass number: new content hashes, same features."""
RECYCLE_GAIN_STEP = 0.01
"""More clips than demo sentences: each further round of the sentences is this much quieter."""
SERVER_START_SECONDS = 300
OFFLINE = "vllm.LLM offline, one generate call"


@dataclass(frozen=True)
class Clip:
    name: str
    wav: bytes
    """What the client uploads: 16 kHz mono 16-bit PCM."""
    samples: np.ndarray
    """The WAV's samples as float32, what the server decodes from it (the offline engine's input)."""

    @property
    def seconds(self) -> float:
        return self.samples.size / SAMPLE_RATE


@dataclass(frozen=True)
class Request:
    clip: Clip
    target: str
    """ISO 639-3 tag code of the target language."""


@dataclass(frozen=True)
class Generation:
    """What every request asks for, on both sides."""

    max_new_tokens: int
    no_repeat_ngram_size: int | None
    """None: not sent (plain greedy)."""


@dataclass(frozen=True)
class Pass:
    """One timed pass over the requests."""

    requests: int
    audio_seconds: float
    """The clips' seconds, once per request."""
    wall_seconds: float

    @property
    def requests_per_second(self) -> float:
        return self.requests / self.wall_seconds

    @property
    def real_time_factor(self) -> float:
        return self.audio_seconds / self.wall_seconds


def speak_sentences(root: Path, count: int) -> list[np.ndarray]:
    """The first ``count`` English demo sentences (all of them when there are fewer) spoken by
    espeak-ng: 16 kHz float32, silence trimmed."""
    from mcat_ds.data.audio import decode_audio
    from mcat_ds.data.demo import VOICES, demo_sentences, speak

    root.mkdir(parents=True, exist_ok=True)
    jobs = [(VOICES[SOURCE], sentence.texts[SOURCE], root / f"{index:02d}.wav")
            for index, sentence in enumerate(demo_sentences()[:count])]
    speak(jobs, threads=2)
    spoken = []
    for _, _, path in jobs:
        samples = decode_audio(path)
        loud = np.flatnonzero(np.abs(samples) > 1e-3)
        spoken.append(samples[loud[0]:loud[-1] + 1])
    return spoken


def clips_at_gain(spoken: list[np.ndarray], count: int, gain: float) -> list[Clip]:
    """``count`` clips of the sentences scaled by ``gain``, as WAV bytes and as the samples those
    bytes decode to. Past the last sentence they start again, each round RECYCLE_GAIN_STEP quieter:
    other audio to vLLM's caches."""
    import soundfile

    clips = []
    for index in range(count):
        cycle, sentence = divmod(index, len(spoken))
        scaled = spoken[sentence] * gain * (1.0 - RECYCLE_GAIN_STEP * cycle)
        buffer = io.BytesIO()
        soundfile.write(buffer, np.clip(scaled, -1.0, 1.0), SAMPLE_RATE, format="WAV", subtype="PCM_16")
        wav = buffer.getvalue()
        decoded, _ = soundfile.read(io.BytesIO(wav), dtype="float32")
        clips.append(Clip(f"clip{index:02d}", wav, decoded))
    return clips


def requests_for(clips: list[Clip]) -> list[Request]:
    """Each clip into every target, a clip's requests next to each other (so that they are in flight
    together and share one encoder pass)."""
    return [Request(clip, target) for clip in clips for target in TARGETS]


def pass_of(requests: list[Request], wall_seconds: float) -> Pass:
    return Pass(len(requests), sum(request.clip.seconds for request in requests), wall_seconds)


# ---------------------------------------------------------------- the server


class ServerProcess:
    """``mcat serve`` on an export, in a subprocess, as a user starts it; its log in ``log_path``."""

    def __init__(self, export: Path, log_path: Path):
        from mcat_ds.rendezvous import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "w", encoding="utf-8")
        environment = {name: value for name, value in os.environ.items() if name != "VLLM_CPU_KVCACHE_SPACE"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mcat_ds.cli", "serve", "--checkpoint", str(export), "--port", str(self.port),
             "--max-num-seqs", str(MAX_NUM_SEQS)],
            stdout=self.log, stderr=subprocess.STDOUT, env=environment)

    def wait_until_healthy(self, timeout_seconds: float = SERVER_START_SECONDS) -> float:
        """Seconds until /health answered; RuntimeError with the log's tail when it exits or never does."""
        start = time.monotonic()
        while time.monotonic() - start < timeout_seconds:
            if self.process.poll() is not None:
                raise RuntimeError(f"mcat serve exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2)
                return time.monotonic() - start
            except (urllib.error.URLError, ConnectionError):
                time.sleep(1)
        raise RuntimeError(f"mcat serve did not answer /health in {timeout_seconds:.0f} s:\n{self.log_tail()}")

    def log_tail(self, characters: int = 3000) -> str:
        self.log.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")[-characters:]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


async def send_requests(url: str, model: str, requests: list[Request], concurrency: int,
                        generation: Generation) -> float:
    """Wall seconds from the first request sent to the last answer, ``concurrency`` in flight at most.
    Any failed request raises (no retries: a refusal is a result to see, not to hide)."""
    from openai import AsyncOpenAI

    from mcat_ds.languages import get_language

    fields: dict[str, object] = {"language": get_language(SOURCE).whisper,
                                 "max_completion_tokens": generation.max_new_tokens}
    if generation.no_repeat_ngram_size is not None:
        fields["vllm_xargs"] = json.dumps({"no_repeat_ngram_size": generation.no_repeat_ngram_size})
    semaphore = asyncio.Semaphore(concurrency)
    async with AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600) as client:

        async def send(request: Request) -> None:
            async with semaphore:
                await client.audio.translations.create(
                    model=model, file=(f"{request.clip.name}.wav", request.clip.wav, "audio/wav"),
                    temperature=0.0,
                    extra_body={**fields, "to_language": get_language(request.target).whisper})

        start = time.perf_counter()
        await asyncio.gather(*(send(request) for request in requests))
        return time.perf_counter() - start


def bench_server(export: Path, log_path: Path, warm_up: list[Request], passes: dict[int, list[Request]],
                 generation: Generation) -> dict[int, Pass]:
    """Concurrency -> its timed pass over its requests, on one server (stopped before this returns)."""
    server = ServerProcess(export, log_path)
    try:
        started = server.wait_until_healthy()
        print(f"mcat serve answered /health after {started:.0f} s", flush=True)

        def timed(requests: list[Request], concurrency: int) -> float:
            return asyncio.run(send_requests(server.url, str(export), requests, concurrency, generation))

        try:
            timed(warm_up, min(passes))
            measured = {}
            for concurrency, requests in passes.items():
                measured[concurrency] = pass_of(requests, timed(requests, concurrency))
                print(f"server, {concurrency} in flight: {measured[concurrency].requests_per_second:.2f} requests/s "
                      f"({measured[concurrency].wall_seconds:.1f} s)", flush=True)
        except Exception as error:
            raise RuntimeError(f"{error}\nserver log:\n{server.log_tail()}") from error
        return measured
    finally:
        server.stop()


# ---------------------------------------------------------------- the offline engine


def bench_offline(export: Path, dtype: str, warm_up: list[Request], requests: list[Request],
                  generation: Generation) -> tuple[Pass, float]:
    """The offline engine's timed pass over ``requests`` (all in one generate call), and the mean new
    tokens per request it decoded."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from mcat_ds.infer.export import DTYPES
    from mcat_ds.infer.vllm_no_repeat import NO_REPEAT_KEY
    from mcat_ds.infer.vllm_settings import VllmSettings, resolve_settings
    from mcat_ds.prompts import build_prompt

    on_cpu = not torch.cuda.is_available()
    # what mcat serve computes for the server (--max-num-seqs is a vLLM flag there, not a settings field)
    settings = resolve_settings(VllmSettings(), export, DTYPES[dtype].itemsize, on_cpu)
    kv_cache = {} if settings.kv_cache_memory_bytes is None else {"kv_cache_memory_bytes": settings.kv_cache_memory_bytes}
    llm = LLM(model=str(export), dtype=dtype, seed=0, enforce_eager=on_cpu, skip_mm_profiling=on_cpu,
              max_model_len=settings.max_model_len, max_num_seqs=MAX_NUM_SEQS,
              gpu_memory_utilization=settings.gpu_memory_utilization, **kv_cache)  # no-repeat: the installed plugin
    try:
        tokenizer = llm.get_tokenizer()
        # what the model's transcription prompt builds from the request's language codes
        prompt_ids = {target: list(tokenizer(build_prompt("srt", SOURCE, target), add_special_tokens=True)["input_ids"])
                      for target in TARGETS}
        extra_args = (None if generation.no_repeat_ngram_size is None
                      else {NO_REPEAT_KEY: generation.no_repeat_ngram_size})
        sampling = SamplingParams(temperature=0.0, max_tokens=generation.max_new_tokens, extra_args=extra_args)

        def prompts(batch: list[Request]) -> list[TokensPrompt]:
            return [TokensPrompt(prompt_token_ids=prompt_ids[request.target],
                                 multi_modal_data={"audio": (request.clip.samples, SAMPLE_RATE)}) for request in batch]

        llm.generate(prompts(warm_up), sampling, use_tqdm=False)
        batch = prompts(requests)
        start = time.perf_counter()
        outputs = llm.generate(batch, sampling, use_tqdm=False)
        wall = time.perf_counter() - start
        new_tokens = sum(len(output.outputs[0].token_ids) for output in outputs) / len(outputs)
        return pass_of(requests, wall), new_tokens
    finally:
        llm.llm_engine.engine_core.shutdown()


# ---------------------------------------------------------------- the run


def bench_serving(work: Path, clips: int, concurrencies: list[int], warm_up_requests: int,
                  generation: Generation) -> list[Row]:
    from mcat_ds.infer.export import export_checkpoint
    from mcat_ds.tiny import write_random_checkpoint

    on_cpu = not torch.cuda.is_available()
    dtype = "float32" if on_cpu else "bfloat16"  # mcat serve's default
    checkpoint = write_random_checkpoint(work / "model")
    export = export_checkpoint(checkpoint, work / "model" / "export", dtype)
    spoken = speak_sentences(work / "clips", clips)

    def requests_at(pass_number: int, count: int) -> list[Request]:
        return requests_for(clips_at_gain(spoken, count, 1.0 - GAIN_STEP * pass_number))

    warm_up = requests_at(0, warm_up_requests)[:warm_up_requests]  # both engines' first pass, untimed
    server = bench_server(export, work / "server.log", warm_up,
                          {concurrency: requests_at(number, clips) for number, concurrency in enumerate(concurrencies, 1)},
                          generation)
    offline, new_tokens = bench_offline(export, dtype, warm_up, requests_at(len(concurrencies) + 1, clips), generation)
    print(f"offline: {offline.requests_per_second:.2f} requests/s ({offline.wall_seconds:.1f} s)", flush=True)
    no_repeat = ("" if generation.no_repeat_ngram_size is None
                 else f", no_repeat_ngram_size {generation.no_repeat_ngram_size}")
    shape = (f"{clips} clips ({offline.audio_seconds / len(TARGETS):.0f} s of audio) x {SOURCE}->{','.join(TARGETS)}"
             f" = {offline.requests} requests, tiny preset {dtype}, max_new_tokens {generation.max_new_tokens}"
             f" (offline mean {new_tokens:.1f} new){no_repeat}, max_num_seqs {MAX_NUM_SEQS}")
    rows = []
    for concurrency, measured in server.items():
        implementation = f"mcat serve /v1/audio/translations, {concurrency} in flight"
        rows += [Row("serving", shape, implementation, "requests_per_second", measured.requests_per_second,
                     measured.requests_per_second / offline.requests_per_second),
                 Row("serving", shape, implementation, "real_time_factor", measured.real_time_factor,
                     measured.real_time_factor / offline.real_time_factor)]
    rows += [Row("serving", shape, OFFLINE, "requests_per_second", offline.requests_per_second, 1.0),
             Row("serving", shape, OFFLINE, "real_time_factor", offline.real_time_factor, 1.0)]
    return rows


def main(argv: list[str] | None = None, description: str | None = None) -> None:
    from mcat_ds.optional import require

    parser = benchmark_parser(description, CSV_NAME)
    parser.add_argument("--clips", type=int, default=256,
                        help="clips of English demo sentences, each into two targets (past the 40 sentences, "
                             "they come round again, quieter)")
    parser.add_argument("--concurrency", default="1,8,32", help="requests in flight, one pass each (comma-separated)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--no-repeat-ngram-size", type=int, help="send the release's rule (default: off, plain greedy)")
    parser.add_argument("--work-dir", type=Path, help="keep the model, clips and server log here (default: a temp dir)")
    args = parser.parse_args(argv)
    require("vllm")  # the openai client comes with it
    if args.smoke:
        clips, concurrencies, warm_up, max_new_tokens = 3, [1, 2], 2, 4
    else:
        clips, concurrencies, warm_up = args.clips, [int(c) for c in args.concurrency.split(",")], 4
        max_new_tokens = args.max_new_tokens
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work_dir or Path(scratch)
        rows = bench_serving(work, clips, concurrencies, warm_up, Generation(max_new_tokens, args.no_repeat_ngram_size))
    report(rows, csv_target(args, CSV_NAME))

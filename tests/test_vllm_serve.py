"""``mcat serve``: vLLM's OpenAI server on an MCAT checkpoint, called with the official ``openai``
client. The audio endpoints build MCAT's prompts from ISO 639-1 codes and answer what our fast engine
decodes from the same file (the transcript; the translation alone), with the checkpoint's no-repeat
setting by default; chat with an audio part answers the whole SRT output. 32 requests in flight at
once are each answered as when sent alone, and ``/metrics`` counts them; bad requests get a 400 that
says what is wrong, and the server goes on answering.

Runs where vLLM is installed, with the package installed (vLLM's server finds the model through its
``vllm.general_plugins`` entry point). One server for the module: starting one costs 30-60 s here.
A separate module from ``test_vllm_native``: its engine is down before this server starts."""

import asyncio
import base64
import io
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here; launch/test.sh runs this file in .venv-vllm")

from conftest import write_trained_checkpoint  # noqa: E402
from mcat_ds.config import apply_overrides  # noqa: E402
from mcat_ds.presets import get_preset  # noqa: E402
from mcat_ds.languages import get_language  # noqa: E402
from mcat_ds.infer.vllm_model import translation_part  # noqa: E402
from mcat_ds.prompts import build_prompt  # noqa: E402
from mcat_ds.train.distributed import free_port  # noqa: E402

from test_vllm_native import NO_REPEAT, fast_engine_ids, utterances  # noqa: E402

MAX_NEW_TOKENS = 8
API_KEY = "mcat-test-key"
SIZE_LIMIT_MB = 2
"""The server's upload limit (vLLM's VLLM_MAX_AUDIO_CLIP_FILESIZE_MB), small enough to pass cheaply."""
IN_FLIGHT = 32
LONG_ANSWER = 120
"""Tokens for an answer that gets past this model's run of tags."""
LOAD_TOKENS = 48
"""Output length in the load test: long enough that the requests are seen decoding together."""


class Server:
    """A tiny trained Gemma2 checkpoint, ``mcat serve`` on it (exported once, then vLLM's OpenAI
    server with MCAT's settings, as a new user starts it: no memory or length flags), and the fast
    engine's model for the expected outputs."""

    def __init__(self, tiny_dirs, root):
        from mcat_ds.checkpoint import load_checkpoint

        config = get_preset("tiny")
        config.model.encoder.checkpoint = str(tiny_dirs["whisper"])
        config.model.llm.checkpoint = str(tiny_dirs["gemma2"])
        # the checkpoint's decoding setting, which the server applies to requests that do not set one
        overrides = ["model.llm.train_embeddings=tags", f"generation.no_repeat_ngram_size={NO_REPEAT}"]
        checkpoint = write_trained_checkpoint(apply_overrides(config, overrides), root / "ckpt")
        self.export = root / "ckpt.export"  # mcat serve's default --export-dir
        self.model, self.tokenizer, _ = load_checkpoint(checkpoint)
        self.model.eval()
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(root / "server.log", "w")
        environment = {name: value for name, value in os.environ.items() if name != "VLLM_CPU_KVCACHE_SPACE"}
        environment["VLLM_MAX_AUDIO_CLIP_FILESIZE_MB"] = str(SIZE_LIMIT_MB)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mcat_ds.cli", "serve", "--checkpoint", str(checkpoint), "--port", str(port),
             "--api-key", API_KEY, "--max-num-seqs", str(IN_FLIGHT)],  # the last one is vLLM's: passed on
            stdout=self.log, stderr=subprocess.STDOUT, env=environment)
        self.log_path = root / "server.log"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log_path.read_text()[-3000:]
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2)
                return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(1)
        raise AssertionError(f"the server did not start in 300 s: {self.log_path.read_text()[-3000:]}")

    def client(self, api_key: str = API_KEY):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=120)

    def metric(self, name: str) -> float:
        """A counter or gauge of ``/metrics``, summed over its labels."""
        text = urllib.request.urlopen(f"{self.url}/metrics", timeout=10).read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name + "{") or line.startswith(name + " "))

    def close(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


@pytest.fixture(scope="module")
def server(tiny_dirs, tmp_path_factory):
    served = Server(tiny_dirs, tmp_path_factory.mktemp("vllm-serve"))
    yield served
    served.close()




def wav_bytes(samples: np.ndarray, rate: int = 16000, subtype: str = "FLOAT") -> bytes:
    """A WAV file's bytes (float: lossless, the server decodes exactly these samples)."""
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format="WAV", subtype=subtype)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def clips(small_shards):
    """(wav bytes, samples, source, three targets) for utterances of the small corpus."""
    return [(wav_bytes(samples), samples, source, targets) for samples, source, targets in utterances(small_shards, 8)]


def expected_text(server, samples, task, *languages, no_repeat=NO_REPEAT, max_new_tokens=MAX_NEW_TOKENS) -> str:
    ids = fast_engine_ids(server, [samples], [(0, build_prompt(task, *languages))], no_repeat, max_new_tokens)[0]
    return server.tokenizer.hf.decode(ids, skip_special_tokens=True)


def send(client, model, endpoint: str, audio: bytes, source: str, target: str | None = None, **extra):
    """One request to an audio endpoint, as the README shows it: the codes in ``extra_body``. The
    response (a coroutine from the async client)."""
    body = {"language": get_language(source).whisper, "max_completion_tokens": MAX_NEW_TOKENS, **extra}
    if target is not None:
        body["to_language"] = get_language(target).whisper
    api = client.audio.transcriptions if endpoint == "transcriptions" else client.audio.translations
    return api.create(model=str(model), file=("clip.wav", audio, "audio/wav"), temperature=0, extra_body=body)


def streamed(server, audio: bytes, source: str, target: str) -> str:
    """A streamed /v1/audio/translations request (server-sent events), its deltas joined."""
    import httpx

    fields = {"model": str(server.export), "language": get_language(source).whisper, "temperature": "0",
              "to_language": get_language(target).whisper, "max_completion_tokens": str(MAX_NEW_TOKENS),
              "stream": "true"}
    deltas = []
    with httpx.stream("POST", f"{server.url}/v1/audio/translations", data=fields, timeout=120,
                      files={"file": ("clip.wav", audio, "audio/wav")},
                      headers={"Authorization": f"Bearer {API_KEY}"}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                deltas += [choice["delta"].get("content") or "" for choice in json.loads(line[6:])["choices"]]
    return "".join(deltas)


def test_the_audio_endpoints_answer_the_transcript_and_the_translation(server, clips):
    client = server.client()

    def ask(*args, **extra) -> str:
        return send(client, server.export, *args, **extra).text

    audio, samples, source, targets = clips[0]
    assert ask("transcriptions", audio, source) == expected_text(server, samples, "asr", source)
    for target in targets:  # into three languages; the answer is the translation after the tag pair
        srt = expected_text(server, samples, "srt", source, target)
        assert ask("translations", audio, source, target) == translation_part(srt)
    # this model's first tokens are tags (each once, by the no-repeat rule); past them comes text,
    # and the endpoint answers only what follows the first tag run
    srt = expected_text(server, samples, "srt", source, targets[0], max_new_tokens=LONG_ANSWER)
    answer = ask("translations", audio, source, targets[0], max_completion_tokens=LONG_ANSWER)
    assert answer == translation_part(srt) and answer and answer != srt.strip() and "<|" not in answer
    # streamed, the translation comes as it grows and the transcript part never comes
    srt = expected_text(server, samples, "srt", source, targets[0])
    assert streamed(server, audio, source, targets[0]) == translation_part(srt)
    # the checkpoint's no-repeat setting applies by default; a request's own setting wins
    plain = expected_text(server, samples, "asr", source, no_repeat=0)
    assert plain != expected_text(server, samples, "asr", source)  # the setting changes this output
    assert ask("transcriptions", audio, source, vllm_xargs=json.dumps({"no_repeat_ngram_size": 0})) == plain

    log = server.log_path.read_text()
    assert "exporting" in log and "curl http://127.0.0.1:" in log  # mcat serve's own lines, before the exec

    target = targets[0]
    audio_part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(audio).decode(), "format": "wav"}}
    text_part = {"type": "text", "text": build_prompt("srt", source, target)}
    chat = client.chat.completions.create(model=str(server.export), max_tokens=MAX_NEW_TOKENS, temperature=0,
                                          messages=[{"role": "user", "content": [audio_part, text_part]}])
    assert chat.choices[0].message.content == expected_text(server, samples, "srt", source, target)


def test_requests_in_flight_together_are_answered_as_one_by_one(server, clips):
    """IN_FLIGHT requests (ASR and three translations of 8 clips) sent at once from the async client,
    then one at a time: the same answers; /metrics saw them running together."""
    from openai import AsyncOpenAI

    longer = {"max_completion_tokens": LOAD_TOKENS}
    work = [(endpoint, audio, source, target) for audio, _, source, targets in clips
            for endpoint, target in [("transcriptions", None)] + [("translations", t) for t in targets]]
    assert len(work) == IN_FLIGHT
    succeeded = server.metric("vllm:request_success_total")

    async def all_at_once() -> tuple[list[str], float]:
        client = AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=300)
        busiest = 0.0
        watching = True

        async def watch():
            nonlocal busiest
            while watching:
                running = await asyncio.to_thread(server.metric, "vllm:num_requests_running")
                busiest = max(busiest, running)
                await asyncio.sleep(0.05)

        watcher = asyncio.create_task(watch())
        answers = await asyncio.wait_for(asyncio.gather(*(send(client, server.export, *job, **longer) for job in work)), timeout=600)
        watching = False
        await watcher
        await client.close()
        return [answer.text for answer in answers], busiest

    together, busiest = asyncio.run(all_at_once())
    client = server.client()
    alone = [send(client, server.export, *job, **longer).text for job in work]
    assert together == alone
    assert all(answer for answer in alone)
    assert server.metric("vllm:request_success_total") - succeeded == 2 * IN_FLIGHT
    assert busiest > 1  # more than one request was decoding at a time


def test_bad_requests_get_a_400_that_says_why_and_the_server_goes_on(server, clips):
    from openai import AuthenticationError, BadRequestError

    client = server.client()
    audio, samples, source, targets = clips[0]
    target = targets[0]

    def refused(endpoint, file: bytes, source=source, target=target, **extra) -> str:
        with pytest.raises(BadRequestError) as caught:
            send(client, server.export, endpoint, file, source, target, **extra)
        assert caught.value.status_code == 400
        return caught.value.message

    assert "Invalid or unsupported audio" in refused("translations", b"this is not audio, it is text" * 40)
    assert "Invalid or unsupported audio" in refused("translations", b"")
    cut = refused("translations", audio[: len(audio) // 2])  # its header claims twice what it holds
    assert "a WAV cut short: its data chunk claims" in cut and "clip.wav" in cut
    assert "no language with that code" in refused("translations", audio, target="eng", language="la")
    assert "send to_language" in refused("translations", audio, target=None)
    assert "/v1/audio/translations" in refused("transcriptions", audio)  # a to_language on a transcription
    long_audio = np.tile(samples, int(35 * 16000 / samples.size) + 1)[: 35 * 16000]
    too_long = refused("translations", wav_bytes(long_audio, subtype="PCM_16"))  # 35 s in 1.1 MB: under the size limit
    assert "35.0 s long" in too_long and "mcat translate-audio" in too_long
    oversize = np.random.default_rng(0).uniform(-0.5, 0.5, int((SIZE_LIMIT_MB + 0.5) * 2**20 / 4)).astype(np.float32)
    assert "Maximum file size exceeded" in refused("translations", wav_bytes(oversize))
    with pytest.raises(AuthenticationError) as caught:
        send(server.client(api_key="wrong-key"), server.export, "translations", audio, source, target)
    assert caught.value.status_code == 401

    # after all that, a good request is answered as before
    srt = expected_text(server, samples, "srt", source, target)
    assert send(client, server.export, "translations", audio, source, target).text == translation_part(srt)

"""vLLM's OpenAI server on an ``mcat export`` folder: the audio endpoints build MCAT's prompts from ISO
639-1 codes and answer what our fast engine decodes from the same file; with a chat template that
emits BOS and the text alone, the chat endpoint with an audio part does too.

Runs where vLLM is installed, with the package installed (vLLM's server finds the model through its
``vllm.general_plugins`` entry point). One server for the module: starting one costs 30-60 s here.
A separate module from ``test_vllm_native``: its engine is down before this server starts."""

import base64
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here; launch/test.sh runs this file in .venv-vllm")

from conftest import write_trained_checkpoint  # noqa: E402
from mcat_ds.config import apply_overrides  # noqa: E402
from mcat_ds.presets import get_preset  # noqa: E402
from mcat_ds.prompts import build_prompt  # noqa: E402
from mcat_ds.train.distributed import free_port  # noqa: E402

from test_vllm_native import NO_REPEAT, fast_engine_ids, utterances  # noqa: E402

MAX_NEW_TOKENS = 8
API_KEY = "mcat-test-key"


class Server:
    """A tiny trained Gemma2 checkpoint, ``mcat serve`` on it (exported once, then vLLM's OpenAI
    server with MCAT's settings, as a new user starts it: no memory or length flags), and the fast
    engine's model for the expected outputs."""

    def __init__(self, tiny_dirs, root):
        from mcat_ds.checkpoint import load_checkpoint

        config = get_preset("tiny")
        config.model.encoder.checkpoint = str(tiny_dirs["whisper"])
        config.model.llm.checkpoint = str(tiny_dirs["gemma2"])
        checkpoint = write_trained_checkpoint(apply_overrides(config, ["model.llm.train_embeddings=tags"]), root / "ckpt")
        self.export = root / "ckpt.export"  # mcat serve's default --export-dir
        self.model, self.tokenizer, _ = load_checkpoint(checkpoint)
        self.model.eval()
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(root / "server.log", "w")
        environment = {name: value for name, value in os.environ.items() if name != "VLLM_CPU_KVCACHE_SPACE"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mcat_ds.cli", "serve", "--checkpoint", str(checkpoint), "--port", str(port),
             "--api-key", API_KEY, "--max-num-seqs", "16"],  # the last one is vLLM's: passed on
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

    def post(self, path: str, *, fields: dict | None = None, files: dict | None = None,
             body: dict | None = None, api_key: str | None = API_KEY) -> tuple[int, dict]:
        if body is not None:
            data, content_type = json.dumps(body).encode(), "application/json"
        else:
            boundary = "mcat-boundary"
            parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
                     for name, value in (fields or {}).items()]
            parts += [(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{name}.wav"\r\n'
                       "Content-Type: audio/wav\r\n\r\n").encode() + content + b"\r\n"
                      for name, content in (files or {}).items()]
            data, content_type = b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"
        headers = {"Content-Type": content_type, **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
        request = urllib.request.Request(f"{self.url}{path}", data=data, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            text = error.read()
            try:
                return error.code, json.loads(text)
            except ValueError:
                return error.code, {"raw": text.decode(errors="replace")}

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


def test_audio_endpoints_and_chat_answer_what_the_fast_engine_decodes(server, small_shards, tmp_path):
    import soundfile

    from mcat_ds.languages import get_language

    samples, source, targets = utterances(small_shards, 1)[0]
    wav = tmp_path / "utterance.wav"
    soundfile.write(wav, samples, 16000, subtype="FLOAT")  # lossless: the server decodes these samples
    audio = wav.read_bytes()

    def expected(task, *languages):
        ids = fast_engine_ids(server, [samples], [(0, build_prompt(task, *languages))])[0]
        return server.tokenizer.hf.decode(ids, skip_special_tokens=True)

    common = {"model": str(server.export), "max_completion_tokens": MAX_NEW_TOKENS, "temperature": 0,
              "vllm_xargs": json.dumps({"no_repeat_ngram_size": NO_REPEAT})}
    code = get_language(source).whisper
    target = targets[0]
    status, asr = server.post("/v1/audio/transcriptions", fields={**common, "language": code}, files={"file": audio})
    assert status == 200 and asr["text"] == expected("asr", source)
    status, srt = server.post("/v1/audio/transcriptions", files={"file": audio},
                              fields={**common, "language": code, "to_language": get_language(target).whisper})
    assert status == 200 and srt["text"] == expected("srt", source, target)
    if source != "eng":
        status, english = server.post("/v1/audio/translations", fields={**common, "language": code}, files={"file": audio})
        assert status == 200 and english["text"] == expected("srt", source, "eng")
    status, refused = server.post("/v1/audio/transcriptions", fields={**common, "language": "la"}, files={"file": audio})
    assert status == 400 and "no language with that code" in refused["error"]["message"]
    status, _ = server.post("/v1/audio/transcriptions", fields={**common, "language": code}, files={"file": audio},
                            api_key=None)
    assert status == 401
    log = server.log_path.read_text()
    assert "exporting" in log and "curl http://127.0.0.1:" in log  # mcat serve's own lines, before the exec

    audio_part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(audio).decode(), "format": "wav"}}
    text_part = {"type": "text", "text": build_prompt("srt", source, target)}
    status, chat = server.post("/v1/chat/completions", body={
        "model": str(server.export), "max_tokens": MAX_NEW_TOKENS, "temperature": 0,
        "vllm_xargs": {"no_repeat_ngram_size": NO_REPEAT},
        "messages": [{"role": "user", "content": [audio_part, text_part]}]})
    assert status == 200, chat
    assert chat["choices"][0]["message"]["content"] == expected("srt", source, target)

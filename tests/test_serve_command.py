"""mcat serve's command line for vLLM's server, checked without vLLM (tests/test_vllm_serve.py starts
it): MCAT's settings, and the user's vLLM options passed on and winning over ours."""

import json

from mcat_ds.cli import build_parser
from mcat_ds.infer.export import CHAT_TEMPLATE_FILE
from mcat_ds.infer.serve import ServeOptions, example_requests, server_command

TINY = {"max_position_embeddings": 1024, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "hidden_size": 64}


def value(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def test_the_server_gets_mcats_settings_and_the_users_vllm_options_win(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    (tmp_path / CHAT_TEMPLATE_FILE).write_text("{{ bos_token }}")
    command = server_command(ServeOptions(str(tmp_path), port=9000, api_key="k"), tmp_path, "float32", on_cpu=True)
    assert command[1:4] == ["-m", "vllm.entrypoints.openai.api_server", "--model"]
    assert value(command, "--max-model-len") == "1024" and value(command, "--port") == "9000"
    assert value(command, "--api-key") == "k"
    assert "--logits-processors" not in command  # the installed package gives vLLM its no-repeat processor
    assert value(command, "--chat-template") == str(tmp_path / CHAT_TEMPLATE_FILE)
    assert int(value(command, "--kv-cache-memory-bytes")) > 0
    assert "--enforce-eager" in command and "--skip-mm-profiling" in command

    mine = ("--max-model-len", "512", "--gpu-memory-utilization=0.3", "--max-num-seqs", "8")
    command = server_command(ServeOptions(str(tmp_path), vllm_args=mine), tmp_path, "float32", on_cpu=True)
    assert command.count("--max-model-len") == 1 and command[-len(mine):] == list(mine)
    assert "--kv-cache-memory-bytes" not in command  # the user sized memory themselves
    on_gpu = server_command(ServeOptions(str(tmp_path)), tmp_path, "bfloat16", on_cpu=False)
    assert "--enforce-eager" not in on_gpu and "--kv-cache-memory-bytes" not in on_gpu


def test_options_mcat_does_not_know_go_to_vllm_only_for_serve(capsys):
    from mcat_ds.cli import main

    args, unknown = build_parser().parse_known_args(["serve", "--checkpoint", "c", "--max-num-seqs", "16", "--port", "1"])
    assert (args.port, unknown) == (1, ["--max-num-seqs", "16"])
    try:
        main(["evaluate", "--hyps", "h", "--out", "o", "--max-num-seqs", "16"])
    except SystemExit as exit:
        assert exit.code == 2
    assert "unrecognized arguments: --max-num-seqs 16" in capsys.readouterr().err


def test_the_example_requests_name_the_endpoint_model_and_key():
    text = example_requests("http://127.0.0.1:8000", "/models/x.export", "secret")
    assert "curl http://127.0.0.1:8000/v1/audio/translations -H 'Authorization: Bearer secret'" in text
    assert "extra_body={'language': 'de', 'to_language': 'fr'}" in text and "model='/models/x.export'" in text


def wav_bytes(seconds: float = 0.5) -> bytes:
    import io

    import numpy as np
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros(int(16000 * seconds), np.float32), 16000, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def multipart(files: dict[str, bytes], fields: dict[str, str]) -> tuple[str, bytes]:
    boundary = "b0undary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
             for name, value in fields.items()]
    parts += [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{name}.wav"\r\n'
              f"Content-Type: audio/wav\r\n\r\n".encode() + content + b"\r\n" for name, content in files.items()]
    return f"multipart/form-data; boundary={boundary}", b"".join(parts) + f"--{boundary}--\r\n".encode()


def test_a_wav_cut_short_is_named_and_others_pass():
    from mcat_ds.infer.serve_checks import upload_problem, wav_problem

    whole = wav_bytes()
    assert wav_problem(whole) is None
    assert "data chunk claims 16000 bytes of samples, the upload holds 8000" in wav_problem(whole[:44 + 8000])
    assert "ends before its data chunk" in wav_problem(whole[:30])
    assert wav_problem(b"not audio at all") is None and wav_problem(b"") is None  # vLLM judges those
    streamed = whole[:40] + b"\xff\xff\xff\xff" + whole[44:44 + 100]  # a writer that could not seek back
    assert wav_problem(streamed) is None

    content_type, body = multipart({"file": whole[:1000]}, {"model": "m", "language": "en"})
    assert upload_problem(content_type, body).startswith("file (file.wav): a WAV cut short")
    content_type, body = multipart({"file": whole}, {"model": "m"})
    assert upload_problem(content_type, body) is None


def test_the_upload_check_refuses_a_cut_wav_and_replays_a_whole_one():
    import asyncio

    from mcat_ds.infer.serve_checks import AudioUploadCheck

    def call(path: str, body: bytes, content_type: str):
        seen, sent = [], []

        async def app(scope, receive, send):
            while True:  # the app reads the body as vLLM would
                message = await receive()
                seen.append(message.get("body", b""))
                if not message.get("more_body"):
                    break
            await send({"type": "http.response.start", "status": 200, "headers": []})

        chunks = [body[i:i + 700] for i in range(0, len(body), 700)]
        messages = [{"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1}
                    for i, chunk in enumerate(chunks)]

        async def receive():
            return messages.pop(0)

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": path,
                 "headers": [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]}
        asyncio.run(AudioUploadCheck(app)(scope, receive, send))
        return b"".join(seen), sent

    content_type, body = multipart({"file": wav_bytes()}, {"model": "m"})
    seen, sent = call("/v1/audio/translations", body, content_type)
    assert seen == body and sent[0]["status"] == 200  # read here, then handed on byte for byte
    content_type, body = multipart({"file": wav_bytes()[:3000]}, {"model": "m"})
    seen, sent = call("/v1/audio/transcriptions", body, content_type)
    assert seen == b"" and sent[0]["status"] == 400
    assert json.loads(sent[1]["body"])["error"]["message"].startswith("file (file.wav): a WAV cut short")
    seen, sent = call("/v1/chat/completions", body, content_type)  # not an upload endpoint: untouched
    assert seen == body and sent[0]["status"] == 200

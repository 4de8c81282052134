"""A check ``mcat serve`` puts in front of vLLM's audio endpoints: WAV uploads that are cut short.

libsndfile (what vLLM decodes WAV with) reads a WAV whose data ends before its header says as if it
were whole: a half-uploaded file would be answered from its first part, without a word. This ASGI
middleware reads a multipart upload to ``/v1/audio/*``, and a WAV part whose data chunk claims
more bytes of samples than it holds (or that ends before its data chunk) gets a 400 naming the part, what it claims and what it holds.
Everything else (other paths, other formats, well-formed WAVs, uploads over vLLM's size limit,
which vLLM refuses itself) passes to vLLM unchanged, body included.

Installed with ``--middleware mcat_ds.infer.serve_checks.AudioUploadCheck`` (``mcat serve`` adds it).
"""

from __future__ import annotations

import json
import os
import struct
from email.parser import BytesParser
from email.policy import HTTP

AUDIO_PATHS = ("/v1/audio/transcriptions", "/v1/audio/translations")
UNKNOWN_SIZES = (0, 0xFFFFFFFF)
"""Chunk sizes a streaming writer leaves when it cannot seek back: the length is not claimed."""


def wav_problem(data: bytes) -> str | None:
    """Why a RIFF/WAVE file is cut short, or None (also for bytes that are not a WAV: vLLM judges those)."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    position = 12
    while position + 8 <= len(data):
        chunk, size = data[position:position + 4], struct.unpack_from("<I", data, position + 4)[0]
        if chunk == b"data":
            held = len(data) - position - 8
            if size not in UNKNOWN_SIZES and size > held:
                return f"a WAV cut short: its data chunk claims {size} bytes of samples, the upload holds {held}"
            return None
        position += 8 + size + (size & 1)  # chunks are padded to even sizes
    return "a WAV cut short: it ends before its data chunk"


def upload_problem(content_type: str, body: bytes) -> str | None:
    """The first cut-short WAV among a multipart body's files, named by its field and file name."""
    message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode("latin-1") + body)
    if not message.is_multipart():
        return None
    for part in message.iter_parts():
        filename = part.get_filename()
        if filename is None:
            continue
        problem = wav_problem(part.get_payload(decode=True) or b"")
        if problem is not None:
            return f"{part.get_param('name', header='content-disposition')} ({filename}): {problem}"
    return None


def size_limit_bytes() -> int:
    """vLLM's upload limit (``VLLM_MAX_AUDIO_CLIP_FILESIZE_MB``, 25 by default); larger bodies are
    not read here, vLLM refuses them."""
    return int(float(os.environ.get("VLLM_MAX_AUDIO_CLIP_FILESIZE_MB", "25")) * 2**20)


class AudioUploadCheck:
    """ASGI middleware: 400 for a cut-short WAV upload to the audio endpoints (module docstring)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in AUDIO_PATHS:
            return await self.app(scope, receive, send)
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        content_type = headers.get("content-type", "")
        limit = size_limit_bytes() + 2**16  # room for the form's other fields
        declared = headers.get("content-length")
        if not content_type.startswith("multipart/form-data") or (declared is not None and int(declared) > limit):
            return await self.app(scope, receive, send)
        messages, size, more = [], 0, True
        while more and size <= limit:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return await self.app(scope, self._replay(messages + [message], receive), send)
            messages.append(message)
            size += len(message.get("body", b""))
            more = message.get("more_body", False)
        if not more:
            problem = upload_problem(content_type, b"".join(message.get("body", b"") for message in messages))
            if problem is not None:
                return await self._refuse(send, problem)
        await self.app(scope, self._replay(messages, receive), send)

    @staticmethod
    def _replay(messages, receive):
        pending = list(messages)

        async def replayed():
            return pending.pop(0) if pending else await receive()

        return replayed

    @staticmethod
    async def _refuse(send, problem: str) -> None:
        # vLLM's error body, which the openai client reads
        body = json.dumps({"error": {"message": problem, "type": "BadRequestError", "param": "file",
                                     "code": 400}}).encode()
        await send({"type": "http.response.start", "status": 400,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

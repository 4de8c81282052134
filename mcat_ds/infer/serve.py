"""``mcat serve``: vLLM's OpenAI-compatible server on an MCAT model, in one command.

    mcat serve --checkpoint CKPT_OR_EXPORT [--host 127.0.0.1] [--port 8000] [--api-key KEY] [vLLM options...]

A training checkpoint is exported once (``mcat export``, to ``--export-dir``, default
``CKPT.export``; reused while it is of the checkpoint's content in that dtype); an export is served
as is. The process then becomes vLLM's server (``exec``: one process, the server's exit status and
signals are its own) with what MCAT needs and vLLM does not know:

- the model's length and, on CPU, its KV cache, chosen for the model and machine
  (``mcat_ds.infer.vllm_settings``);
- the export's chat template (BOS and the tags, no turns);
- a check of WAV uploads that are cut short (``mcat_ds.infer.serve_checks``), which vLLM would
  answer from their first part;
- on CPU, ``--enforce-eager`` and ``--skip-mm-profiling``: the warm-up would run the encoder on
  dozens of 30 s dummy audios, minutes on a few cores.

The release's decoding settings come from the export itself: ``max_new_tokens`` from its
``generation_config.json``, ``no_repeat_ngram_size`` through the logits processor the package
installs into vLLM (``mcat_ds.infer.vllm_no_repeat``); a request's own values win.

Options after ours go to vLLM unchanged; one of these set there replaces ours. The server is
started as ``python -m vllm.entrypoints.openai.api_server``: the CPU build's ``vllm`` command looks
for a distribution named ``vllm`` and fails.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

UPLOAD_CHECK = "mcat_ds.infer.serve_checks.AudioUploadCheck"


@dataclass(frozen=True)
class ServeOptions:
    checkpoint: str
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    export_dir: str | None = None
    dtype: str | None = None
    """bf16 on GPU, fp32 on CPU by default."""
    vllm_args: tuple[str, ...] = ()


def _given(flag: str, args: tuple[str, ...]) -> bool:
    return any(arg == flag or arg.startswith(flag + "=") for arg in args)


def server_command(options: ServeOptions, export: Path, dtype: str, on_cpu: bool) -> list[str]:
    """The argv of vLLM's server on ``export``: ours, then the user's vLLM options (which win)."""
    from mcat_ds.infer.export import CHAT_TEMPLATE_FILE, DTYPES
    from mcat_ds.infer.vllm_settings import VllmSettings, resolve_settings

    settings = resolve_settings(VllmSettings(), export, DTYPES[dtype].itemsize, on_cpu)
    ours = [("--host", options.host), ("--port", str(options.port)), ("--dtype", dtype),
            ("--max-model-len", str(settings.max_model_len))]
    if (export / CHAT_TEMPLATE_FILE).is_file():
        ours.append(("--chat-template", str(export / CHAT_TEMPLATE_FILE)))
    if options.api_key:
        ours.append(("--api-key", options.api_key))
    if on_cpu and settings.kv_cache_memory_bytes is not None and not _given("--gpu-memory-utilization",
                                                                                options.vllm_args):
        ours.append(("--kv-cache-memory-bytes", str(settings.kv_cache_memory_bytes)))
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(export)]
    for flag, value in ours:
        if not _given(flag, options.vllm_args):
            command += [flag, value]
    # vLLM takes several; ours is added to the user's
    command += ["--middleware", UPLOAD_CHECK]
    if on_cpu:
        command += [flag for flag in ("--enforce-eager", "--skip-mm-profiling") if not _given(flag, options.vllm_args)]
    return command + list(options.vllm_args)


def example_requests(url: str, model: str, api_key: str | None) -> str:
    """What to send: curl and the official openai client."""
    key = f" -H 'Authorization: Bearer {api_key}'" if api_key else ""
    return (f"mcat serve: {url}/v1 (model {model!r}); for example:\n"
            f"  curl {url}/v1/audio/translations{key} -F model={model} -F file=@talk.wav "
            "-F language=de -F to_language=fr\n"
            f"  python -c \"from openai import OpenAI; c = OpenAI(base_url='{url}/v1', api_key='{api_key or 'none'}'); "
            f"print(c.audio.translations.create(model='{model}', file=open('talk.wav', 'rb'), "
            "extra_body={'language': 'de', 'to_language': 'fr'}).text)\"")


def run_serve(options: ServeOptions) -> int:
    """Export if needed, then become vLLM's server (returns only when the exec failed)."""
    import torch

    from mcat_ds.infer.export import export_checkpoint, export_matches, is_export
    from mcat_ds.infer.translate_command import TORCH_DTYPES
    from mcat_ds.optional import require

    require("vllm")  # before any export: without vLLM there is nothing to serve with
    on_cpu = not torch.cuda.is_available()
    dtype = TORCH_DTYPES[options.dtype or ("fp32" if on_cpu else "bf16")]
    checkpoint = Path(options.checkpoint)
    if is_export(checkpoint):
        export = checkpoint
    elif checkpoint.is_dir():
        export = Path(options.export_dir or f"{checkpoint.resolve()}.export")
        if is_export(export):
            problem = export_matches(export, str(checkpoint), dtype)
            if problem is not None:
                raise ValueError(f"--export-dir {export}: {problem}; remove it or pick another --export-dir")
        else:
            print(f"mcat serve: exporting {checkpoint} ({dtype}) to {export}", file=sys.stderr, flush=True)
            export_checkpoint(str(checkpoint.resolve()), export, dtype)
    else:
        raise ValueError(f"--checkpoint {checkpoint}: no such checkpoint or export")
    command = server_command(options, export, dtype, on_cpu)
    print(example_requests(f"http://{options.host}:{options.port}", str(export), options.api_key), flush=True)
    os.execv(command[0], command)
    return 1  # not reached: execv replaces this process or raises

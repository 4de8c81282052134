"""``mcat translate`` from its options to merged outputs, on one process or many.

What happens around :func:`mcat_ds.infer.translate.translate`, in order, so that a typo costs
seconds and not a 27B load, and a rerun never mixes runs:

1. every rank checks the arguments (data, output folder, directions) before any weights load;
2. ranks join one process group (torchrun, deepspeed or srun set RANK and WORLD_SIZE), with a
   timeout long enough for the slowest rank's share and for rank 0's vLLM export;
3. rank 0 shards a manifest next to the output (again when the manifest changed);
4. every rank compares the output's identity (model content, dtype, task, data, generation) with
   what this run would write and reads the finished outputs once, before any rank writes;
5. a finished run merges and loads nothing; otherwise the model (or a vLLM export, made once and
   reused while it is of the checkpoint's current content) decodes the rest.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from mcat_ds.config import GenerationConfig, Task
from mcat_ds.data.prepare import INDEX_FILE
from mcat_ds.files import file_sha256
from mcat_ds.infer.outputs import (
    OutputIdentity,
    check_output_identity,
    merge_outputs,
    read_outputs,
    write_output_identity,
)
from mcat_ds.infer.requests import DEFAULT_BATCH, EngineName, TranslateConfig, plan_requests

RANK_TIMEOUT = timedelta(hours=12)
"""How long a rank waits at a barrier for the others: the fastest rank waits there for the slowest
one's whole share (and, with vLLM, for rank 0's export of a 27B checkpoint)."""

MANIFEST_SOURCE_FILE = "manifest_source.json"
"""In the shards made from a manifest: which manifest (content) and audio root they were made from."""

TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclass(frozen=True)
class TranslateJob:
    """The options of ``mcat translate`` (see its --help)."""

    checkpoint: str
    data: str
    out: str
    audio_root: str | None = None
    task: Task = "srt"
    directions: str = "all"
    batch: int | None = None
    beams: int | None = None
    max_new_tokens: int | None = None
    no_repeat_ngram_size: int | None = None
    long_audio: str = "trim"
    engine: EngineName = "fast"
    export_dir: str | None = None
    tensor_parallel: int = 1
    gpu_memory_utilization: float | None = None
    """vllm; None: chosen for the machine (mcat_ds.infer.vllm_settings)."""
    max_model_len: int | None = None
    """vllm; None: what MCAT's requests need, at most what the model allows."""
    device: str | None = None
    dtype: str | None = None
    encoder_checkpoint: str | None = None
    llm_checkpoint: str | None = None


def _say(text: str) -> None:
    print(f"mcat translate: {text}", file=sys.stderr, flush=True)


def translate_data(job: TranslateJob, prepare: bool = True) -> Path:
    """The prepared shard directory to read: ``--data`` itself, or a manifest sharded next to the
    output (by the process given ``prepare``) and sharded again when the manifest or audio root
    changed. Checked before any weights load."""
    data, out = Path(job.data), Path(job.out)
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; it names the JSONL file to write")
    if not out.parent.is_dir():
        raise ValueError(f"--out {out}: its directory {out.parent} does not exist")
    if data.is_dir():
        if not (data / INDEX_FILE).is_file():
            raise ValueError(f"--data {data} holds no {INDEX_FILE}: prepare it with `mcat prepare` (or pass a manifest)")
        return data
    if not data.is_file():
        raise ValueError(f"--data {data}: no such shard directory or manifest")
    if not job.audio_root:
        raise ValueError("a manifest needs --audio-root (the directory its audio paths are relative to)")
    shards = out.with_name(out.name + ".shards")
    if prepare:
        source = {"manifest": str(data.resolve()), "manifest_sha256": file_sha256(data),
                  "audio_root": str(Path(job.audio_root).resolve())}
        _shard_manifest(data, Path(job.audio_root), shards, source)
    return shards


def _shard_manifest(manifest: Path, audio_root: Path, shards: Path, source: dict) -> None:
    import shutil

    from mcat_ds.data.prepare import prepare_shards
    from mcat_ds.data.sources import read_manifest
    from mcat_ds.files import write_atomically

    recorded = shards / MANIFEST_SOURCE_FILE
    if (shards / INDEX_FILE).is_file():
        try:
            if json.loads(recorded.read_text(encoding="utf-8")) == source:
                return
        except (OSError, ValueError):
            pass
        _say(f"{shards} was made from another manifest or audio root (or its record is missing): sharding again")
        shutil.rmtree(shards)  # derived from the manifest alone
    # Long audio is kept here (and trimmed or skipped by translate), so every test utterance is counted.
    prepare_shards(read_manifest(manifest, audio_root), shards, max_seconds=float("inf"))
    write_atomically(recorded, json.dumps(source, indent=1) + "\n")


def generation_settings(checkpoint: str) -> GenerationConfig:
    """The checkpoint's generation settings: an MCAT checkpoint's config, or an export's speech.json."""
    from mcat_ds.checkpoint import read_checkpoint_config
    from mcat_ds.config import from_dict
    from mcat_ds.infer.export import is_export, read_export_description

    if is_export(checkpoint):
        return from_dict(GenerationConfig, read_export_description(checkpoint)["generation"],
                         where=f"{checkpoint}: speech.json: generation: ")
    return read_checkpoint_config(checkpoint).generation


def model_fingerprint(checkpoint: str) -> str:
    """The content fingerprint of an MCAT checkpoint, or of the checkpoint an export was made from."""
    from mcat_ds.checkpoint import checkpoint_fingerprint
    from mcat_ds.infer.export import LLM_DIR, SPEECH_DIR, SPEECH_FILE, is_export, read_export_description

    if not is_export(checkpoint):
        return checkpoint_fingerprint(checkpoint)
    recorded = read_export_description(checkpoint).get("checkpoint_fingerprint")
    if recorded:
        return recorded
    # an export made before fingerprints were recorded: its own files say what it is
    return "export-" + file_sha256(Path(checkpoint) / SPEECH_DIR / SPEECH_FILE)[:16] + "-" + \
        file_sha256(Path(checkpoint) / LLM_DIR / "config.json")[:16]


def vllm_export(job: TranslateJob, dtype: str, rank: int, barrier) -> str:
    """The export vLLM serves: ``--checkpoint`` itself when it is one, else the checkpoint exported
    once (by rank 0) to ``--export-dir`` (default: next to the output) and reused while it is of the
    checkpoint's current content in ``dtype``."""
    from mcat_ds.infer.export import export_checkpoint, export_matches, is_export

    if is_export(job.checkpoint):
        return job.checkpoint
    target = Path(job.export_dir or f"{job.out}.export")
    if is_export(target):  # checked on every rank, so that none waits on a rank 0 that failed here
        problem = export_matches(target, job.checkpoint, dtype)
        if problem is not None:
            raise ValueError(f"--export-dir {target}: {problem}; remove it or pick another --export-dir")
        if rank == 0:
            _say(f"serving the export in {target}")
    elif rank == 0:
        _say(f"exporting {job.checkpoint} ({dtype}) to {target} for vLLM")
        export_checkpoint(str(Path(job.checkpoint).resolve()), target, dtype,
                          encoder_checkpoint=job.encoder_checkpoint, llm_checkpoint=job.llm_checkpoint)
    if barrier is not None:
        barrier()
    return str(target)


def load_decoder(model_path: str, config: TranslateConfig, device, dtype_name: str, *, tensor_parallel: int = 1,
                 max_model_len: int | None = None, gpu_memory_utilization: float | None = None,
                 encoder_checkpoint: str | None = None, llm_checkpoint: str | None = None):
    """(speech side, engine, tokenizer) for ``config.engine``: an MCAT checkpoint's model for the
    fast and hf engines; for vLLM, which encodes inside its engine, no speech side and an export
    (``vllm_export``)."""
    import torch

    dtype = getattr(torch, dtype_name)
    if config.engine == "vllm":
        from transformers import AutoTokenizer

        from mcat_ds.infer.export import LLM_DIR, read_export_description
        from mcat_ds.infer.vllm_engine import VllmEngine, VllmSettings

        hf_tokenizer = AutoTokenizer.from_pretrained(os.path.join(model_path, LLM_DIR))
        settings = VllmSettings(tensor_parallel=tensor_parallel, max_model_len=max_model_len,
                                gpu_memory_utilization=gpu_memory_utilization)
        engine = VllmEngine(model_path, max_new_tokens=config.max_new_tokens,
                            no_repeat_ngram_size=config.no_repeat_ngram_size,
                            # exports before eos_token_id was recorded: the tokenizer's is the same id
                            eos_token_id=read_export_description(model_path).get("eos_token_id", hf_tokenizer.eos_token_id),
                            dtype=dtype_name, settings=settings)
        return None, engine, hf_tokenizer
    from mcat_ds.checkpoint import load_checkpoint
    from mcat_ds.infer.translate import TorchEngine

    model, tokenizer, _ = load_checkpoint(model_path, encoder_checkpoint=encoder_checkpoint,
                                          llm_checkpoint=llm_checkpoint)
    model.to(device=device, dtype=dtype).eval()
    return model, TorchEngine(model, config), tokenizer.hf


def _translate_config(job: TranslateJob, generation: GenerationConfig) -> TranslateConfig:
    config = TranslateConfig(
        task=job.task, directions=job.directions,
        batch=job.batch or DEFAULT_BATCH[job.engine],
        beams=generation.beams if job.beams is None else job.beams,
        max_new_tokens=generation.max_new_tokens if job.max_new_tokens is None else job.max_new_tokens,
        no_repeat_ngram_size=(generation.no_repeat_ngram_size if job.no_repeat_ngram_size is None
                              else job.no_repeat_ngram_size),
        engine=job.engine, long_audio=job.long_audio,
    )
    if config.engine == "vllm" and config.beams > 1:
        raise ValueError(f"beams={config.beams}: --engine vllm decodes greedily; "
                         "use --engine hf for beams (or --beams 1)")
    return config


def process_rank(engine: EngineName, tensor_parallel: int) -> tuple[int, int]:
    """(rank, world size) of this decoding process: torchrun, deepspeed or srun set them; one
    process alone is rank 0 of 1. A vLLM rank is shown only its own GPUs, so this runs before the
    first CUDA call (importing torch does not make one)."""
    from mcat_ds.rendezvous import rank_gpus, rendezvous_environment

    world = {**os.environ, **rendezvous_environment(dict(os.environ))}
    rank, world_size = int(world["RANK"]), int(world["WORLD_SIZE"])
    if engine == "vllm" and world_size > 1:
        os.environ["CUDA_VISIBLE_DEVICES"] = rank_gpus(world, int(world.get("LOCAL_RANK", 0)),
                                                       int(world.get("LOCAL_WORLD_SIZE", 1)), tensor_parallel)
    return rank, world_size


def join_ranks(engine: EngineName, rank: int, world_size: int, say: Callable[[str], None]
               ) -> Callable[[], None] | None:
    """The barrier of the decoding ranks' process group (None for one process)."""
    if world_size == 1:
        return None
    import torch
    import torch.distributed as dist

    from mcat_ds.rendezvous import prepare_rendezvous

    chosen = prepare_rendezvous(os.environ)
    if rank == 0:
        say(chosen)
    # vLLM's workers own the GPUs; the ranks only need a barrier
    backend = "nccl" if torch.cuda.is_available() and engine != "vllm" else "gloo"
    dist.init_process_group(backend, timeout=RANK_TIMEOUT)
    return dist.barrier


def decoding_device(requested: str | None, engine: EngineName):
    """``--device``, else this rank's GPU (vLLM: the first it is shown), else the CPU."""
    import torch

    local = 0 if engine == "vllm" else int(os.environ.get("LOCAL_RANK", 0))  # vLLM: GPUs pinned by process_rank
    return torch.device(requested or (f"cuda:{local}" if torch.cuda.is_available() else "cpu"))


def run_translate_job(job: TranslateJob) -> int:
    """``mcat translate``: see the module docstring. Returns the exit code."""
    rank, world_size = process_rank(job.engine, job.tensor_parallel)

    from mcat_ds.data.shards import load_index
    from mcat_ds.infer.translate import output_order

    config = _translate_config(job, generation_settings(job.checkpoint))
    translate_data(job, prepare=False)  # every rank checks the arguments before anyone waits
    out = Path(job.out)
    # torchrun, deepspeed or srun (launch/slurm/translate.sbatch): one process per GPU
    barrier = join_ranks(config.engine, rank, world_size, _say)
    data = translate_data(job, prepare=rank == 0)
    if barrier is not None:
        barrier()  # rank 0 has sharded a manifest
    entries = load_index(data)
    requests = plan_requests(entries, config)
    if not requests:
        raise ValueError(f"no {job.task} requests in {data} for --directions {job.directions}")

    device = decoding_device(job.device, config.engine)
    dtype_name = TORCH_DTYPES[job.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    identity = OutputIdentity(
        checkpoint=str(Path(job.checkpoint).resolve()), model=model_fingerprint(job.checkpoint), dtype=dtype_name,
        task=config.task, data=str(data.resolve()), data_sha256=file_sha256(data / INDEX_FILE),
        generation={"beams": config.beams, "max_new_tokens": config.max_new_tokens,
                    "no_repeat_ngram_size": config.no_repeat_ngram_size, "long_audio": config.long_audio},
    )
    note = check_output_identity(out, identity)  # every rank, before any writes: all refuse or none
    done = read_outputs(out, warn=_say if rank == 0 else None)
    finished = all(request.id in done for request in requests)
    if rank == 0:
        if note:
            _say(note)
        write_output_identity(out, identity)
    if barrier is not None:
        barrier()  # every rank has read and decided before any writes
    if finished:  # a finished run again: no weights to load
        if rank == 0:
            merge_outputs(out, output_order(entries, config))
            print(f"mcat translate: all {len(requests)} outputs are already in {out}")
        return 0
    if rank == 0:
        print(f"mcat translate: {config.engine} engine, beams={config.beams}, max_new_tokens={config.max_new_tokens}, "
              f"no_repeat_ngram_size={config.no_repeat_ngram_size} (the checkpoint's generation settings "
              "unless a flag set them)")
    model_path = vllm_export(job, dtype_name, rank, barrier) if config.engine == "vllm" else job.checkpoint
    speech_side, engine, hf_tokenizer = load_decoder(
        model_path, config, device, dtype_name, tensor_parallel=job.tensor_parallel, max_model_len=job.max_model_len,
        gpu_memory_utilization=job.gpu_memory_utilization, encoder_checkpoint=job.encoder_checkpoint,
        llm_checkpoint=job.llm_checkpoint)
    from mcat_ds.infer.translate import translate

    summary = translate(speech_side, engine, hf_tokenizer, data, out, config, rank=rank, world_size=world_size,
                        barrier=barrier, done=done)
    if rank == 0:
        long_audio = (f"{len(summary.trimmed_audio)} trimmed to the window" if config.long_audio == "trim"
                      else f"{len(summary.long_audio_skipped)} skipped as longer than the window")
        print(f"mcat translate: {summary.written} new outputs ({summary.already_done} already there) of "
              f"{summary.requests} requests in {summary.seconds:.1f} s; {summary.utterances_encoded} utterances encoded; "
              f"{len(summary.skipped_audio)} skipped audio; long audio: {long_audio}; "
              f"{summary.srt_malformed} malformed SRT outputs -> {out}")
    return 0

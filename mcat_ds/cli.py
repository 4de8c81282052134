"""The ``mcat`` command."""

from __future__ import annotations

import argparse
import json
import sys

from mcat_ds.config import ConfigError


def _add_config_arguments(parser: argparse.ArgumentParser, default_preset: str) -> None:
    parser.add_argument("--preset", default=default_preset, help="tiny, small-9b or large-27b (default: %(default)s)")
    parser.add_argument("--config", dest="config_file", help="JSON or TOML file of config overrides")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one config value, e.g. --set model.lora.rank=32 (repeatable)",
    )


def _resolved_config(args: argparse.Namespace):
    from mcat_ds.presets import resolve_config

    return resolve_config(args.preset, args.config_file, args.overrides)


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
    out = import_release_checkpoint(args.model_pt, config, args.out)
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mcat", description="MCAT many-to-many speech translation")
    commands = parser.add_subparsers(dest="command", required=True)

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
    release_parser.set_defaults(handler=import_release)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ConfigError, KeyError, ValueError, FileNotFoundError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"mcat {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

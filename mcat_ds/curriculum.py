"""The curriculum of paper Algorithm 1, as data.

    asr-l2 -> asr-l28 -> asr-l44 -> asr-l70 -> asr-balanced -> smt -> srt -> srt-balanced

Each stage names its task, language set, caps and the stage whose final checkpoint it starts from.
A preset lists the stages it runs (``MCATConfig.curriculum``); a stage whose starting stage is not
in that list starts from the closest listed stage up its chain (MCAT-Small, 28 languages, has no
use for asr-l44 and asr-l70, so its asr-balanced starts from asr-l28). A stage trains on its
language set intersected with the model's languages.
"""

from __future__ import annotations

import dataclasses

from mcat_ds.config import ConfigError, MCATConfig, StageConfig
from mcat_ds.data.plan import ExampleSelection
from mcat_ds.languages import resolve_language_set

STAGES: dict[str, StageConfig] = {
    "asr-l2": StageConfig(task="asr", languages="L2", init_from=None),
    "asr-l28": StageConfig(task="asr", languages="L28", init_from="asr-l2"),
    "asr-l44": StageConfig(task="asr", languages="L44", init_from="asr-l28"),
    "asr-l70": StageConfig(task="asr", languages="L70", init_from="asr-l44"),
    "asr-balanced": StageConfig(task="asr", languages="L70", max_per_language=10_000, init_from="asr-l70"),
    "smt": StageConfig(task="smt", languages="L70", init_from="asr-balanced"),
    "srt": StageConfig(task="srt", languages="L70", init_from="smt"),
    "srt-balanced": StageConfig(task="srt", languages="L70", max_per_direction=100, init_from="srt"),
}


def stage_names(config: MCATConfig) -> tuple[str, ...]:
    for name in config.curriculum:
        if name not in STAGES:
            raise ConfigError(f"curriculum names unknown stage {name!r}; stages are {', '.join(STAGES)}")
    return config.curriculum


def select_stage(config: MCATConfig, name: str) -> MCATConfig:
    """``config`` with ``config.stage`` set to stage ``name`` (the preset's lengths and batch kept)."""
    names = stage_names(config)
    if name not in names:
        raise ConfigError(f"stage {name!r} is not in the {config.preset} curriculum: {' -> '.join(names)}")
    definition = STAGES[name]
    origin = definition.init_from
    while origin is not None and origin not in names:
        origin = STAGES[origin].init_from
    config.stage = dataclasses.replace(
        config.stage,
        name=name,
        task=definition.task,
        languages=definition.languages,
        max_per_language=definition.max_per_language,
        max_per_direction=definition.max_per_direction,
        init_from=origin,
    )
    return config


def stage_languages(config: MCATConfig) -> tuple[str, ...]:
    model_languages = set(resolve_language_set(config.model.languages))
    return tuple(code for code in resolve_language_set(config.stage.languages) if code in model_languages)


def example_selection(config: MCATConfig) -> ExampleSelection:
    languages = stage_languages(config)
    if not languages:
        raise ConfigError(
            f"stage {config.stage.name!r} selects no language: {config.stage.languages} shares none with the "
            f"model's languages {config.model.languages}"
        )
    return ExampleSelection(
        task=config.stage.task,
        languages=languages,
        max_per_language=config.stage.max_per_language,
        max_per_direction=config.stage.max_per_direction,
        targets_per_utterance=config.stage.targets_per_utterance,
    )

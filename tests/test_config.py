import json

import pytest

from mcat_ds.config import ConfigError, MCATConfig, apply_file, apply_overrides, from_dict
from mcat_ds.presets import PRESETS, get_preset, resolve_config


def test_overrides_are_parsed_by_field_type():
    config = apply_overrides(get_preset("small-9b"), [
        "model.lora.rank=32",
        "optim.lr=1e-4",
        "model.adapter.mask_padding_frames=false",
        "model.lora.target_modules=q_proj,k_proj,v_proj",
        "optim.betas=0.9,0.95",
        "stage.max_per_language=10000",
        "stage.max_per_direction=none",
        "model.llm.language_tags=text",
    ])
    assert config.model.lora.rank == 32
    assert config.optim.lr == 1e-4
    assert config.model.adapter.mask_padding_frames is False
    assert config.model.lora.target_modules == ("q_proj", "k_proj", "v_proj")
    assert config.optim.betas == (0.9, 0.95)
    assert config.stage.max_per_language == 10000 and config.stage.max_per_direction is None
    assert config.model.llm.language_tags == "text"


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.lora.rnak=3", r"unknown config key 'model.lora.rnak'.*did you mean model.lora.rank"),
        ("modle.lora.rank=3", r"unknown config key 'modle.lora.rank': the top level has preset, curriculum, model.*did you mean model\?"),
        ("model.lora.rank=three", r"model.lora.rank: expected an integer, got 'three'"),
        ("optim.lr=fast", r"optim.lr: expected a number"),
        ("model.adapter.mask_padding_frames=maybe", r"expected true or false"),
        ("model.llm.language_tags=emoji", r"expected one of 'special', 'text'"),
        ("optim.betas=0.9", r"expected 2 values"),
        ("model.lora=3", r"is a section"),
        ("model.lora.rank.x=3", r"model.lora.rank is a value, not a section"),
        ("no_equals_sign", r"not of the form key=value"),
    ],
)
def test_bad_overrides_are_rejected_with_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(get_preset("tiny"), [override])


def test_file_overrides_json_and_toml(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('[model.lora]\nrank = 8\n[optim]\nlr = 2e-4\nbetas = [0.9, 0.95]\n')
    config = apply_file(get_preset("small-9b"), toml)
    assert config.model.lora.rank == 8 and config.optim.lr == 2e-4 and config.optim.betas == (0.9, 0.95)

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model": {"lora": {"rank": "8"}}}))
    with pytest.raises(ConfigError, match=r"bad.json: model.lora.rank: expected an integer, got '8'"):
        apply_file(get_preset("small-9b"), bad)
    bad.write_text(json.dumps({"model": {"adaptor": {}}}))
    with pytest.raises(ConfigError, match=r"bad.json: unknown config key 'model.adaptor'.*did you mean model.adapter"):
        apply_file(get_preset("small-9b"), bad)
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json: not valid JSON"):
        apply_file(get_preset("small-9b"), bad)


def test_resolved_config_round_trips_through_a_dict():
    for name in PRESETS:
        config = get_preset(name)
        assert from_dict(MCATConfig, config.to_dict()) == config


def test_preset_values_from_the_paper_and_release():
    small, large = get_preset("small-9b"), get_preset("large-27b")
    for config in (small, large):
        adapter = config.model.adapter
        assert (adapter.num_queries, adapter.hidden_size, adapter.num_layers, adapter.pool_stride) == (150, 768, 8, 5)
        assert adapter.num_queries // adapter.pool_stride == 30
        assert adapter.mlp_hidden_size == 2560 and adapter.cross_attention_every == 2
        assert (config.optim.lr, config.optim.warmup_steps) == (5e-5, 1000)
        assert config.model.llm.dtype == "bf16" and config.model.encoder.architecture == "whisper-large-v3"
    assert small.model.llm.architecture == "gemmax2-9b" and small.model.languages == "L28"
    assert large.model.llm.architecture == "gemma-3-27b-it" and large.model.languages == "L70"


def test_resolve_config_layers_preset_file_and_overrides(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"model": {"lora": {"rank": 8}}}))
    config = resolve_config("large-27b", str(path), ["model.lora.rank=4"])
    assert config.model.lora.rank == 4 and config.preset == "large-27b"
    with pytest.raises(ConfigError, match="preset is chosen with --preset"):
        resolve_config("tiny", None, ["preset=small-9b"])
    with pytest.raises(KeyError, match="presets are tiny, small-9b, large-27b"):
        get_preset("medium")

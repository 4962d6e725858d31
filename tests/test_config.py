from __future__ import annotations

import tomllib

import pytest

from vaediag.config import (
    Config,
    all_keys,
    annotated_toml,
    build_config,
    from_dict,
    parse_override,
)
from vaediag.errors import ConfigError


def test_defaults_validate_and_round_trip_through_toml():
    config = Config()
    again = from_dict(tomllib.loads(config.to_toml()))
    assert again == config


def test_annotated_toml_is_valid_toml_with_every_key():
    text = annotated_toml(Config())
    parsed = tomllib.loads(text)
    for key, _, help_text in all_keys():
        section, name = key.split(".")
        assert name in parsed[section]
        assert help_text.splitlines()[0] in text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("optim.lr=1e-3", ("optim", "lr", 1e-3)),
        ("loss.recon=mse_sum", ("loss", "recon", "mse_sum")),  # bare word -> string
        ('loss.recon="bce"', ("loss", "recon", "bce")),
        ("model.channels=[16, 32]", ("model", "channels", [16, 32])),
        ("loss.learn_decoder_scale=true", ("loss", "learn_decoder_scale", True)),
        ("train.steps = 10", ("train", "steps", 10)),
    ],
)
def test_parse_override(text, expected):
    assert parse_override(text) == expected


def test_layers_apply_in_order(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('[optim]\nlr = 0.002\n[model]\nlatent_dim = 8\n')
    config = build_config(preset="tiny", file=f, overrides=["optim.lr=0.003"])
    assert config.data.resolution == 32  # from the preset
    assert config.model.latent_dim == 8  # the file beats the preset
    assert config.optim.lr == 0.003  # --set beats the file
    assert config.model.channels == (16, 32, 64)  # lists become tuples


def test_int_is_accepted_where_a_float_is_expected():
    assert build_config(overrides=["optim.lr=1"]).optim.lr == 1.0
    assert isinstance(build_config(overrides=["optim.lr=1"]).optim.lr, float)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.learning_rate=1", "unknown key 'optim.learning_rate'"),
        ("nosuch.key=1", "unknown key 'nosuch'"),
        ("optim.lr=abc", "optim.lr must be a number, got 'abc'"),
        ("train.steps=1.5", "train.steps must be an integer"),
        ("train.steps=true", "train.steps must be an integer"),
        ("loss.recon=l1", "loss.recon must be one of 'bce', 'mse_sum', 'mse_mean', 'gaussian'"),
        ("model.channels=16", "model.channels must be a list"),
        ("model.channels=[16, 'a']", "model.channels[1] must be an integer"),
        ("loss.learn_decoder_scale=1", "must be true or false"),
        ("optim.betas=[0.9]", "optim.betas must be [beta1, beta2]"),
        ("optim.lr=-1", "optim.lr must be > 0"),
        ("data.resolution=60", "must be divisible by 2**len(model.channels) = 16"),
        ("data.val_size=4", "data.val_size must be at least 8"),
        ("train.device=tpu", "train.device must be auto, cpu, cuda, cuda:N or mps"),
        ("loss.logvar_clamp=[5.0, -5.0]", "loss.logvar_clamp must be [] or [min, max]"),
        ("noequals", "expected section.key=value"),
        ("lr=1", "the key must be section.key"),
    ],
)
def test_bad_overrides_are_rejected_with_a_clear_message(override, message):
    with pytest.raises(ConfigError, match=None) as info:
        build_config(overrides=[override])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_key_suggests_the_closest(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[optim]\nepss = 1e-6\n")
    with pytest.raises(ConfigError, match=r"did you mean 'optim.eps'"):
        build_config(file=f)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        build_config(file=tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim\nlr = 1")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        build_config(file=bad)
    flat = tmp_path / "flat.toml"
    flat.write_text("optim = 3\n")
    with pytest.raises(ConfigError, match=r"\[optim\] must be a table"):
        build_config(file=flat)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        build_config(preset="nope")


def test_group_norm_groups_must_divide_widths():
    with pytest.raises(ConfigError, match="group_norm_groups"):
        build_config(overrides=["model.norm=group", "model.group_norm_groups=5"])
    build_config(overrides=["model.norm=group", "model.group_norm_groups=16"])


def test_docs_list_every_key_exactly():
    from pathlib import Path

    from vaediag.config import reference_markdown

    doc = (Path(__file__).parents[1] / "docs" / "configuration.md").read_text()
    assert reference_markdown() in doc, "update the table: vaediag config --markdown"


def test_every_preset_builds_and_is_described():
    from pathlib import Path

    from vaediag.presets import PRESET_HELP, PRESETS

    doc = (Path(__file__).parents[1] / "docs" / "configuration.md").read_text()
    assert set(PRESET_HELP) == set(PRESETS)
    for name in PRESETS:
        config = build_config(preset=name)
        assert f"`{name}`" in doc, f"docs/configuration.md does not describe preset {name}"
        assert config.data.resolution % 2 ** len(config.model.channels) == 0
    a, b = build_config(preset="seed-decoupling"), build_config(preset="seed-decoupling-stable")
    assert (a.loss.beta, a.loss.beta_schedule, a.loss.free_bits) == (16.0, "warmup", 0.0)
    assert b.loss.free_bits == 1.0 and a.train.steps == b.train.steps == 4000
    assert a.model == b.model and a.data == b.data and a.optim == b.optim


@pytest.mark.parametrize(("given", "meant"), [("optim.learning_rate", "optim.lr"),
                                              ("train.lr", "optim.lr"),
                                              ("model.z_dim", "model.latent_dim"),
                                              ("loss.kl_weight", "loss.beta")])
def test_other_tools_names_suggest_the_key_meant(given, meant):
    with pytest.raises(ConfigError, match=rf"unknown key '{given}' \(did you mean '{meant}'\?\)"):
        build_config(overrides=[f"{given}=1"])


def test_the_probe_presets_written_out_for_the_type_checker_are_the_registry():
    from vaediag import config, probes

    assert tuple(probes.PRESETS) == config.PROBE_PRESETS

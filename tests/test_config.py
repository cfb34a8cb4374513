"""Typed configs: YAML + key=value overrides, conversions, and errors that name the key."""

from dataclasses import dataclass

import pytest

from genalign.config import ConfigError, from_dict, load_config, save_config


@dataclass
class Example:
    steps: int = 10
    lr: float = 1e-4
    name: str = "run"
    flag: bool = False
    targets: tuple[str, ...] | None = None
    limit: int | None = None
    weights: dict | None = None


def test_overrides_are_converted_to_the_field_types():
    cfg = from_dict(Example, {"steps": "20", "lr": "3e-4", "flag": "true", "targets": "to_q,to_k",
                              "limit": "none", "weights": '{"TA": 1.0}'})
    assert cfg.steps == 20 and cfg.lr == 3e-4 and cfg.flag is True
    assert cfg.targets == ("to_q", "to_k")  # PEP 604 optional tuple: split, not kept as one string
    assert cfg.limit is None and cfg.weights == {"TA": 1.0}
    assert from_dict(Example, {"limit": "7"}).limit == 7


@pytest.mark.parametrize("text", ["to_q,to_k", "to_q, to_k", "[to_q, to_k]", '["to_q", "to_k"]'])
def test_a_list_override_reads_commas_and_yaml_list_syntax_alike(text):
    # `[to_q, to_k]` used to become the single target "[to_q"... and `to_q, to_k` kept the space in " to_k"
    assert load_config(Example, None, [f"targets={text}"]).targets == ("to_q", "to_k")


def test_a_misspelt_world_reward_kind_is_an_error_not_an_empty_build():
    from genalign.world.build import BuildConfig

    assert load_config(BuildConfig, None, ["reward_kinds=[video]"]).reward_kinds == ("video",)
    with pytest.raises(ConfigError, match=r"reward_kinds.*\['vidoe'\]"):
        load_config(BuildConfig, None, ["reward_kinds=vidoe"])
    with pytest.raises(ConfigError, match="cannot read '\\[video' as a list"):
        load_config(BuildConfig, None, ["reward_kinds=[video"])


def test_unknown_key_names_it_and_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'stepz'; did you mean steps"):
        from_dict(Example, {"stepz": 3})


@pytest.mark.parametrize("key, value", [("steps", "many"), ("flag", "maybe"), ("weights", "{not json")])
def test_bad_values_name_the_key(key, value):
    with pytest.raises(ConfigError, match=key):
        from_dict(Example, {key: value})


def test_yaml_then_overrides_and_round_trip(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps: 5\nname: base\ntargets: [a, b]\n")
    cfg = load_config(Example, recipe, ["name=override"])
    assert (cfg.steps, cfg.name, cfg.targets) == (5, "override", ("a", "b"))
    saved = save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(Example, saved) == cfg
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Example, tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(Example, None, ["novalue"])


def test_null_for_a_key_that_needs_a_value_is_refused_not_read_as_the_string_none(tmp_path):
    @dataclass
    class Needs:
        name: str = "x"
        count: int = 1
        maybe: str | None = "y"

    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: null\n")
    with pytest.raises(ConfigError, match="'name': needs a value"):
        load_config(Needs, recipe)
    recipe.write_text("maybe: null\n")
    assert load_config(Needs, recipe).maybe is None
    recipe.write_text("count: ~\n")
    with pytest.raises(ConfigError, match="'count': needs a value"):
        load_config(Needs, recipe)

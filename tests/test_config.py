"""Configuration: params.yaml drift, schema validation, every config group composes."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from oipipe.core.config import (
    CONF_DIR,
    PROJECT_ROOT,
    compose,
    load_params,
    validate,
    write_params,
)
from oipipe.core.errors import ConfigError
from oipipe.core.schema import PipelineConf, Schema


def test_params_yaml_matches_a_fresh_composition_of_conf(tmp_path: Path) -> None:
    fresh = tmp_path / "params.yaml"
    write_params(fresh)
    committed = (PROJECT_ROOT / "params.yaml").read_text()
    assert fresh.read_text() == committed, (
        "params.yaml differs from conf/ composed: run `make params` and commit the result"
    )


# conf/hydra/ holds Hydra's own settings for sweeps (tests/test_sweep.py composes them)
@pytest.mark.parametrize(
    "group", sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra")
)
def test_every_option_of_every_group_composes_and_validates(group: str) -> None:
    options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
    assert options, f"conf/{group} has no option"
    composed = {}
    for option in options:
        cfg = compose([f"{group}={option}"])
        composed[option] = OmegaConf.to_container(cfg[group])
        # the option chosen is the one in effect: every value its file sets is in the config
        own = OmegaConf.to_container(OmegaConf.load(CONF_DIR / group / f"{option}.yaml"))
        own.pop("defaults", None)
        assert own, f"conf/{group}/{option}.yaml sets nothing"
        assert_holds(own, composed[option], f"{group}={option}: {group}")
        if "name" in own:  # a registry name (model) is its file's name
            assert own["name"] == option, f"conf/{group}/{option}.yaml names {own['name']!r}"
    for x, y in itertools.combinations(options, 2):
        assert composed[x] != composed[y], f"{group}={x} and {group}={y} compose the same"


def assert_holds(expected: dict, got: dict, where: str) -> None:
    """Every key of `expected` (recursively) has the same value in `got`."""
    for key, value in expected.items():
        assert key in got, f"{where}.{key} is missing"
        if isinstance(value, dict):
            assert_holds(value, got[key], f"{where}.{key}")
        else:
            assert got[key] == value, f"{where}.{key} is {got[key]!r}, the file says {value!r}"


def test_animals7_holds_the_seven_animal_classes() -> None:
    cfg = compose(["data=animals7"])
    assert list(cfg.data.classes) == [
        "Rhinoceros",
        "Sea turtle",
        "Sparrow",
        "Whale",
        "Zebra",
        "Blue jay",
        "Armadillo",
    ]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("+data.colour=red", "colour"),  # unknown key
        ("data.max_images_per_class=lots", "max_images_per_class"),  # wrong type
        ("data.multiclass_policy=keep", "data.multiclass_policy"),  # not a valid choice
        ("paths.checkpoint=sub/model.pt", "paths.checkpoint"),  # must lie inside models
        ("data.classes=[]", "data.classes is empty"),
        ("data.split.ratios.train=0.5", "must sum to 1"),
        ("data.official_splits=[train,dev]", "data.official_splits"),
    ],
)
def test_bad_config_fails_before_any_work_naming_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        compose([override])


def test_missing_value_is_named() -> None:
    cfg = OmegaConf.to_container(compose([]))
    del cfg["data"]["classes"]
    with pytest.raises(ConfigError, match="data.classes"):
        validate(cfg)


def test_params_file_is_validated_like_a_composition(tmp_path: Path) -> None:
    p = tmp_path / "params.yaml"
    p.write_text((PROJECT_ROOT / "params.yaml").read_text().replace("seed: 0", "seed: zero", 1))
    with pytest.raises(ConfigError, match="seed"):
        load_params(p)
    with pytest.raises(ConfigError, match="no such params file"):
        load_params(tmp_path / "nope.yaml")


def test_validated_config_is_read_only() -> None:
    cfg = compose([])
    with pytest.raises(Exception, match="read-only"):
        cfg.data.seed = 3


def test_the_schema_holds_no_values() -> None:
    """conf/ is the one place values live: the schema gives types, ranges and allowed values, and
    a key that conf/ (or params.yaml) lacks is an error, not a default from code."""
    with_default = [
        f"{model.__name__}.{name}"
        for model in Schema.__subclasses__()
        for name, f in model.model_fields.items()
        if not f.is_required()
    ]
    assert not with_default, f"schema fields with a default: {with_default}"
    assert PipelineConf in Schema.__subclasses__()

"""The config system: YAML composition, overrides, and every validation error path."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from scaletrain.config import RootConfig, load_config
from scaletrain.core.config_base import (
    ConfigError,
    apply_overrides,
    dump_yaml,
    from_dict,
    load_yaml,
    parse_override,
    require,
    save_config,
)
from scaletrain.models.config import MMDiTConfig, UNetConfig

REPO = Path(__file__).resolve().parents[2]


# A small schema exercising every kind of field the converter supports.
@dataclass
class _Inner:
    size: int = 1
    name: str = "x"

    def __post_init__(self) -> None:
        require(self.size > 0, "size", f"must be > 0, got {self.size}")


@dataclass
class _A:
    kind: Literal["a"] = "a"
    alpha: float = 1.0


@dataclass
class _B:
    kind: Literal["b"] = "b"
    beta: int = 2


@dataclass
class _Schema:
    flag: bool = False
    count: int = 0
    ratio: float = 0.5
    mode: Literal["fast", "slow"] = "fast"
    maybe: int | None = None
    sizes: list[int] = field(default_factory=list)
    pair: tuple[int, int] = (1, 2)
    table: dict[str, float] = field(default_factory=dict)
    inner: _Inner = field(default_factory=_Inner)
    variant: _A | _B = field(default_factory=_A)


def test_defaults_build_and_round_trip_through_yaml():
    cfg = load_config(None)
    assert isinstance(cfg, RootConfig)
    again = from_dict(RootConfig, yaml.safe_load(dump_yaml(cfg)))
    assert again == cfg


def test_valid_values_are_converted():
    cfg = from_dict(
        _Schema,
        {
            "flag": True,
            "count": 3.0,  # an integral float is accepted as int
            "ratio": 2,  # an int is accepted as float
            "mode": "slow",
            "maybe": 4,
            "sizes": [1, 2],
            "pair": [3, 4],
            "table": {"a": 1},
            "inner": {"size": 5},
            "variant": {"kind": "b", "beta": 7},
        },
    )
    assert cfg.count == 3 and isinstance(cfg.count, int)
    assert cfg.ratio == 2.0 and isinstance(cfg.ratio, float)
    assert cfg.pair == (3, 4)
    assert cfg.inner == _Inner(size=5)
    assert cfg.variant == _B(beta=7)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"bogus": 1}, r"bogus: unknown key; allowed keys here: count, flag"),
        ({"inner": {"sise": 1}}, r"inner\.sise: unknown key; allowed keys here: name, size"),
        ({"flag": "yes"}, r"flag: got 'yes'; expected true or false"),
        ({"count": "3"}, r"count: got '3'; expected an integer"),
        ({"count": True}, r"count: got True; expected an integer"),
        ({"count": 1.5}, r"count: got 1.5; expected an integer"),
        ({"ratio": "high"}, r"ratio: got 'high'; expected a number"),
        ({"mode": "medium"}, r"mode: got 'medium'; allowed: 'fast', 'slow'"),
        ({"maybe": "x"}, r"maybe: got 'x'; expected int or null"),
        ({"sizes": 3}, r"sizes: got 3; expected a list of int"),
        ({"sizes": [1, "a"]}, r"sizes\[1\]: got 'a'; expected an integer"),
        ({"pair": [1, 2, 3]}, r"pair: expected 2 items, got 3"),
        ({"table": [1]}, r"table: got \[1\]; expected a mapping"),
        ({"inner": 3}, r"inner: expected a mapping \(_Inner\), got 3"),
        ({"inner": {"size": 0}}, r"inner\.size: must be > 0, got 0"),
        ({"variant": {"beta": 1}}, r"variant\.kind: missing; allowed: 'a', 'b'"),
        ({"variant": {"kind": "c"}}, r"variant\.kind: got 'c'; allowed: 'a', 'b'"),
        ({"variant": {"kind": "a", "beta": 1}}, r"variant\.beta: unknown key"),
        ({"inner": None}, r"inner: expected a mapping"),
    ],
)
def test_every_validation_error_names_the_key(data, expected):
    with pytest.raises(ConfigError, match=expected):
        from_dict(_Schema, data)


def test_required_key_missing_is_named():
    @dataclass
    class NeedsPath:
        path: str

    with pytest.raises(ConfigError, match=r"data\.path: required key is missing"):
        from_dict(NeedsPath, {}, "data")


def test_root_sections_validate_eagerly_with_dotted_keys():
    with pytest.raises(ConfigError, match=r"^train\.max_steps: must be > 0, got 0"):
        load_config(None, ["train.max_steps=0"])
    with pytest.raises(ConfigError, match=r"^model\.arch: got 'gan'; allowed: 'unet', 'mmdit'"):
        load_config(None, ["model.arch=gan"])
    with pytest.raises(ConfigError, match=r"^trian: unknown key; allowed keys here: "):
        load_config(None, ["trian.lr=1"])
    with pytest.raises(ConfigError, match=r"^seed: must be in \[0, 2\*\*63\)"):
        load_config(None, ["seed=-1"])


def test_overrides_parse_yaml_scalars():
    assert parse_override("train.lr=1e-4") == (["train", "lr"], 1e-4)
    assert parse_override("a.b=true") == (["a", "b"], True)
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])
    assert parse_override("a=null") == (["a"], None)
    assert parse_override("a=hello") == (["a"], "hello")
    assert parse_override("a=x=y") == (["a"], "x=y")
    with pytest.raises(ConfigError, match=r"expected KEY=VALUE"):
        parse_override("train.lr")
    with pytest.raises(ConfigError, match=r"empty component"):
        parse_override("train..lr=1")


def test_overrides_set_nested_keys_without_mutating_the_input():
    base = {"train": {"lr": 1.0, "max_steps": 5}}
    out = apply_overrides(base, ["train.lr=2e-4", "model.arch=mmdit", "model.depth=3"])
    assert out == {"train": {"lr": 2e-4, "max_steps": 5}, "model": {"arch": "mmdit", "depth": 3}}
    assert base == {"train": {"lr": 1.0, "max_steps": 5}}
    with pytest.raises(ConfigError, match=r"'lr' is a value, not a section"):
        apply_overrides(base, ["train.lr.x=1"])


def test_tagged_union_picks_the_model_class_and_keeps_overrides_flat():
    cfg = load_config(None, ["model.arch=mmdit", "model.depth=3"])
    assert isinstance(cfg.model, MMDiTConfig) and cfg.model.depth == 3
    assert isinstance(load_config(None).model, UNetConfig)


def test_yaml_base_composition_and_precedence(tmp_path):
    (tmp_path / "model.yaml").write_text("model:\n  arch: mmdit\n  depth: 2\n")
    (tmp_path / "train.yaml").write_text("train:\n  lr: 0.5\n  max_steps: 7\n")
    (tmp_path / "run.yaml").write_text(
        "base: [model.yaml, train.yaml]\ntrain:\n  max_steps: 9\n"
    )
    cfg = load_config(tmp_path / "run.yaml", ["model.depth=4"])
    assert cfg.model.depth == 4  # override beats file
    assert cfg.train.max_steps == 9  # file beats its base
    assert cfg.train.lr == 0.5  # base value kept


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("- a\n- b\n", r"the top level must be a mapping, got list"),
        ("a: [1,\n", r"not valid YAML"),
        ("base: self.yaml\n", r"base: circular include"),
        ("base: missing.yaml\n", r"config file not found: .*missing\.yaml"),
    ],
)
def test_bad_yaml_files_are_reported_with_their_path(tmp_path, content, expected):
    path = tmp_path / "self.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=expected):
        load_yaml(path)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"config file not found: .*nope\.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_empty_yaml_gives_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(path) == RootConfig()


def test_save_config_writes_the_resolved_config(tmp_path):
    cfg = load_config(None, ["train.lr=3e-4", "seed=7"])
    path = save_config(cfg, tmp_path / "run")
    assert path == tmp_path / "run" / "config.yaml"
    assert load_config(path) == cfg
    assert not list((tmp_path / "run").glob("*.tmp"))


@pytest.mark.parametrize("preset", sorted((REPO / "configs").rglob("*.yaml")), ids=str)
def test_every_shipped_preset_loads(preset):
    load_config(preset)


def test_every_section_is_a_dataclass_with_defaults():
    # Components get their own section; every section must be constructible on its own.
    for f in dataclasses.fields(RootConfig):
        if f.name == "seed":
            continue
        value = getattr(RootConfig(), f.name)
        assert dataclasses.is_dataclass(value), f.name

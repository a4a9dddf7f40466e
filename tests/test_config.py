"""The one config layer: YAML + --set overrides -> validated dataclasses, with errors naming key and file."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from evotool.config import config_keys, field_default, field_help, load_config, nest, parse_set, to_dict
from evotool.errors import ConfigError


@dataclass
class Inner:
    r: int = field(default=8, metadata={"help": "rank"})
    names: list[str] = field(default_factory=lambda: ["q"])


@dataclass
class Outer:
    out: Path = field(default=Path("runs/x"), metadata={"help": "where"})
    ratio: float | None = None
    mode: Literal["a", "b"] = "a"
    layers: list[int] | None = None
    flag: bool = True
    grid: dict[str, list[float]] = field(default_factory=dict)
    inner: Inner = field(default_factory=Inner)

    def __post_init__(self) -> None:
        if self.ratio is not None and not 0 < self.ratio < 1:
            raise ConfigError(f"ratio={self.ratio} must lie in (0, 1)")


def test_parse_set_nests_and_reads_yaml_scalars() -> None:
    assert parse_set(["a.b=1", "a.c=0.5", "d=null", "e=true", "f=[1, 2]", "g=text"]) == {
        "a": {"b": 1, "c": 0.5}, "d": None, "e": True, "f": [1, 2], "g": "text"}
    with pytest.raises(ConfigError, match="key=value"):
        parse_set(["novalue"])
    assert nest({"a.b": 1, "a.c": None, "d": None}, skip_none=True) == {"a": {"b": 1}}
    with pytest.raises(ConfigError, match="cannot also have sub-keys"):
        parse_set(["a=1", "a.b=2"])


def test_numbers_written_as_text_fill_numeric_fields() -> None:
    cfg = load_config(Outer, None, ["ratio=1e-1", "inner.r=16"])  # YAML 1.1 reads 1e-1 as a string
    assert cfg.ratio == 0.1 and cfg.inner.r == 16
    assert load_config(Outer, None, {"inner": {"r": "3"}}).inner.r == 3
    with pytest.raises(ConfigError, match="inner.r must be an integer, got '3.5'"):
        load_config(Outer, None, {"inner": {"r": "3.5"}})


def test_yaml_and_overrides_are_coerced(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("out: runs/y\nratio: 0.25\ninner: {r: 4}\ngrid: {alpha: [0, 1]}\n")
    cfg = load_config(Outer, path, ["layers=9,10", "inner.names=[k, v]", "mode=b", "flag=false"])
    assert cfg.out == Path("runs/y") and cfg.ratio == 0.25 and cfg.mode == "b" and cfg.flag is False
    assert cfg.layers == [9, 10] and cfg.inner == Inner(r=4, names=["k", "v"])
    assert cfg.grid == {"alpha": [0.0, 1.0]} and isinstance(cfg.grid["alpha"][0], float)
    assert to_dict(cfg)["out"] == "runs/y"


@pytest.mark.parametrize("override, message", [
    ("inner.rank=3", r"c.yaml .*unknown key 'inner.rank'"),
    ("ratio=big", r"ratio must be a number, got 'big'"),
    ("ratio=2", r"ratio=2.0 must lie in \(0, 1\)"),
    ("mode=c", r"mode must be one of 'a', 'b'"),
    ("flag=3", r"flag must be true or false"),
    ("inner.r=1.5", r"inner.r must be an integer"),
    ("inner=4", r"inner must be a mapping"),
])
def test_bad_values_name_the_key_and_the_file(tmp_path: Path, override: str, message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("ratio: 0.5\n")
    with pytest.raises(ConfigError, match=message):
        load_config(Outer, path, [override])


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config not found"):
        load_config(Outer, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML \(line"):
        load_config(Outer, bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(Outer, listing)


def test_help_and_keys_come_from_the_dataclass() -> None:
    assert field_help(Outer, "out") == "where"
    assert field_help(Outer, "inner.r") == "rank"
    assert field_default(Outer, "inner.names") == ["q"] and field_default(Outer, "ratio") is None
    assert config_keys(Outer) == ["out", "ratio", "mode", "layers", "flag", "grid", "inner.r", "inner.names"]

"""Every shipped config file loads into its dataclass; CLI help texts come from the config classes."""

from __future__ import annotations

import fnmatch
import importlib
from pathlib import Path

import pytest
import typer

from evotool.config import config_keys, field_help, load_config
from evotool.errors import ConfigError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# config file (glob, relative to configs/) -> the dataclass it holds
CONFIG_CLASSES = {
    "prune.yaml": "evotool.prune.config:PruneConfig",
    "mitigate.yaml": "evotool.mitigate.config:PipelineConfig",
    "train_demo.yaml": "evotool.world.config:TrainConfig",
    "zoo/*.yaml": "evotool.zoo.config:ZooMember",
}


def config_class(name: str) -> type:
    pattern = next((p for p in CONFIG_CLASSES if fnmatch.fnmatch(name, p)), None)
    assert pattern is not None, f"configs/{name} has no entry in CONFIG_CLASSES"
    module, cls = CONFIG_CLASSES[pattern].split(":")
    return getattr(importlib.import_module(module), cls)


@pytest.mark.parametrize("name", sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml")))
def test_every_config_file_loads(name: str) -> None:
    cls = config_class(name)
    cfg = load_config(cls, CONFIGS / name)
    assert isinstance(cfg, cls)


def test_unknown_key_names_key_and_file(tmp_path: Path) -> None:
    from evotool.mitigate.config import PipelineConfig

    bad = tmp_path / "mitigate.yaml"
    bad.write_text((CONFIGS / "mitigate.yaml").read_text().replace("  n: 50 ", "  nn: 50 "))
    with pytest.raises(ConfigError, match=rf"{bad}: unknown key 'tune.nn'"):
        load_config(PipelineConfig, bad)
    bad.write_text((CONFIGS / "mitigate.yaml").read_text().replace("methods: [greedy,", "methods: [greedyy,"))
    with pytest.raises(ConfigError, match=rf"{bad}: unknown method 'greedyy'"):
        load_config(PipelineConfig, bad)


def test_mitigate_yaml_grids_default_to_the_methods_own() -> None:
    from evotool.mitigate.config import MitigateConfig, PipelineConfig
    from evotool.mitigate.methods.smoothing import SmoothingConfig

    cfg = load_config(PipelineConfig, CONFIGS / "mitigate.yaml", ["tune.grids.smoothing.alpha=0,0.5"])
    assert cfg.tune.grids == {"smoothing": {"alpha": [0.0, 0.5]}}
    assert MitigateConfig("smoothing").tuning_grid() == SmoothingConfig.TUNE_GRID
    assert MitigateConfig("smoothing", grid={"alpha": ["0.5"]}).tuning_grid() == {"alpha": [0.5]}
    assert MitigateConfig("dola").tuning_grid() == {}
    with pytest.raises(ConfigError, match="alpha=1.5 must lie in"):
        MitigateConfig("smoothing", grid={"alpha": [1.5]})


@pytest.mark.parametrize("command, cls", [("analyze", "evotool.analysis.config:AnalyzeConfig"),
                                          ("prune", "evotool.prune.config:PruneConfig"),
                                          ("mitigate", "evotool.mitigate.config:MitigateConfig")])
def test_cli_help_comes_from_the_config_class(command: str, cls: str) -> None:
    from evotool.cli import app

    module, name = cls.split(":")
    config = getattr(importlib.import_module(module), name)
    helps = {field_help(config, key) for key in config_keys(config)}
    click_command = typer.main.get_command(app).commands[command]
    options = [p for p in click_command.params if p.name not in ("help", "config") and not (command != "mitigate" and p.name == "set_")]
    assert len(options) >= 8
    for param in options:
        assert param.help in helps, (param.name, param.help)


def test_registry_names_in_help() -> None:
    from evotool.cli import app
    from evotool.mitigate.methods import method_names
    from evotool.prune.select import SELECTORS

    commands = typer.main.get_command(app).commands
    method_help = next(p.help for p in commands["mitigate"].params if p.name == "method")
    selector_help = next(p.help for p in commands["prune"].params if p.name == "selector")
    assert all(name in method_help for name in method_names()) and "lora_mutation" in method_help
    assert all(name in selector_help for name in SELECTORS)

"""Stage detection recovers boundaries planted in constructed curves, and reports degenerate curves as such."""

from __future__ import annotations

import numpy as np
import pytest

from evotool.errors import ConfigError
from evotool.stages import StageConfig, detect_stages, token_critical_layer


def planted(num_layers: int, critical: int, mutation: int | None, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Curves of one token: large JS up to `critical`, quiet after, one spike at `mutation`."""
    js = np.full(num_layers + 1, np.nan)
    js[1 : critical + 1] = rng.uniform(0.4, 1.0, critical)
    js[critical + 1 :] = rng.uniform(0.001, 0.01, num_layers - critical)
    p = np.zeros(num_layers + 1)
    p[critical:] = rng.uniform(0.7, 0.9)
    if mutation is not None:
        js[mutation] = rng.uniform(0.3, 0.6)
        p[mutation:] = 0.1
    return js, p


@pytest.mark.parametrize("num_layers,critical,mutation", [(32, 18, 28), (12, 5, 10), (24, 9, 24)])
def test_planted_boundaries_recovered_exactly(num_layers: int, critical: int, mutation: int) -> None:
    rng = np.random.default_rng(critical)
    curves = [planted(num_layers, critical, mutation if i % 3 else None, rng) for i in range(30)]
    # a few tokens mutate elsewhere, too rarely to count as a dataset mutation layer
    curves += [planted(num_layers, critical, critical + 2, rng) for _ in range(3)]
    js, p = map(np.stack, zip(*curves))
    res = detect_stages(js, p)
    assert res.critical_layer == critical
    assert res.mutation_layers == [mutation]
    assert res.stages == {
        "rapid_evolution": [0, critical],
        "stabilization": [critical + 1, mutation - 1],
        "mutation": [mutation, num_layers],
    }
    assert res.mutation_stats["histogram"][mutation] == 20
    assert res.critical_spread["iqr"] == [critical, critical]


def test_per_token_critical_ignores_isolated_late_spike() -> None:
    js, p = planted(16, 6, 13, np.random.default_rng(0))
    assert token_critical_layer(js, p, StageConfig()) == 6


def test_probability_must_have_risen() -> None:
    js, p = planted(16, 6, None, np.random.default_rng(1))
    p[:] = 0.0
    p[10:] = 0.9  # JS is quiet from layer 7 but the emitted token only appears at layer 10
    assert token_critical_layer(js, p, StageConfig()) == 10


def test_no_mutation_is_reported_not_forced() -> None:
    rng = np.random.default_rng(2)
    js, p = map(np.stack, zip(*[planted(20, 8, None, rng) for _ in range(10)]))
    res = detect_stages(js, p)
    assert res.critical_layer == 8
    assert res.mutation_layers == []
    assert res.stages["mutation"] is None
    assert res.stages["stabilization"] == [9, 20]


def test_no_stable_stage_is_reported_not_forced() -> None:
    rng = np.random.default_rng(3)
    js = np.concatenate([np.full((10, 1), np.nan), rng.uniform(0.3, 1.0, (10, 16))], axis=1)
    p = np.tile(np.linspace(0, 1, 17), (10, 1))
    res = detect_stages(js, p)
    assert res.critical_layer is None
    assert res.mutation_layers == []
    assert res.stages == {"rapid_evolution": [0, 16], "stabilization": None, "mutation": None}


def test_bad_config_and_shapes_rejected() -> None:
    with pytest.raises(ConfigError):
        StageConfig(stable_fraction=1.5)
    with pytest.raises(ConfigError):
        detect_stages(np.zeros((0, 5)), np.zeros((0, 5)))

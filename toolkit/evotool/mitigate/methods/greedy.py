"""``greedy``: plain greedy decoding, the baseline every method is compared with."""

from __future__ import annotations

from dataclasses import dataclass

from evotool.mitigate.base import Method


@dataclass
class GreedyConfig:
    """Plain greedy decoding (no options)."""


class Greedy(Method):
    """Plain greedy decoding."""

    name = "greedy"
    config_cls = GreedyConfig
    changes_outputs = False


METHOD = Greedy

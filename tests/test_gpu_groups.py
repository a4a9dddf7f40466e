"""Model-parallel groups (``--gpus-per-process``): which GPUs each torchrun process spreads its model over.

CPU-only: the planning is pure arithmetic, and accelerate's placement of a real tiny model from the planned
``max_memory`` needs model sizes, not GPUs (``infer_auto_device_map`` only plans).
"""

from __future__ import annotations

import pytest
import torch
from accelerate.utils import compute_module_sizes, get_balanced_memory, infer_auto_device_map
from conftest import build_tiny

from evotool.errors import ConfigError
from evotool.models.loading import gpu_group, group_max_memory
from evotool.options import LoadOptions


@pytest.mark.parametrize(("g", "rank", "procs", "visible", "expected"), [
    (2, 0, 4, 8, [0, 1]),          # 8 GPUs, 4 groups of 2: the first
    (2, 3, 4, 8, [6, 7]),          # ... the last
    (4, 1, 2, 8, [4, 5, 6, 7]),    # 2 groups of 4
    (1, 2, 4, 4, [2]),             # one GPU per process: plain data parallel
    (3, 1, 2, 7, [3, 4, 5]),       # 7 visible: GPU 6 stays idle
    (2, 0, 1, 2, [0, 1]),          # one process (no torchrun) on the first G GPUs
])
def test_gpu_group_hand_computed(g: int, rank: int, procs: int, visible: int, expected: list[int]) -> None:
    assert gpu_group(g, rank, procs, visible) == expected


def test_groups_of_a_node_are_disjoint_and_cover_it() -> None:
    groups = [gpu_group(2, r, 4, 8) for r in range(4)]
    assert sorted(i for g in groups for i in g) == list(range(8))


@pytest.mark.parametrize(("g", "rank", "procs", "visible", "message"), [
    (2, 0, 4, 7, "--gpus-per-process 2 x 4 process(es) on this node needs 8 GPUs, but 7 are visible; start 3"),
    (4, 0, 1, 2, "needs 4 GPUs, but 2 are visible"),
    (2, 0, 1, 0, "--gpus-per-process 2: CUDA is not available"),
    (1, 4, 4, 4, "LOCAL_RANK 4 is outside 0..3"),
])
def test_gpu_group_refusals(g: int, rank: int, procs: int, visible: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        gpu_group(g, rank, procs, visible)


def test_load_options_check_the_group_size() -> None:
    with pytest.raises(ConfigError, match="--gpus-per-process must be >= 1, got 0"):
        LoadOptions(gpus_per_process=0)
    with pytest.raises(ConfigError, match="drop --device-map sequential"):
        LoadOptions(gpus_per_process=2, device_map="sequential")
    assert LoadOptions(gpus_per_process=2, device_map="auto").gpus_per_process == 2


def test_group_max_memory_holds_only_this_process_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun rank 1 of 2 on a 4-GPU node with G = 2: GPUs 2 and 3, each at 90% of its free memory, no CPU."""
    free = {0: 10_000, 1: 20_000, 2: 30_000, 3: 40_000}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (free[i], 80_000))
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert group_max_memory(2) == {2: 27_000, 3: 36_000}
    assert group_max_memory(1) is None  # one GPU per process: cuda:LOCAL_RANK, no device_map
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match="needs 8 GPUs, but 4 are visible"):
        group_max_memory(2)


def test_planned_max_memory_confines_the_placement() -> None:
    """accelerate places a real model (as transformers' device_map="auto" does: balanced memory, then
    infer_auto_device_map) only on the group's GPUs, and uses both of them."""
    model = build_tiny("llava", layers=4)
    size = compute_module_sizes(model)[""]
    max_memory: dict[int | str, int] = {2: size, 3: size}
    balanced = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=model._no_split_modules)
    placement = infer_auto_device_map(model, max_memory=balanced, no_split_module_classes=model._no_split_modules)
    assert set(placement.values()) == {2, 3}

"""The patch lens against the models' own forward passes (``output_hidden_states=True`` and logits)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from conftest import ARCHS, build_tiny, make_inputs
from evotool.errors import InputError, ModelError
from evotool.lens import make_lens
from evotool.models.registry import decoder_parts
from evotool.patch_lens import image_token_id, patch_lens

# Hand-computed from tests/conftest.py's tiny configs and inputs (32 px images).
GRIDS = {
    "llava": ((4, 4), True),  # CLIP 32 px / 8 px patches, CLS dropped
    "llava_next": ((1, 36), False),  # base + any-res tokens + row newlines: no single grid
    "qwen2_vl": ((4, 4), True),  # image_grid_thw (1, 8, 8) / merge 2
    "qwen2_5_vl": ((4, 4), True),
    "idefics3": ((2, 2), True),  # 32 / 8 = 4 patches a side, pixel shuffle by 2
    "paligemma": ((4, 4), True),
    "gemma3": ((2, 2), True),  # mm_tokens_per_image 4
    "mistral3": ((2, 2), True),  # image_sizes 32 / (8 * merge 2)
}


def reference(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 ids and probabilities [L+1, N] at the image positions of the batch, from a plain forward pass:
    layers 0..L-1 from ``output_hidden_states`` through the final norm and the head, layer L from the logits."""
    parts = decoder_parts(model)
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
        mask = inputs["input_ids"] == image_token_id(model.config)
        logits = [parts.lm_head(parts.norm(h[mask])) for h in out.hidden_states[: parts.num_layers]] + [out.logits[mask]]
        logits = torch.stack(logits).float()
        if parts.softcap:
            logits[:-1] = torch.tanh(logits[:-1] / parts.softcap) * parts.softcap
        probs = logits.softmax(-1)
    return probs.argmax(-1), probs.max(-1).values


@pytest.mark.parametrize("model_type", ARCHS)
def test_patch_lens_equals_the_models_own_readout(model_type: str) -> None:
    model = build_tiny(model_type)
    parts = decoder_parts(model)
    inputs = make_inputs(model, model_type, batch=2, pad_first=3)
    lens = make_lens("normed", parts)
    calls: list[tuple[int, ...]] = []
    log_probs = lens.log_probs
    lens.log_probs = lambda states: calls.append(tuple(states.shape)) or log_probs(states)  # type: ignore[method-assign]
    budget = 3 * (parts.num_layers + 1) * parts.lm_head.weight.shape[0]  # three patches per chunk

    result = patch_lens(model, parts, lens, inputs, max_elements=budget)

    ids, probs = reference(model, inputs)
    n = ids.shape[1]
    assert [c[1] for c in calls] == [3] * (n // 3) + ([n % 3] if n % 3 else [])  # flat in patches x vocabulary
    got_ids = torch.cat([torch.from_numpy(r.top1) for r in result], dim=1)
    got_probs = torch.cat([torch.from_numpy(r.prob) for r in result], dim=1)
    assert got_ids.shape == (parts.num_layers + 1, n)
    torch.testing.assert_close(got_probs, probs, atol=1e-5, rtol=1e-4)
    assert torch.equal(got_ids, ids)
    assert [(r.grid, r.spatial) for r in result] == [GRIDS[model_type]] * 2
    assert all(r.top1.shape[1] == r.grid[0] * r.grid[1] for r in result)
    if not GRIDS[model_type][1]:
        assert "strip" in result[0].note and model_type in result[0].note


def test_patch_lens_on_the_shipped_model() -> None:
    from evotool.generation import build_inputs
    from evotool.world import default_model_path, default_samples
    from evotool.models.loading import LoadOptions, load_model

    model, processor = load_model(str(default_model_path()), LoadOptions(device="cpu"))
    samples = default_samples(2)
    inputs = build_inputs(processor, [s.load_image() for s in samples], [s.prompt for s in samples])
    parts = decoder_parts(model)
    result = patch_lens(model, parts, make_lens("normed", parts), inputs)
    ids, probs = reference(model, inputs)
    assert [(r.grid, r.spatial) for r in result] == [((3, 3), True)] * 2  # 48 px image, 16 px patches
    torch.testing.assert_close(torch.cat([torch.from_numpy(r.prob) for r in result], dim=1), probs, atol=1e-5, rtol=1e-4)
    assert torch.equal(torch.cat([torch.from_numpy(r.top1) for r in result], dim=1), ids)


def test_patch_lens_refuses_inputs_without_image_tokens_and_configs_without_an_image_token() -> None:
    model = build_tiny("llava")
    parts = decoder_parts(model)
    inputs = make_inputs(model, "llava", batch=2)
    text_only = dict(inputs, input_ids=inputs["input_ids"].clone())
    text_only["input_ids"][1][text_only["input_ids"][1] == image_token_id(model.config)] = 5
    with pytest.raises(InputError, match=r"no image tokens in batch rows \[1\]"):
        patch_lens(model, parts, make_lens("normed", parts), text_only)
    with pytest.raises(ModelError, match="'text_vlm' names no image_token_id"):
        image_token_id(SimpleNamespace(model_type="text_vlm", image_token_id=None))


@pytest.mark.parametrize("model_type", ["qwen2_vl", "llava_next"])
def test_analyze_adds_the_patch_lens_to_a_finished_run(model_type: str, tmp_path) -> None:
    """A run made without the patch lens gains it on a second run (traces untouched), with grids from the
    processor's real outputs and layer L equal to the model's own logits at the image positions."""
    from dataclasses import replace

    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from evotool.analysis.run import AnalyzeConfig, run_analysis
    from evotool.analysis.store import RunStore
    from evotool.data import DEFAULT_PROMPT
    from evotool.generation import build_inputs
    from tiny_checkpoints import MANUAL, ManualProcessor, save_tiny, write_images

    model_dir = save_tiny(model_type, tmp_path / "model")
    images = write_images(tmp_path / "images", 2)
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    processor = ManualProcessor(model_type) if model_type in MANUAL else AutoProcessor.from_pretrained(model_dir)
    run = tmp_path / "run"
    cfg = AnalyzeConfig(model=str(model_dir), data=str(tmp_path / "images"), max_new_tokens=2, out=run, wandb=False,
                        figures=False)
    run_analysis(cfg, loaded=(model, processor))
    traced = {p.name: p.stat().st_mtime_ns for p in (run / "samples").glob("*.npz")}
    run_analysis(replace(cfg, patch_lens=True), loaded=(model, processor))
    assert {p.name: p.stat().st_mtime_ns for p in (run / "samples").glob("img?.npz")} == traced

    inputs = build_inputs(processor, [Image.open(p).convert("RGB") for p in images], [DEFAULT_PROMPT] * 2)
    ids, probs = reference(model, inputs)
    store = RunStore(run)
    stored = [store.load_patch_lens(p.stem) for p in images]
    assert torch.equal(torch.cat([torch.from_numpy(s.top1) for s in stored], dim=1), ids)
    torch.testing.assert_close(torch.cat([torch.from_numpy(s.prob) for s in stored], dim=1), probs, atol=1e-5, rtol=1e-4)
    expected = {"qwen2_vl": ((4, 4), True), "llava_next": ((1, ids.shape[1] // 2), False)}[model_type]
    assert [(s.grid, s.spatial) for s in stored] == [expected] * 2

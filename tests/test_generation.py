"""The batched generation runner over Samples against plain per-sample greedy decoding."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import tiny_world_llava

from evotool.data.inputs import Sample
from evotool.errors import InputError
from evotool.generation import batches, generate_samples, greedy_generate, load_images
from evotool.world import default_samples


def test_runner_equals_one_sample_at_a_time() -> None:
    model, processor = tiny_world_llava(2, seed=4)
    model.generation_config.eos_token_id = None  # every row runs the full length
    samples = default_samples(5, seed=7)
    out = generate_samples(model, processor, samples, batch_size=2, max_new_tokens=3)
    single = [greedy_generate(model, processor, [s.load_image()], [s.prompt], 3) for s in samples]
    assert out.ids == [ids[0] for ids, _ in single] and out.texts == [texts[0] for _, texts in single]
    assert [len(b) for b in batches(samples, 2)] == [2, 2, 1]
    with pytest.raises(InputError, match="batch size"):
        next(batches(samples, 0))


def test_load_images_reports_bad_samples(tmp_path: Path) -> None:
    good = default_samples(1)[0]
    bad = Sample(id="gone", image=tmp_path / "missing.png")
    seen = []
    kept, images = load_images([bad, good], on_error=lambda s, err: seen.append((s.id, str(err))))
    assert kept == [good] and len(images) == 1 and seen[0][0] == "gone" and "image not found" in seen[0][1]
    with pytest.raises(InputError, match="image not found"):
        load_images([bad])

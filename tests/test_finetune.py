"""LoRA fine-tuning: loss goes down, adapters only where asked, adapters and merged model reload."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText

from conftest import tiny_world_llava

from evotool.errors import ConfigError
from evotool.finetune import LoraSettings, collate, lora_finetune, merge_and_save, save_adapter, target_module_names, world_samples


@pytest.fixture(scope="module")
def world_model():
    return tiny_world_llava(layers=4)


def test_collate_labels_only_answers(world_model):
    model, processor = world_model
    samples = world_samples(10)[:3]
    batch = collate(processor, samples, "cpu")
    tok = processor.tokenizer
    for b, s in enumerate(samples):
        labelled = batch["labels"][b][batch["labels"][b] != -100].tolist()
        assert labelled == tok(" " + s.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        n = int(batch["attention_mask"][b].sum())
        assert batch["attention_mask"][b, :n].all() and not batch["attention_mask"][b, n:].any()  # right padding


def test_targets_follow_analysis_numbering(world_model):
    model, _ = world_model
    names = target_module_names(model, LoraSettings(layers_to_transform=[2], target_modules=("q_proj", "down_proj")))
    assert sorted(names) == ["model.language_model.layers.1.mlp.down_proj", "model.language_model.layers.1.self_attn.q_proj"]
    with pytest.raises(ConfigError):
        target_module_names(model, LoraSettings(layers_to_transform=[5]))


def test_lora_lowers_loss_and_saves(world_model, tmp_path):
    import copy

    model, processor = world_model
    base = copy.deepcopy(model)
    samples = world_samples(40, seed=1)
    settings = LoraSettings(r=4, steps=30, lr=1e-2, batch_size=8, layers_to_transform=[3, 4], log_every=1)
    fixed = collate(processor, samples[:16], "cpu")
    from evotool.finetune import answer_loss

    with torch.no_grad():
        before = answer_loss(base, fixed).item()
    result = lora_finetune(model, processor, samples, settings)
    with torch.no_grad():
        after = answer_loss(result.model, fixed).item()
    assert after < before - 0.1
    # adapters only in decoder layers 3 and 4 (0-based 2, 3)
    lora_names = {n for n, p in result.model.named_parameters() if "lora_" in n}
    assert lora_names and all(".layers.2." in n or ".layers.3." in n for n in lora_names)
    save_adapter(result.model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    merged = merge_and_save(result.model, processor, tmp_path / "merged")
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert answer_loss(reloaded, fixed).item() == pytest.approx(after, abs=1e-4)
        assert torch.allclose(reloaded(**{k: v for k, v in fixed.items() if k != "labels"}).logits,
                              merged(**{k: v for k, v in fixed.items() if k != "labels"}).logits, atol=1e-5)
    # the adapter applied to a fresh copy of the base model gives the same loss
    from peft import PeftModel

    again = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert answer_loss(again, fixed).item() == pytest.approx(after, abs=1e-4)

"""Tiny randomly initialised VLMs built from configs (no downloads), one per supported architecture.

``tiny_model(model_type)`` builds the model; ``vision_inputs`` / ``make_inputs`` build a batch the way
the architecture's processor would (right number of image tokens, left padding), so the trace and
lens are exercised on every architecture's real forward pass.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

# before huggingface_hub is imported: it reads HF_HUB_OFFLINE once, at import
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForImageTextToText  # noqa: E402

torch.set_num_threads(1)  # tiny models: threads cost more than they give

VOCAB = 96
IMAGE_TOKEN = 90


def _text(model_type: str, layers: int, **extra: object) -> dict:
    cfg = dict(
        model_type=model_type, vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    cfg.update(extra)
    return cfg


def _vision(model_type: str, **extra: object) -> dict:
    cfg = dict(model_type=model_type, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, image_size=32, patch_size=8)
    cfg.update(extra)
    return cfg


_MROPE = {"type": "mrope", "mrope_section": [1, 1, 2]}
_QWEN_VISION = dict(depth=2, hidden_size=32, num_heads=4, patch_size=4, spatial_merge_size=2,
                    temporal_patch_size=2, in_channels=3)


def tiny_config(model_type: str, layers: int = 4, text: dict | None = None):
    """A transformers config of ``model_type`` with a ``layers``-deep 32-wide decoder (``text``: text-config overrides)."""
    specs = {
        "llava": dict(text_config=_text("llama", layers), vision_config=_vision("clip_vision_model", projection_dim=32),
                      image_token_index=IMAGE_TOKEN, vision_feature_layer=-1),
        "llava_next": dict(text_config=_text("llama", layers),
                           vision_config=_vision("clip_vision_model", projection_dim=32),
                           image_token_index=IMAGE_TOKEN, image_grid_pinpoints=[[32, 32]], vision_feature_layer=-1),
        "qwen2_vl": dict(text_config=_text("qwen2_vl_text", layers, rope_scaling=_MROPE),
                         vision_config=dict(_QWEN_VISION, embed_dim=32),
                         image_token_id=IMAGE_TOKEN, video_token_id=91, vision_start_token_id=92, vision_end_token_id=93),
        "qwen2_5_vl": dict(text_config=_text("qwen2_5_vl_text", layers, rope_scaling=_MROPE),
                           vision_config=dict(_QWEN_VISION, out_hidden_size=32, intermediate_size=64, window_size=16,
                                              fullatt_block_indexes=[1]),
                           image_token_id=IMAGE_TOKEN, video_token_id=91, vision_start_token_id=92, vision_end_token_id=93),
        "idefics3": dict(text_config=_text("llama", layers), vision_config=_vision("idefics3_vision"),
                         image_token_id=IMAGE_TOKEN, scale_factor=2),
        "paligemma": dict(text_config=_text("gemma", layers, hidden_activation="gelu_pytorch_tanh"),
                          vision_config=_vision("siglip_vision_model", projection_dim=32),
                          image_token_index=IMAGE_TOKEN, projection_dim=32, hidden_size=32),
        "gemma3": dict(text_config=_text("gemma3_text", layers, sliding_window=16, final_logit_softcapping=30.0,
                                         query_pre_attn_scalar=8),
                       vision_config=_vision("siglip_vision_model"),
                       image_token_index=IMAGE_TOKEN, boi_token_index=91, eoi_token_index=92, mm_tokens_per_image=4),
        "mistral3": dict(text_config=_text("mistral", layers),
                         vision_config=dict(model_type="pixtral", hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8,
                                            head_dim=8),
                         image_token_index=IMAGE_TOKEN, spatial_merge_size=2),
    }
    spec = specs[model_type]
    if text:
        spec = dict(spec, text_config=dict(spec["text_config"], **text))
    return AutoConfig.for_model(model_type, **spec)


ARCHS = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "idefics3", "paligemma", "gemma3", "mistral3")

# Checkpoint families that differ from ARCHS' tiny config in their text decoder: name -> (model_type, text overrides).
# PaliGemma 2 runs a Gemma 2 decoder whose real checkpoints soft-cap the final logits at 30.
VARIANTS: dict[str, tuple[str, dict]] = {
    "paligemma2": ("paligemma", dict(model_type="gemma2", final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                                     query_pre_attn_scalar=8, sliding_window=16, hidden_activation="gelu_pytorch_tanh")),
}


def build_tiny(model_type: str, layers: int = 4, seed: int = 0, text: dict | None = None) -> torch.nn.Module:
    """A random tiny model in eval mode; EOS never forced, so generation runs to max_new_tokens."""
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(tiny_config(model_type, layers, text)).eval()
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    return model


def vision_inputs(model_type: str, batch: int) -> dict[str, torch.Tensor]:
    """Pixel tensors shaped as each architecture's image processor emits them (one 32x32 image per row)."""
    if model_type == "llava_next":
        return {"pixel_values": torch.randn(batch, 2, 3, 32, 32), "image_sizes": torch.tensor([[32, 32]] * batch)}
    if model_type in ("qwen2_vl", "qwen2_5_vl"):
        return {"pixel_values": torch.randn(batch * 64, 3 * 2 * 4 * 4), "image_grid_thw": torch.tensor([[1, 8, 8]] * batch)}
    if model_type == "idefics3":
        return {"pixel_values": torch.randn(batch, 1, 3, 32, 32),
                "pixel_attention_mask": torch.ones(batch, 1, 32, 32, dtype=torch.bool)}
    if model_type == "mistral3":
        return {"pixel_values": torch.randn(batch, 3, 32, 32), "image_sizes": torch.tensor([[32, 32]] * batch)}
    return {"pixel_values": torch.randn(batch, 3, 32, 32)}


def image_token_count(model: torch.nn.Module, model_type: str) -> int:
    """How many image placeholder tokens one image needs (measured from the vision tower itself)."""
    vis = vision_inputs(model_type, 1)
    with torch.no_grad():
        feats = model.model.get_image_features(**vis)
    if not isinstance(feats, (list, tuple, torch.Tensor)):
        feats = feats.pooler_output
    parts = feats if isinstance(feats, (list, tuple)) else [feats]
    return sum(x.reshape(-1, x.shape[-1]).shape[0] for x in parts)


def make_inputs(model: torch.nn.Module, model_type: str, batch: int = 2, text_len: int = 5, seed: int = 0,
                pad_first: int = 0) -> dict[str, torch.Tensor]:
    """A left-padded batch: [pad]*pad_first (row 0 only), BOS, image tokens, random text tokens."""
    gen = torch.Generator().manual_seed(seed)
    n_img = image_token_count(model, model_type)
    torch.manual_seed(seed)
    rows = []
    for b in range(batch):
        text = torch.randint(3, 80, (text_len,), generator=gen).tolist()
        rows.append([1] + [IMAGE_TOKEN] * n_img + text)
    width = max(len(r) for r in rows) + pad_first
    ids = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, width - len(row):] = torch.tensor(row)
        mask[b, width - len(row):] = 1
    inputs = {"input_ids": ids, "attention_mask": mask, **vision_inputs(model_type, batch)}
    if model_type in ("qwen2_vl", "qwen2_5_vl"):  # M-RoPE needs to know which positions are image tokens
        inputs["mm_token_type_ids"] = (ids == IMAGE_TOKEN).int()
    return inputs


def tiny_world_llava(layers: int, save_to: Path | None = None, seed: int = 0, family: str = "llama",
                     tie_embeddings: bool = False) -> tuple[torch.nn.Module, object]:
    """A random 32-wide LLaVA of the shipped model's kind (world processor and tokenizer; decoder ``family``
    llama / qwen2 / gemma), in eval mode; saved with its processor to ``save_to`` when given."""
    from evotool.world import ModelConfig, WorldConfig, build_model, build_processor

    torch.manual_seed(seed)
    processor = build_processor()
    sizes = ModelConfig(vision_width=32, vision_layers=1, width=32, layers=layers, heads=4, mlp=64, family=family,
                        tie_embeddings=tie_embeddings)
    model = build_model(processor.tokenizer, WorldConfig(), sizes).eval()
    if save_to is not None:
        model.save_pretrained(save_to)
        processor.save_pretrained(save_to)
    return model, processor


V7_MUTATION = {"mutation_reference": "all", "mutation_quiet_ratio": 0.0}  # StageConfig options: v7's mutation rule (the default)
V8_MUTATION = {"mutation_reference": "others", "mutation_quiet_ratio": 20.0}  # v8's (the default from holdout26 to holdout30)


def stage_file(num_layers: int, critical: int | None, mutation: list[int], **payload: object):
    """A validated :class:`~evotool.stages.StageFile` with the detector's stage ranges for these boundaries."""
    from evotool.stages import StageFile, stage_ranges

    return StageFile.from_payload({"schema_version": "1.1", "model": "test", "fingerprint": "0" * 16,
                                   "num_layers": num_layers, "critical_layer": critical, "mutation_layers": mutation,
                                   "stages": stage_ranges(num_layers, critical, mutation), **payload})


@pytest.fixture(params=ARCHS)
def arch(request: pytest.FixtureRequest) -> str:
    return request.param


def run_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """Run ``evotool ARGS`` in-process: (exit code, stdout, stderr)."""
    from evotool.cli import main

    monkeypatch.setattr(sys, "argv", ["evotool", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def kill_9_at(args: Sequence[str], pattern: bytes, delay: float = 0.0) -> bytes:
    """Run ``evotool ARGS`` in a subprocess, SIGKILL it ``delay`` seconds after ``pattern`` (a regex) appears on its
    stderr, assert it died of the kill (it had not finished) and return the stderr it wrote."""
    import re
    import signal
    import subprocess
    import time

    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    proc = subprocess.Popen([sys.executable, "-m", "evotool", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    seen = b""
    while not re.search(pattern, seen[-4096:]):
        chunk = os.read(proc.stderr.fileno(), 4096)  # what is there now, not a full buffer
        assert chunk, f"the run ended before {pattern!r}: {seen[-2000:]!r}"
        seen += chunk
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, "the run finished before the kill: give it more work"
    return seen


@pytest.fixture(scope="session")
def demo_set_stages(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stage file of the shipped demo model with hand-set boundaries that leave room in every stage (critical 3,
    mutation 11), for tests of method mechanics; what the detector finds for this model is tested in test_golden."""
    from evotool.models.loading import fingerprint, load_model
    from evotool.stages import stage_ranges, write_stages
    from evotool.world import default_model_path

    model, _ = load_model(default_model_path())
    path = tmp_path_factory.mktemp("demo_set_stages") / "stages.json"
    write_stages(path, {"model": "demo", "fingerprint": fingerprint(model), "num_layers": 12, "critical_layer": 3,
                        "mutation_layers": [11], "stages": stage_ranges(12, 3, [11])})
    return path


@pytest.fixture(scope="session")
def demo_stages(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """stages.json of the shipped demo model from a short `evotool analyze` run (8 world captions)."""
    from evotool.analysis.config import AnalyzeConfig
    from evotool.analysis.run import run_analysis

    out = tmp_path_factory.mktemp("demo_analysis")
    return run_analysis(AnalyzeConfig(out=out, wandb=False, world_samples=8, max_new_tokens=24, figures=False,
                                      keep_features=False, batch_size=8))

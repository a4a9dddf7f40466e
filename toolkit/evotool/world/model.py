"""The demo model: a tiny LLaVA (CLIP-style vision tower, 2-layer projector, a Llama, Qwen2 or Gemma decoder)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import (
    CLIPVisionConfig,
    GemmaConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PretrainedConfig,
    Qwen2Config,
)

from evotool.errors import ConfigError
from evotool.world.generator import WorldConfig


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of the demo model."""

    vision_width: int = field(default=128, metadata={"help": "vision tower hidden size"})
    vision_layers: int = field(default=4, metadata={"help": "vision tower layers"})
    width: int = field(default=128, metadata={"help": "decoder hidden size"})
    layers: int = field(default=12, metadata={"help": "decoder layers"})
    heads: int = field(default=4, metadata={"help": "attention heads (vision and decoder)"})
    mlp: int = field(default=384, metadata={"help": "decoder MLP size"})
    family: Literal["llama", "qwen2", "gemma"] = field(
        default="llama",
        metadata={"help": "decoder family (the LLaVA wrapper's text_config): llama; qwen2 (q/k/v biases); "
                          "gemma ((1+w) RMSNorm, embeddings scaled by sqrt(width), GELU-tanh MLP)"},
    )
    tie_embeddings: bool = field(default=False, metadata={"help": "LM head shares the input embedding matrix"})

    def __post_init__(self) -> None:
        for name in ("vision_width", "vision_layers", "width", "layers", "heads", "mlp"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.width % self.heads or self.vision_width % self.heads:
            raise ConfigError(f"widths must be divisible by heads ({self.heads})")


def build_model(tokenizer, world: WorldConfig, sizes: ModelConfig) -> LlavaForConditionalGeneration:
    """A randomly initialised LLaVA for the world's images and ``tokenizer``'s vocabulary.

    The vision tower's last layer feeds the projector (``vision_feature_layer=-1``) so the per-cell
    features that stage 1 trains are exactly what the decoder sees: ``grid**2`` image tokens.
    """
    vision = CLIPVisionConfig(
        hidden_size=sizes.vision_width,
        intermediate_size=4 * sizes.vision_width,
        num_hidden_layers=sizes.vision_layers,
        num_attention_heads=sizes.heads,
        image_size=world.image_size,
        patch_size=world.cell,
        projection_dim=sizes.vision_width,
    )
    text = text_config(tokenizer, sizes)
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=world.grid**2,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=sizes.tie_embeddings,
    )
    model = LlavaForConditionalGeneration(config)
    scale = embedding_scale(model)
    if scale != 1.0:
        # Gemma multiplies text embeddings by sqrt(width) inside the decoder: start them at the scale of the other
        # families (and of the unscaled image features), see also `embedding_scale`.
        with torch.no_grad():
            model.get_input_embeddings().weight.div_(scale)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=32,
        do_sample=False,
    )
    return model


TEXT_CONFIGS: dict[str, type[PretrainedConfig]] = {"llama": LlamaConfig, "qwen2": Qwen2Config, "gemma": GemmaConfig}


def text_config(tokenizer, sizes: ModelConfig) -> PretrainedConfig:
    """The decoder's transformers config of family ``sizes.family`` (multi-head attention, head_dim = width / heads)."""
    extra = {"hidden_activation": "gelu_pytorch_tanh"} if sizes.family == "gemma" else {}
    return TEXT_CONFIGS[sizes.family](
        vocab_size=len(tokenizer),
        hidden_size=sizes.width,
        intermediate_size=sizes.mlp,
        num_hidden_layers=sizes.layers,
        num_attention_heads=sizes.heads,
        num_key_value_heads=sizes.heads,
        head_dim=sizes.width // sizes.heads,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=sizes.tie_embeddings,
        **extra,
    )


def embedding_scale(model: LlavaForConditionalGeneration) -> float:
    """The factor the decoder multiplies text embeddings by (sqrt(width) for Gemma, else 1).

    Training divides the embedding matrix's learning rate by it, so that under Adam the scaled embeddings move
    in the residual stream as fast as unscaled ones do (otherwise the 12- and 24-layer Gemma members learned
    the caption prior and never grounded: recall 0.35 after 400-700 steps at learning rates 1e-3 and 2e-3).
    """
    return float(getattr(model.get_input_embeddings(), "scalar_embed_scale", 1.0))

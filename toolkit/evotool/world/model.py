"""The demo model: a tiny LLaVA (CLIP-style vision tower, 2-layer projector, Llama decoder)."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import CLIPVisionConfig, GenerationConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

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
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=sizes.width,
        intermediate_size=sizes.mlp,
        num_hidden_layers=sizes.layers,
        num_attention_heads=sizes.heads,
        num_key_value_heads=sizes.heads,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=world.grid**2,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    model = LlavaForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=32,
        do_sample=False,
    )
    return model

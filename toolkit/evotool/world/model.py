"""The demo model: a tiny LLaVA (CLIP-style vision tower, 2-layer projector, a Llama, Qwen2 or Gemma decoder)."""

from __future__ import annotations

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

from evotool.world.config import ModelConfig
from evotool.world.generator import WorldConfig


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

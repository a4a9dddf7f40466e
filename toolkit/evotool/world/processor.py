"""The world's processor: a word-level tokenizer, a PIL CLIP image processor and a LLaVA chat template."""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import CLIPImageProcessorPil, LlavaProcessor, PreTrainedTokenizerFast

from evotool.world.generator import (
    ATTRIBUTE_PROMPT,
    CAPTION_PROMPT,
    COLOURS,
    EXISTENCE_PROMPT,
    SHAPES,
    WorldConfig,
)

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")

# "USER: <image>\n{prompt} ASSISTANT:" (LLaVA-1.5 style); an assistant turn ends with "</s>".
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER:{% else %}ASSISTANT:{% endif %}"
    "{% if message['content'] is string %} {{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %} <image>\n"
    "{% elif item['type'] == 'text' %}{% if loop.first %} {% endif %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %} {% else %}</s>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def vocabulary() -> list[str]:
    """Every word the world's prompts, chat turns and answers use, after the special tokens."""
    pre = pre_tokenizers.Whitespace()
    texts = [
        CAPTION_PROMPT,
        EXISTENCE_PROMPT.format(shape="x"),
        ATTRIBUTE_PROMPT.format(shape="x"),
        "USER: ASSISTANT: a an , . yes no",
        " ".join(COLOURS),
        " ".join(SHAPES),
    ]
    words = {w for text in texts for w, _ in pre.pre_tokenize_str(text)} - {"x"}
    return [*SPECIAL_TOKENS, *sorted(words)]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer (``Whitespace`` pre-tokenizer) that prepends ``<s>``; ``<image>`` is special."""
    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
        model_max_length=128,
    )


def build_processor(cfg: WorldConfig | None = None) -> LlavaProcessor:
    """A ``LlavaProcessor`` for ``cfg``'s images: one image token per grid cell (CLS dropped)."""
    cfg = cfg or WorldConfig()
    size = cfg.image_size
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        patch_size=cfg.cell,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
        image_token="<image>",
    )

"""Save tiny random checkpoints of every supported architecture with a real, offline-built processor.

``save_tiny(model_type, out_dir)`` writes the model of ``conftest.build_tiny`` together with that
architecture's own processor class (a PIL image processor, no torchvision) and a word-level tokenizer
whose 96 ids line up with the tiny config's special ids (image token 90, boi/eoi or vision
start/end 91..93), so ``AutoModelForImageTextToText.from_pretrained(dir)`` and
``AutoProcessor.from_pretrained(dir)`` reload it and :func:`evotool.generation.build_inputs` works.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import transformers
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AddedToken, PreTrainedTokenizerFast

from conftest import IMAGE_TOKEN, VOCAB, build_tiny

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0..3, as in conftest's configs
WORDS = ("USER", "ASSISTANT", ":", "Please", "describe", "this", "image", "in", "detail", ".", "What", "is", "?")
IDEFICS_GRID = tuple(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7))

# "USER: <placeholder>\n{prompt} ASSISTANT:"; {image} is the architecture's image placeholder.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER:{% else %}ASSISTANT:{% endif %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %} IMAGE_PLACEHOLDER\n"
    "{% elif item['type'] == 'text' %} {{ item['text'] }}{% endif %}{% endfor %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@dataclass(frozen=True)
class ProcessorSpec:
    """How one architecture's processor is assembled.

    ``fixed``: token -> id pinned to the tiny config's ids; ``extra``: more special tokens (free ids);
    ``named``: tokenizer attributes (``image_token``, ``boi_token`` ...) -> token;
    ``placeholder``: what the chat template puts where the image goes (None: no chat template).
    """

    processor: str
    image_processor: Callable[[], Any]
    fixed: dict[str, int]
    placeholder: str | None
    extra: tuple[str, ...] = ()
    named: dict[str, str] = field(default_factory=dict)
    kwargs: dict[str, Any] = field(default_factory=dict)


def _ip(name: str, **kwargs: Any) -> Callable[[], Any]:
    return lambda: getattr(transformers, name)(**kwargs)


_CLIP = dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
_LLAVA = dict(patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1,
              image_token="<image>")
_QWEN_IP = _ip("Qwen2VLImageProcessorPil", min_pixels=32 * 32, max_pixels=32 * 32, patch_size=4, merge_size=2,
               temporal_patch_size=2)
_QWEN_FIXED = {"<|image_pad|>": IMAGE_TOKEN, "<|video_pad|>": 91, "<|vision_start|>": 92, "<|vision_end|>": 93}

SPECS: dict[str, ProcessorSpec] = {
    "llava": ProcessorSpec("LlavaProcessor", _ip("CLIPImageProcessorPil", **_CLIP), {"<image>": IMAGE_TOKEN},
                           "<image>", named={"image_token": "<image>"}, kwargs=_LLAVA),
    "llava_next": ProcessorSpec("LlavaNextProcessor",
                                _ip("LlavaNextImageProcessorPil", **_CLIP, image_grid_pinpoints=[[32, 32]]),
                                {"<image>": IMAGE_TOKEN}, "<image>", named={"image_token": "<image>"}, kwargs=_LLAVA),
    "qwen2_vl": ProcessorSpec("Qwen2VLProcessor", _QWEN_IP, _QWEN_FIXED, "<|vision_start|><|image_pad|><|vision_end|>",
                              named={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"}),
    "qwen2_5_vl": ProcessorSpec("Qwen2_5_VLProcessor", _QWEN_IP, _QWEN_FIXED,
                                "<|vision_start|><|image_pad|><|vision_end|>",
                                named={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"}),
    # one global 32x32 crop -> 16 patches, pixel shuffle by 2 -> 4 image tokens
    "idefics3": ProcessorSpec("Idefics3Processor",
                              _ip("Idefics3ImageProcessorPil", do_image_splitting=False, size={"longest_edge": 32},
                                  max_image_size={"longest_edge": 32}),
                              {"<image>": IMAGE_TOKEN}, "<image>",
                              extra=("<fake_token_around_image>", "<global-img>", "<end_of_utterance>", *IDEFICS_GRID),
                              named={"image_token": "<image>"}, kwargs=dict(image_seq_len=4)),
    "paligemma": ProcessorSpec("PaliGemmaProcessor", lambda: _siglip(image_seq_length=16), {"<image>": IMAGE_TOKEN},
                               None, named={"image_token": "<image>"}),
    "gemma3": ProcessorSpec("Gemma3Processor", _ip("Gemma3ImageProcessorPil", size={"height": 32, "width": 32}),
                            {"<image_soft_token>": IMAGE_TOKEN, "<start_of_image>": 91, "<end_of_image>": 92},
                            "<start_of_image>",
                            named={"image_token": "<image_soft_token>", "boi_token": "<start_of_image>",
                                   "eoi_token": "<end_of_image>"},
                            kwargs=dict(image_seq_length=4)),
    "mistral3": ProcessorSpec("PixtralProcessor",
                              _ip("PixtralImageProcessorPil", size={"longest_edge": 32}, patch_size=8),
                              {"[IMG]": IMAGE_TOKEN}, "[IMG]", extra=("[IMG_BREAK]", "[IMG_END]"),
                              named={"image_token": "[IMG]"}, kwargs=dict(patch_size=8, spatial_merge_size=2)),
}


def _siglip(image_seq_length: int) -> Any:
    ip = transformers.SiglipImageProcessorPil(size={"height": 32, "width": 32})
    ip.image_seq_length = image_seq_length
    return ip


def build_tokenizer(spec: ProcessorSpec) -> PreTrainedTokenizerFast:
    """A ``VOCAB``-token word-level tokenizer: specials at 0..3, the spec's pinned ids, prompt words, fillers."""
    tokens: list[str | None] = [None] * VOCAB
    for i, tok in enumerate(SPECIALS):
        tokens[i] = tok
    for tok, i in spec.fixed.items():
        tokens[i] = tok
    free = iter(i for i in range(VOCAB) if tokens[i] is None)
    for tok in (*spec.extra, *WORDS):
        tokens[next(free)] = tok
    for i in free:
        tokens[i] = f"w{i}"
    vocab = {tok: i for i, tok in enumerate(tokens)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens=spec.named, model_max_length=512,
    )
    # every multimodal marker stays one token (ids unchanged: they are in the vocabulary already)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in (*spec.fixed, *spec.extra)],
                         special_tokens=True)
    return tokenizer


def build_processor(model_type: str) -> Any:
    """The architecture's own processor class around a PIL image processor and :func:`build_tokenizer`."""
    spec = SPECS[model_type]
    template = CHAT_TEMPLATE.replace("IMAGE_PLACEHOLDER", spec.placeholder) if spec.placeholder else None
    cls = getattr(transformers, spec.processor)
    return cls(image_processor=spec.image_processor(), tokenizer=build_tokenizer(spec), chat_template=template,
               **spec.kwargs)


def save_tiny(model_type: str, out_dir: Path, layers: int = 4, seed: int = 0) -> Path:
    """Save ``build_tiny(model_type, layers, seed)`` and its processor to ``out_dir``; returns ``out_dir``.

    Architectures in :data:`MANUAL` get no processor: transformers cannot build theirs without torchvision.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    build_tiny(model_type, layers, seed).save_pretrained(out_dir)
    if model_type not in MANUAL:
        build_processor(model_type).save_pretrained(out_dir)
    return out_dir


def write_images(folder: Path, n: int, size: int = 32, seed: int = 0) -> list[Path]:
    """``n`` random RGB PNGs ``img0.png`` ... in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _qwen_pads(vis: dict[str, Any], i: int) -> str:
    return "<|image_pad|>" * (int(vis["image_grid_thw"][i].prod()) // 4)  # merge_size 2 x 2


def _pixtral_grid(vis: dict[str, Any], i: int) -> str:
    h, w = (int(x) // 16 for x in vis["image_sizes"][i])  # patch 8 x spatial merge 2
    return ("[IMG]" * w + "[IMG_BREAK]") * (h - 1) + "[IMG]" * w + "[IMG_END]"


# model_type -> (placeholder token in the chat prompt, its expansion for image i of the processed batch)
MANUAL: dict[str, tuple[str, Callable[[dict[str, Any], int], str]]] = {
    "qwen2_vl": ("<|image_pad|>", _qwen_pads),
    "qwen2_5_vl": ("<|image_pad|>", _qwen_pads),
    "mistral3": ("[IMG]", _pixtral_grid),
}


class ManualProcessor:
    """Stand-in for processor classes transformers cannot build without torchvision (the Qwen2-VL
    processors need a video processor, PixtralProcessor imports torchvision): the architecture's PIL
    image processor and tokenizer, expanding each image placeholder as the real processor does.

    Called like a processor (``text``, ``images`` one list per text); returns ``input_ids`` [B, T] (left
    padded), ``attention_mask``, the image processor's tensors and, for M-RoPE, ``mm_token_type_ids`` [B, T].
    """

    def __init__(self, model_type: str) -> None:
        spec = SPECS[model_type]
        self.model_type = model_type
        self.image_processor = spec.image_processor()
        self.tokenizer = build_tokenizer(spec)
        self.chat_template = CHAT_TEMPLATE.replace("IMAGE_PLACEHOLDER", spec.placeholder)

    def apply_chat_template(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, **kwargs)

    def __call__(self, text: list[str], images: list[list[Image.Image]], return_tensors: str = "pt",
                 padding: bool = True) -> dict[str, Any]:
        token, expand = MANUAL[self.model_type]
        vis = dict(self.image_processor([im for row in images for im in row], return_tensors=return_tensors))
        texts, i = [], 0
        for t, row in zip(text, images):
            for _ in row:
                t = t.replace(token, "\0", 1)
            for _ in row:
                t, i = t.replace("\0", expand(vis, i), 1), i + 1
            texts.append(t)
        batch = dict(self.tokenizer(texts, return_tensors=return_tensors, padding=padding))
        if "image_grid_thw" in vis:
            batch["mm_token_type_ids"] = (batch["input_ids"] == IMAGE_TOKEN).int()
        return batch | vis

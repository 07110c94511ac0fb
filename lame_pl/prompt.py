"""One prompt layout for every query, target and negative, in training and in evaluation.

A side (a query, a target or a hard negative) is an instruction, a text, zero or more images and
at most one video (its sampled frames). It is rendered as::

    <media>\\n{instruction} {text}\\n

``<media>`` is one ``<|vision_start|><|image_pad|><|vision_end|>`` block per image, in order, then
one ``<|vision_start|><|video_pad|><|vision_end|>`` block for the video; the processor expands
each pad token into that image's or video's tokens. The instruction and the text are joined by
one space; a part that is empty is left out together with its separator (no media: no newline
before the instruction; no instruction: the text follows the newline directly). Every prompt
ends with a newline. Examples: ``<image>\\nRepresent the given image.\\n``,
``Find an image that matches the caption: a red circle\\n``, ``a red circle\\n``.

This is VLM2Vec-V2's layout for Qwen2-VL: ``src/model/processor.py::process_input_text`` puts
the media token first, then the instruction and the text joined by a space; its MMEB image
readers (``src/data/eval_dataset/image_cls_dataset.py`` and relatives) strip the Phi-3
placeholder from instructions that begin ``<|image_1|>\\n``, drop the space before that newline
and append a closing newline, giving ``<|image_pad|>\\n{instruction} {text}\\n``. The deviations,
each on purpose:

- Each image keeps Qwen2-VL's own ``<|vision_start|>…<|vision_end|>`` wrapper where VLM2Vec puts
  a bare ``<|image_pad|>``: transformers 5.x groups rotary positions by ``mm_token_type_ids``,
  so two bare adjacent images would merge into one group, and the checkpoint was pretrained
  with the wrappers.
- The layout is the same for every side. VLM2Vec writes text-only candidates as the bare text
  (no instruction, no closing newline), some text queries as ``{instruction} {text}\\n`` and its
  video readers with a space, not a newline, after the video token; one rule here means the
  training collators and the evaluators cannot drift apart.
- A video goes through the processor's ``videos=`` input (``pixel_values_videos``,
  ``video_grid_thw``: temporal patch merging and the temporal rotary axis), as VLM2Vec does, and
  a side may carry images and a video together (images first, as VLM2Vec orders the tokens).

Instruction and text are each cut to ``max_text_length`` tokens before rendering, so the
processor never truncates and never cuts vision tokens. ``PromptProcessor`` turns a list of
sides into left-padded processor inputs; ``datamodules.collate`` and
``lame_pl.evaluation.encode`` both call it, so a record gives the same tokens in both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
END_OF_TEXT = "<|endoftext|>"
# Bumped whenever rendering changes, so that embeddings cached under the old layout are not reused.
LAYOUT_VERSION = "vlm2vec-v2-qwen2vl/1"

TEXT_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids")
IMAGE_KEYS = ("pixel_values", "image_grid_thw")
VIDEO_KEYS = ("pixel_values_videos", "video_grid_thw")
FLOAT_KEYS = ("pixel_values", "pixel_values_videos")
# Text that would make the processor expect media that the side does not carry.
VISION_TOKENS = (VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)
# Distinct instructions whose clipped form is remembered (they repeat across rows and batches).
_CLIP_CACHE_SIZE = 4096


@dataclass(frozen=True)
class Side:
    """One query, target or negative to encode.

    Attributes:
        instruction: Task instruction ("" for none).
        text: The side's own text ("" for none).
        images: Images, each read as one image.
        video: A video's sampled frames, in order; ``None`` (or empty) for no video.
    """

    instruction: str = ""
    text: str = ""
    images: Sequence[Image.Image] = ()
    video: Sequence[Image.Image] | None = None

    @property
    def has_video(self) -> bool:
        """Whether the side carries a video."""
        return bool(self.video)


def render(
    instruction: str,
    text: str,
    num_images: int = 0,
    has_video: bool = False,
    image_token: str = IMAGE_PAD,
    video_token: str = VIDEO_PAD,
) -> str:
    """The prompt string of one side (layout in the module docstring); inputs are used as given.

    Raises:
        ValueError: When the side has no instruction, text, image or video.
    """
    media = f"{VISION_START}{image_token}{VISION_END}" * num_images
    if has_video:
        media += f"{VISION_START}{video_token}{VISION_END}"
    words = " ".join(part for part in (instruction, text) if part)
    if not media and not words:
        raise ValueError("a side has no instruction, text, image or video: there is nothing to encode")
    return f"{media}\n{words}\n" if media and words else f"{media}{words}\n"


class PromptProcessor:
    """Turns sides into left-padded model inputs through a Qwen-VL processor.

    Args:
        processor: A Qwen-VL processor (``lame_pl.backbone.build_processor``).
        max_text_length: Most tokens of each instruction and each text (cut separately); vision
            tokens never count and are never cut.
    """

    def __init__(self, processor: Any, max_text_length: int) -> None:
        if max_text_length < 1:
            raise ValueError(f"max_text_length must be >= 1, got {max_text_length}")
        self.processor = processor
        self.tokenizer = processor.tokenizer
        # Pooling reads the last position, so every sequence must end there.
        self.tokenizer.padding_side = "left"
        self.max_text_length = max_text_length
        self.image_token = getattr(processor, "image_token", IMAGE_PAD)
        self.video_token = getattr(processor, "video_token", VIDEO_PAD)
        self._clipped: dict[str, str] = {}

    def clip(self, text: str) -> str:
        """``text`` cut to ``max_text_length`` tokens.

        Raises:
            ValueError: When the text holds a vision special token (the processor would expect
                media the side does not carry).
        """
        for token in VISION_TOKENS:
            if token in text:
                raise ValueError(f"text {text[:60]!r} contains the special token {token}; strip it from the record")
        # A byte-level BPE token covers at least one byte: short texts need no tokenizing.
        if len(text.encode("utf-8")) <= self.max_text_length:
            return text
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= self.max_text_length else self.tokenizer.decode(ids[: self.max_text_length])

    def _clip_instruction(self, instruction: str) -> str:
        # Instructions repeat across rows and batches: tokenize each once per worker.
        if instruction in self._clipped:
            return self._clipped[instruction]
        clipped = self.clip(instruction)
        if len(self._clipped) < _CLIP_CACHE_SIZE:
            self._clipped[instruction] = clipped
        return clipped

    def prompt(self, side: Side) -> str:
        """The rendered, clipped prompt of ``side``."""
        return render(
            self._clip_instruction(side.instruction),
            self.clip(side.text),
            len(side.images),
            side.has_video,
            self.image_token,
            self.video_token,
        )

    def __call__(self, sides: Sequence[Side]) -> dict[str, torch.Tensor]:
        """Processor inputs of ``sides``, one row each, left-padded.

        ``pixel_values``/``image_grid_thw`` are present only when some side has an image, and
        ``pixel_values_videos``/``video_grid_thw`` only when some side has a video; images and
        videos are taken in row order.
        """
        if not sides:
            raise ValueError("no side to encode")
        texts = [self.prompt(side) for side in sides]
        images = [_rgb(image) for side in sides for image in side.images]
        videos = [_frames(side.video) for side in sides if side.has_video]
        out = self.processor(
            text=texts, images=images or None, videos=videos or None, padding=True, return_tensors="pt"
        )
        keys = TEXT_KEYS + (IMAGE_KEYS if images else ()) + (VIDEO_KEYS if videos else ())
        return {k: out[k].to(torch.float32 if k in FLOAT_KEYS else torch.long) for k in keys}


def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def _frames(video: Sequence[Image.Image]) -> list[Image.Image]:
    frames = [_rgb(frame) for frame in video]
    sizes = {frame.size for frame in frames}
    if len(sizes) > 1:
        raise ValueError(f"the frames of one video differ in size ({sorted(sizes)}); resize them to one size")
    return frames

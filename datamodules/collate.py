"""Batching samples through the backbone's processor: image-caption pairs and instruction pairs."""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
END_OF_TEXT = "<|endoftext|>"
TEXT_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids")
IMAGE_KEYS = ("pixel_values", "image_grid_thw")


class _ProcessorCollator:
    """What every collator shares: a left-padding tokenizer, the special ids and decoder labels."""

    def __init__(self, processor: Any, max_text_length: int, decoder_max_length: int) -> None:
        if max_text_length < 1:
            raise ValueError(f"max_text_length must be >= 1, got {max_text_length}")
        if decoder_max_length < 2:
            raise ValueError(f"decoder_max_length must be >= 2 (a token and {END_OF_TEXT}), got {decoder_max_length}")
        self.processor = processor
        self.tokenizer = processor.tokenizer
        # Pooling reads the last position, so every sequence must end there.
        self.tokenizer.padding_side = "left"
        self.max_text_length = max_text_length
        self.decoder_max_length = decoder_max_length
        self.eos_id = self.tokenizer.convert_tokens_to_ids(END_OF_TEXT)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id
        image_token = getattr(processor, "image_token", "<|image_pad|>")
        self.vision_text = f"{VISION_START}{image_token}{VISION_END}"

    def _clip(self, text: str) -> str:
        """``text`` cut to ``max_text_length`` tokens, so that the processor never truncates (nor cuts image tokens)."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.tokenizer.decode(ids[: self.max_text_length])

    def _decoder_inputs(self, texts: list[str]) -> dict[str, torch.Tensor]:
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        # Keep room for <|endoftext|>, so that every row teaches the decoder where to stop.
        ids = [row[: self.decoder_max_length - 1] + [self.eos_id] for row in ids]
        length = max(len(row) for row in ids)
        input_ids = torch.full((len(ids), length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), length), dtype=torch.long)
        for i, row in enumerate(ids):
            input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, : len(row)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}


class PairCollator(_ProcessorCollator):
    """Turns a list of ``{"key", "image", "text"}`` samples into model inputs.

    The query is the image followed by ``query_instruction``; the target is
    ``target_instruction`` followed by the caption. Both go through the processor, left-padded so
    that the last position holds each sequence's final token. The decoder labels are the caption
    tokens and ``<|endoftext|>``, right-padded, with no instruction.

    Args:
        processor: A Qwen-VL processor (``lame_pl.backbone.build_processor``).
        query_instruction: Text after the image in every query.
        target_instruction: Text before the caption in every target.
        max_text_length: Most text tokens in a query's instruction or a target; image tokens
            never count and are never cut.
        decoder_max_length: Most decoder tokens, ``<|endoftext|>`` included.
    """

    def __init__(
        self,
        processor: Any,
        query_instruction: str,
        target_instruction: str = "",
        max_text_length: int = 64,
        decoder_max_length: int = 32,
    ) -> None:
        super().__init__(processor, max_text_length, decoder_max_length)
        self.target_instruction = target_instruction
        # Truncate the instruction once, here, so that the processor never truncates a query and
        # so can never cut image tokens.
        self.query_instruction = self._clip(query_instruction)
        self.query_text = f"{self.vision_text}{self.query_instruction}"

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """Collate samples into ``{"query", "target", "decoder", "keys", "texts"}``."""
        images = [_rgb(s["image"]) for s in samples]
        texts = [s["text"] for s in samples]
        query = self.processor(
            images=images, text=[self.query_text] * len(samples), padding=True, return_tensors="pt"
        )
        target = self.processor(
            text=[self.target_instruction + t for t in texts],
            padding=True,
            truncation=True,
            max_length=self.max_text_length,
            return_tensors="pt",
        )
        return {
            "query": {k: _cast(k, query[k]) for k in TEXT_KEYS + IMAGE_KEYS},
            "target": {k: _cast(k, target[k]) for k in TEXT_KEYS},
            "decoder": self._decoder_inputs(texts),
            "keys": [s["key"] for s in samples],
            "texts": texts,
        }


class InstructionCollator(_ProcessorCollator):
    """Turns instruction-pair samples (``datamodules.samples.DecodeInstructionPairs``) into model inputs.

    A query reads ``instruction`` + the image's vision tokens (when it has an image) + ``text``;
    a target and each hard negative read the vision tokens (when it has an image) + ``text``. Each
    side goes through the processor with the images of its rows that have one, in row order,
    left-padded; ``pixel_values``/``image_grid_thw`` are present only on a side with at least one
    image. The hard negatives of all samples are flattened into one ``"negative"`` side, shared
    candidates for every query, and the key is left out when the batch has none. The decoder
    labels are the target's text and ``<|endoftext|>``, right-padded; an image-only target gives
    ``<|endoftext|>`` alone.

    Args:
        processor: A Qwen-VL processor (``lame_pl.backbone.build_processor``).
        query_instruction: Instruction for the queries whose sample gives none.
        target_instruction: Text before the text of every target and negative.
        max_text_length: Most tokens in each instruction and each side's text (cut separately);
            image tokens never count and are never cut.
        decoder_max_length: Most decoder tokens, ``<|endoftext|>`` included.
    """

    def __init__(
        self,
        processor: Any,
        query_instruction: str = "",
        target_instruction: str = "",
        max_text_length: int = 64,
        decoder_max_length: int = 32,
    ) -> None:
        super().__init__(processor, max_text_length, decoder_max_length)
        self.query_instruction = self._clip(query_instruction)
        self.target_instruction = target_instruction
        self._clipped: dict[str, str] = {}

    def _clip_prefix(self, prefix: str) -> str:
        # Instructions repeat across rows and batches (a target instruction is the same for all):
        # tokenize each once per worker rather than once per row.
        if prefix not in self._clipped:
            self._clipped[prefix] = self._clip(prefix)
        return self._clipped[prefix]

    def side(self, prefixes: list[str], sides: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Processor inputs of one side: ``prefix`` + vision tokens (one per image) + text, per row.

        Each side holds ``"text"`` and either ``"image"`` (a PIL image or ``None``) or ``"images"``
        (a list of PIL images, e.g. a video's sampled frames, each read as one image).
        """
        per_row = [_side_images(side) for side in sides]
        texts = [
            self._clip_prefix(prefix) + self.vision_text * len(images) + self._clip(side["text"])
            for prefix, side, images in zip(prefixes, sides, per_row, strict=True)
        ]
        images = [_rgb(image) for row in per_row for image in row]
        out = self.processor(images=images or None, text=texts, padding=True, return_tensors="pt")
        keys = TEXT_KEYS + (IMAGE_KEYS if images else ())
        return {k: _cast(k, out[k]) for k in keys}

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """Collate samples into ``{"query", "target", "decoder", "keys", "texts"}`` and ``"negative"`` if any."""
        queries = [s["query"] for s in samples]
        targets = [s["target"] for s in samples]
        negatives = [n for s in samples for n in s["negatives"]]
        batch = {
            "query": self.side([q["instruction"] or self.query_instruction for q in queries], queries),
            "target": self.side([self.target_instruction] * len(targets), targets),
            "decoder": self._decoder_inputs([t["text"] for t in targets]),
            "keys": [s["key"] for s in samples],
            "texts": [t["text"] for t in targets],
        }
        if negatives:
            batch["negative"] = self.side([self.target_instruction] * len(negatives), negatives)
        return batch


def _side_images(side: dict[str, Any]) -> list[Image.Image]:
    if "images" in side:
        return list(side["images"])
    return [] if side["image"] is None else [side["image"]]


def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def _cast(name: str, tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.float32) if name == "pixel_values" else tensor.to(torch.long)

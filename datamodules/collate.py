"""Batching image-caption pairs through the backbone's processor."""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
END_OF_TEXT = "<|endoftext|>"


class PairCollator:
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
        self.target_instruction = target_instruction
        self.eos_id = self.tokenizer.convert_tokens_to_ids(END_OF_TEXT)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id
        image_token = getattr(processor, "image_token", "<|image_pad|>")
        # Truncate the instruction once, here, so that the processor never truncates a query and
        # so can never cut image tokens.
        instruction_ids = self.tokenizer(query_instruction, add_special_tokens=False)["input_ids"]
        self.query_instruction = self.tokenizer.decode(instruction_ids[:max_text_length])
        self.query_text = f"{VISION_START}{image_token}{VISION_END}{self.query_instruction}"

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
            "query": {k: _cast(k, query[k]) for k in
                      ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")},
            "target": {k: _cast(k, target[k]) for k in ("input_ids", "attention_mask", "mm_token_type_ids")},
            "decoder": self._decoder_inputs(texts),
            "keys": [s["key"] for s in samples],
            "texts": texts,
        }

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


def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def _cast(name: str, tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.float32) if name == "pixel_values" else tensor.to(torch.long)

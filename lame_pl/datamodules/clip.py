"""Image-caption shards as CLIP inputs: the same shards and decoding as LaME, open_clip's tokenizer and transform.

``CLIPImageTextDataModule`` is ``ImageTextDataModule`` for the CLIP anchor (``lame_pl.clip_anchor``):
the same shard reading, shuffling, epochs and skip counting (``ShardDataModule``) and the same
decoded ``{"key", "image", "text"}`` pairs; only the collator differs.
"""

from __future__ import annotations

from typing import Any

import torch

from lame_pl.clip_spec import CLIPSpec, build_tokenizer, build_transform
from lame_pl.data.image_text import DecodePairs
from lame_pl.data.skips import SkipCounter
from lame_pl.datamodules.base import ShardDataModule


class CLIPProcessor:
    """open_clip's tokenizer and image transform of one ``CLIPSpec``.

    Args:
        spec: The CLIP architecture; its tokenizer cuts texts at its context length and its
            transform resizes and centre-crops images to its image size.
    """

    def __init__(self, spec: CLIPSpec) -> None:
        self.spec = spec
        self.tokenizer = build_tokenizer(spec)
        self.transform = build_transform(spec)

    def images(self, images: list[Any]) -> torch.Tensor:
        """``(B, 3, S, S)`` pixels of PIL images."""
        return torch.stack([self.transform(image.convert("RGB")) for image in images])

    def texts(self, texts: list[str]) -> torch.Tensor:
        """``(B, context_length)`` token ids of ``texts``."""
        return self.tokenizer(texts)


class CLIPPairCollator:
    """Turns ``{"key", "image", "text"}`` samples into ``{"query": {"image"}, "target": {"text"}, "keys", "texts"}``.

    The query is the image alone and the target the caption alone: a dual encoder takes no
    instruction (``ImageTextDataModule``'s ``query_instruction`` has no counterpart).
    """

    def __init__(self, processor: CLIPProcessor) -> None:
        self.processor = processor

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        texts = [s["text"] for s in samples]
        return {
            "query": {"image": self.processor.images([s["image"] for s in samples])},
            "target": {"text": self.processor.texts(texts)},
            "keys": [s["key"] for s in samples],
            "texts": texts,
        }


class CLIPImageTextDataModule(ShardDataModule):
    """WebDataset image-caption pairs as CLIP inputs (the CLI links ``backbone`` from the model).

    Args:
        backbone: The CLIP architecture (``lame_pl.clip_spec.CLIPSpec``), linked from
            ``model.init_args.backbone``.
        **kwargs: ``ShardDataModule``'s arguments (shards, batch sizes, workers, seeding, ``strict``).
    """

    def __init__(self, backbone: CLIPSpec, **kwargs: Any) -> None:
        super().__init__(backbone, **kwargs)
        self.collator = CLIPPairCollator(self.processor)

    def build_processor(self, backbone: Any) -> CLIPProcessor:
        """open_clip's tokenizer and transform instead of a Qwen-VL processor."""
        if not isinstance(backbone, CLIPSpec):
            raise ValueError(
                f"data.backbone must be a CLIP spec (model lame_pl.clip_anchor.CLIPAnchor), got {backbone!r}"
            )
        return CLIPProcessor(backbone)

    def decode_stage(self, skips: SkipCounter) -> DecodePairs:
        """Raw samples to ``{"key", "image", "text"}`` pairs, as ``ImageTextDataModule`` decodes them."""
        return DecodePairs(skips, self.max_image_pixels)

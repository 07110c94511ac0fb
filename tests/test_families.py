"""Qwen2.5-VL and Qwen3-VL backbones load from local folders and encode through the same code path."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from lame_pl.backbone import BackboneSpec, build_backbone, build_processor, qwen2_tokenizer
from lame_pl.datamodules.collate import PairCollator
from lame_pl.model import LaMEEncoder

TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=151936,
)


def _token_ids() -> dict[str, int]:
    tokenizer = qwen2_tokenizer()
    names = {
        "image_token_id": "<|image_pad|>",
        "video_token_id": "<|video_pad|>",
        "vision_start_token_id": "<|vision_start|>",
        "vision_end_token_id": "<|vision_end|>",
    }
    return {key: tokenizer.convert_tokens_to_ids(token) for key, token in names.items()}


def save_qwen2_5_vl(folder) -> int:
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    config = Qwen2_5_VLConfig(
        text_config=dict(TEXT, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}),
        vision_config=dict(
            depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, fullatt_block_indexes=[0]
        ),
        **_token_ids(),
    )
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(folder)
    Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(), tokenizer=qwen2_tokenizer(), video_processor=Qwen2VLVideoProcessor()
    ).save_pretrained(folder)
    return 56


def save_qwen3_vl(folder) -> int:
    from transformers import Qwen2VLImageProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    config = Qwen3VLConfig(
        text_config=dict(
            TEXT,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 1e6,
                "mrope_section": [2, 3, 3],
                "mrope_interleaved": True,
            },
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            patch_size=16,
            num_position_embeddings=64,
            deepstack_visual_indexes=[1],
        ),
        **_token_ids(),
    )
    Qwen3VLForConditionalGeneration(config).save_pretrained(folder)
    Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(patch_size=16),
        tokenizer=qwen2_tokenizer(),
        video_processor=Qwen3VLVideoProcessor(),
    ).save_pretrained(folder)
    return 64


@pytest.mark.parametrize("save", [save_qwen2_5_vl, save_qwen3_vl], ids=["qwen2.5-vl", "qwen3-vl"])
def test_family_encodes_from_a_local_folder(save, tmp_path):
    torch.manual_seed(0)
    side = save(tmp_path)
    spec = BackboneSpec(path=str(tmp_path), min_pixels=side * side, max_pixels=side * side)
    backbone = build_backbone(spec).eval()
    collate = PairCollator(build_processor(spec), query_instruction="Find the caption.")
    samples = [
        {"key": str(i), "image": Image.new("RGB", (side, side), (80 * i, 200, 40)), "text": text}
        for i, text in enumerate(["a red circle", "two blue squares at the top"])
    ]
    batch = collate(samples)
    masked = LaMEEncoder(backbone, num_reason_tokens=3, bottleneck_mask=True)
    open_ = LaMEEncoder(backbone, num_reason_tokens=3)
    open_.load_state_dict(masked.state_dict())
    for side_name in ("query", "target"):
        with_mask, without = masked(**batch[side_name]), open_(**batch[side_name])
        assert with_mask.embedding.shape == (2, 64)
        assert torch.allclose(with_mask.embedding.norm(dim=-1), torch.ones(2), atol=1e-5)
        assert torch.allclose(with_mask.reason_states, without.reason_states, atol=1e-5)
        assert not torch.allclose(with_mask.embed_state, without.embed_state, atol=1e-4)
    # The image reaches the embedding: two different images give two different queries.
    query = open_(**batch["query"]).embedding
    assert not torch.allclose(query[0], query[1], atol=1e-4)

"""Video through the model's own video path: processor video inputs, token types and rotary positions."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import random_image

from lame_pl.backbone import build_backbone, build_processor
from lame_pl.model import LaMEEncoder
from lame_pl.modes.common import start_cached
from lame_pl.prompt import PromptProcessor, Side

K = 3
VIDEO, IMAGE, TEXT = 0, 1, 2  # rows of the mixed batch


@pytest.fixture(scope="module")
def backbone(tiny_spec):
    torch.manual_seed(0)
    return build_backbone(tiny_spec).eval()


def _frames(seed: int, n: int = 4, side: int = 28) -> list:
    rng = random.Random(seed)
    return [random_image(rng, side) for _ in range(n)]


def _mixed(processor, frames: list) -> dict[str, torch.Tensor]:
    """A video row, an image row and a text-only row in one batch, through the shared prompt code."""
    return PromptProcessor(processor, max_text_length=16)(
        [
            Side("Understand the content of the provided video.", "", video=frames),
            Side("Represent the image.", "", (random_image(random.Random(9)),)),
            Side("Find a video that contains:", "a cat jumps over a fence"),
        ]
    )


def _positions(encoder: LaMEEncoder, inputs: dict) -> torch.Tensor:
    """The ``(3, B, L)`` rotary positions the encoder's forward pass computes (reason and [EMBED] included)."""
    seen = []
    original = encoder.backbone.get_rope_index

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append(out[0])
        return out

    encoder.backbone.get_rope_index = spy
    try:
        with torch.no_grad():
            encoder(**inputs)
    finally:
        del encoder.backbone.get_rope_index
    assert len(seen) == 1
    return seen[0]


def test_video_goes_through_the_processor_video_inputs(tiny_spec):
    processor = build_processor(tiny_spec)
    frames = _frames(0)
    inputs = _mixed(processor, frames)
    assert inputs["pixel_values_videos"].dtype == torch.float32 and inputs["video_grid_thw"].shape == (1, 3)
    assert "pixel_values" in inputs and inputs["image_grid_thw"].shape == (1, 3)
    t, h, w = inputs["video_grid_thw"][0].tolist()
    assert t == len(frames) // processor.video_processor.temporal_patch_size  # frames merged in time
    merge = processor.video_processor.merge_size**2
    types = inputs["mm_token_type_ids"]
    assert int((types[VIDEO] == 2).sum()) == t * h * w // merge and not bool((types[VIDEO] == 1).any())
    assert not bool((types[IMAGE] == 2).any()) and bool((types[IMAGE] == 1).any())
    assert not bool(types[TEXT].any())
    assert inputs["pixel_values_videos"].shape[0] == t * h * w


def test_appended_tokens_continue_after_the_video_in_a_mixed_batch(backbone, tiny_spec):
    processor = build_processor(tiny_spec)
    inputs = _mixed(processor, _frames(1))
    encoder = LaMEEncoder(backbone, num_reason_tokens=K)
    positions = _positions(encoder, inputs)
    mask = inputs["attention_mask"].bool()
    types = inputs["mm_token_type_ids"]
    length = inputs["input_ids"].shape[1]
    for row in (VIDEO, IMAGE, TEXT):
        prompt, appended = positions[:, row, :length][:, mask[row]], positions[:, row, length:]
        start = int(prompt.max()) + 1
        expected = torch.arange(start, start + K + 1).expand(3, -1)
        assert torch.equal(appended, expected), row
    # The video's positions: time on axis 0 (one step per temporal patch), space on axes 1 and 2.
    video = positions[:, VIDEO, :length][:, types[VIDEO] == 2]
    t = int(inputs["video_grid_thw"][0, 0])
    assert int(video[0].max() - video[0].min()) == t - 1
    assert int(video.max()) < int(positions[0, VIDEO, -K - 1])


def test_video_row_embeds_alone_as_in_the_mixed_batch_and_depends_on_its_frames(backbone, tiny_spec):
    processor = build_processor(tiny_spec)
    frames = _frames(2)
    encoder = LaMEEncoder(backbone, num_reason_tokens=K).eval()
    prompts = PromptProcessor(processor, max_text_length=16)
    with torch.no_grad():
        mixed = encoder(**_mixed(processor, frames)).embedding
        alone = encoder(**prompts([Side("Understand the content of the provided video.", "", video=frames)]))
        other = encoder(**prompts([Side("Understand the content of the provided video.", "", video=_frames(3))]))
        as_images = encoder(**prompts([Side("Understand the content of the provided video.", "", tuple(frames))]))
    assert torch.allclose(mixed[VIDEO], alone.embedding[0], atol=1e-4)
    assert not torch.allclose(alone.embedding, other.embedding, atol=1e-3)  # the frames reach the model
    assert not torch.allclose(alone.embedding, as_images.embedding, atol=1e-3)  # a video is not its frames as images


def test_cached_modes_continue_from_one_past_the_video_prompt(backbone, tiny_spec):
    processor = build_processor(tiny_spec)
    inputs = _mixed(processor, _frames(4))
    encoder = LaMEEncoder(backbone, num_reason_tokens=0)
    with torch.no_grad():
        _, seq = start_cached(encoder, inputs)
    positions = _positions(encoder, inputs)
    mask = inputs["attention_mask"].bool()
    for row in (VIDEO, IMAGE, TEXT):
        prompt = positions[:, row, : mask.shape[1]][:, mask[row]]
        assert int(seq.next_position[row]) == int(prompt.max()) + 1, row


def test_a_single_frame_and_an_odd_count_are_padded_in_time(tiny_spec):
    processor = build_processor(tiny_spec)
    prompts = PromptProcessor(processor, max_text_length=8)
    for n, t in ((1, 1), (3, 2)):
        inputs = prompts([Side("", "clip", video=_frames(5, n))])
        assert int(inputs["video_grid_thw"][0, 0]) == t
    with pytest.raises(ValueError, match="frames of one video differ in size"):
        prompts([Side("", "clip", video=[*_frames(6, 1, 28), *_frames(7, 1, 56)])])


@pytest.mark.xfail(
    strict=True,
    reason=(
        "transformers 5.24 Qwen2VLModel.get_rope_index advances text after a video by max(h, w) // merge only, "
        "not by the temporal extent as Qwen2-VL's original rule (largest position + 1) does: with more temporal "
        "patches than spatial rows, the text after the video reuses the video's temporal positions"
    ),
)
def test_text_after_a_long_low_resolution_video_follows_all_its_positions(backbone, tiny_spec):
    from transformers import Qwen2VLProcessor, Qwen2VLVideoProcessor

    base = build_processor(tiny_spec)
    small = Qwen2VLVideoProcessor(size={"shortest_edge": 56 * 56, "longest_edge": 56 * 56})
    processor = Qwen2VLProcessor(image_processor=base.image_processor, tokenizer=base.tokenizer, video_processor=small)
    inputs = PromptProcessor(processor, max_text_length=8)([Side("", "clip", video=_frames(8, 8, 56))])
    positions = _positions(LaMEEncoder(backbone, num_reason_tokens=K), inputs)[:, 0, : inputs["input_ids"].shape[1]]
    is_video = inputs["mm_token_type_ids"][0] == 2
    after = positions[:, int(is_video.nonzero().max()) + 1]  # <|vision_end|>
    assert int(after.min()) == int(positions[:, is_video].max()) + 1

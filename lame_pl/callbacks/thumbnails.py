"""Thumbnails of the images a Qwen-VL model saw, rebuilt from the processor's flattened patches.

The Qwen2-VL image processor (also used by Qwen2.5-VL and Qwen3-VL) resizes each image, cuts it
into ``patch × patch`` squares grouped ``merge × merge``, repeats each frame ``temporal`` times
and flattens them to ``(t·h·w, channels·temporal·patch·patch)`` rows, images one after another.
Undoing that layout gives back the resized, normalised image; no copy of the raw image has to
travel with the batch. The normalisation constants belong to the processor, not the model, so
each thumbnail is contrast-stretched to ``[0, 1]`` instead (one stretch for all channels, which
keeps colours close).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def images_from_patches(
    pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, patch: int, merge: int, temporal: int, channels: int = 3
) -> list[torch.Tensor]:
    """Each image of a processor batch as a ``(channels, H, W)`` float tensor in ``[0, 1]`` (first frame).

    Raises:
        ValueError: When the patches do not fit the grid and patch sizes given.
    """
    per_patch = channels * temporal * patch * patch
    if pixel_values.ndim != 2 or pixel_values.shape[1] != per_patch:
        raise ValueError(
            f"pixel_values of shape {tuple(pixel_values.shape)} do not hold patches of {channels}x{temporal}x{patch}x{patch}"
        )
    counts = [int(t * h * w) for t, h, w in image_grid_thw.tolist()]
    if sum(counts) != pixel_values.shape[0]:
        raise ValueError(
            f"image_grid_thw accounts for {sum(counts)} patches, pixel_values holds {pixel_values.shape[0]}"
        )
    images = []
    for rows, (t, h, w) in zip(pixel_values.split(counts), image_grid_thw.tolist(), strict=True):
        grid = rows.float().reshape(t, h // merge, w // merge, merge, merge, channels, temporal, patch, patch)
        frame = grid[0, ..., 0, :, :]  # (h/m, w/m, m, m, C, p, p): the first of the repeated frames
        image = frame.permute(4, 0, 2, 5, 1, 3, 6).reshape(channels, h * patch, w * patch)
        low, high = image.min(), image.max()
        images.append((image - low) / (high - low) if high > low else torch.full_like(image, 0.5))
    return images


def row_images(
    input_ids: torch.Tensor, image_token_id: int, image_grid_thw: torch.Tensor, merge: int
) -> list[int | None]:
    """For each row of a batch, the index of its first image, or ``None`` for a row without one.

    Images belong to rows in order; an image fills ``t·h·w / merge²`` image tokens of its row.
    """
    tokens_per_image = [int(t * h * w) // (merge * merge) for t, h, w in image_grid_thw.tolist()]
    counts = (input_ids == image_token_id).sum(1).tolist()
    firsts: list[int | None] = []
    next_image = 0
    for count in counts:
        firsts.append(next_image if count else None)
        while count > 0:
            if next_image >= len(tokens_per_image):
                raise ValueError("the batch has more image tokens than image_grid_thw describes")
            count -= tokens_per_image[next_image]
            next_image += 1
    return firsts


def side_thumbnails(inputs: dict[str, Any], vision_config: Any, image_token_id: int, size: int) -> torch.Tensor:
    """``(B, 3, size, size)`` thumbnails of one side of a batch; rows without an image get a grey tile."""
    batch = inputs["input_ids"].shape[0]
    out = torch.full((batch, 3, size, size), 0.5)
    if inputs.get("pixel_values") is None:
        return out
    merge = vision_config.spatial_merge_size
    grid = inputs["image_grid_thw"].cpu()
    images = images_from_patches(
        inputs["pixel_values"].cpu(),
        grid,
        vision_config.patch_size,
        merge,
        vision_config.temporal_patch_size,
        getattr(vision_config, "in_channels", 3),
    )
    for row, index in enumerate(row_images(inputs["input_ids"].cpu(), image_token_id, grid, merge)):
        if index is not None:
            image = images[index][:3]
            out[row] = F.interpolate(image[None], size=(size, size), mode="bilinear", antialias=True)[0].clamp(0, 1)
    return out

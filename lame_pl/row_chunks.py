"""Cutting a processor batch into chunks of rows, each one a processor batch in its own right.

A Qwen-VL processor batch is not row-aligned throughout: ``pixel_values`` holds every image's
patches end to end and ``image_grid_thw`` one row per image (likewise for videos), so a chunk of
rows must take exactly the patches and grids of its rows' images. The processor cannot re-cut a
batch it made, hence this module.
"""

from __future__ import annotations

from typing import Any

import torch

from lame_pl.prompt import TEXT_KEYS

# mm_token_type_ids values (transformers' Qwen-VL processors): 0 text, 1 image, 2 video.
_MEDIA = {
    1: ("image_grid_thw", ("pixel_values",), ("image_grid_thw",)),
    2: ("video_grid_thw", ("pixel_values_videos",), ("video_grid_thw", "second_per_grid_ts")),
}


def _row_media_counts(token_types: torch.Tensor, kind: int, grids: torch.Tensor, merge_size: int) -> list[int]:
    """How many images (or videos) each row holds, from its vision tokens and the items' grids."""
    per_item = (grids.prod(dim=-1) // (merge_size * merge_size)).tolist()
    per_row = (token_types == kind).sum(dim=1).tolist()
    counts, item = [], 0
    for row, tokens in enumerate(per_row):
        start = item
        while tokens > 0 and item < len(per_item):
            tokens -= per_item[item]
            item += 1
        if tokens != 0:
            raise ValueError(
                f"row {row}'s vision tokens do not match the grids of the batch's items in order "
                f"(spatial merge size {merge_size}); the batch cannot be cut into chunks"
            )
        counts.append(item - start)
    if item != len(per_item):
        raise ValueError(f"the batch has {len(per_item)} media items but its rows' tokens account for {item}")
    return counts


def split_rows(
    inputs: dict[str, Any], chunk_size: int, merge_size: int, max_chunks: int | None = None
) -> list[dict[str, Any]]:
    """``inputs`` cut into consecutive chunks of at most ``chunk_size`` rows.

    Each chunk keeps its rows' images and videos, and drops the padding columns that none of its
    rows needs (inputs are left-padded, so those are leading columns): a chunk of short rows
    costs what its rows cost.

    Args:
        inputs: One side of a batch: processor outputs (``lame_pl.prompt.PromptProcessor``).
        chunk_size: Most rows per chunk.
        merge_size: The vision tower's spatial merge size (patches per token along each side).
        max_chunks: Only the first this many chunks.

    Raises:
        ValueError: On a key this function does not know how to cut (so nothing is silently
            dropped or misaligned), or vision tokens that disagree with the grids.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    known = set(TEXT_KEYS)
    for _, values, grids in _MEDIA.values():
        known.update(values + grids)
    unknown = sorted(set(inputs) - known)
    if unknown:
        raise ValueError(f"cannot cut processor inputs {unknown} into chunks of rows")
    rows = inputs["input_ids"].shape[0]
    bounds = [(start, min(start + chunk_size, rows)) for start in range(0, rows, chunk_size)][:max_chunks]
    media: list[tuple[tuple[str, ...], tuple[str, ...], list[int], list[int]]] = []
    for kind, (grid_key, values, grids) in _MEDIA.items():
        if inputs.get(grid_key) is None:
            continue
        if inputs.get("mm_token_type_ids") is None:
            raise ValueError(f"inputs carry {grid_key} but no mm_token_type_ids: their rows cannot be told apart")
        counts = _row_media_counts(inputs["mm_token_type_ids"], kind, inputs[grid_key], merge_size)
        patches = inputs[grid_key].prod(dim=-1).tolist()
        media.append((values, grids, counts, patches))
    chunks = []
    for start, stop in bounds:
        mask = inputs["attention_mask"][start:stop]
        used = mask.any(dim=0).nonzero()
        first = int(used[0]) if used.numel() else 0
        chunk = {k: inputs[k][start:stop, first:] for k in TEXT_KEYS if inputs.get(k) is not None}
        for values, grids, counts, patches in media:
            item_from, item_to = sum(counts[:start]), sum(counts[:stop])
            patch_from, patch_to = sum(patches[:item_from]), sum(patches[:item_to])
            if item_to == item_from:
                continue  # no image (video) in these rows: the chunk is text-only for this kind
            for key in values:
                chunk[key] = inputs[key][patch_from:patch_to]
            for key in grids:
                if inputs.get(key) is not None:
                    chunk[key] = inputs[key][item_from:item_to]
        chunks.append(chunk)
    return chunks


def first_row(inputs: dict[str, Any], merge_size: int) -> dict[str, Any]:
    """The batch's first row alone, with its images and videos."""
    return split_rows(inputs, 1, merge_size, max_chunks=1)[0]

"""Synthetic scenes: coloured shapes on a 3x3 grid, with a plain-words caption and metadata.

A scene is 1-3 object groups; a group is ``count`` identical shapes (same colour and shape) in one
grid cell. Shapes are big and colours saturated so that a tiny model trained for minutes on a CPU
can tell them apart at 112x112. ``sample_scene`` draws the layout, ``render_scene`` draws the
pixels and ``caption_scene`` writes the sentence; ``make_scene`` does all three.
"""

from __future__ import annotations

import math
import random
from typing import Any

from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "orange": (255, 140, 0),
    "yellow": (255, 230, 0),
    "green": (20, 200, 40),
    "blue": (30, 80, 255),
    "purple": (170, 40, 220),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
# Row-major 3x3 grid; the phrase is how a caption names the cell.
POSITIONS: tuple[tuple[str, str], ...] = (
    ("top left", "at the top left"),
    ("top", "at the top"),
    ("top right", "at the top right"),
    ("left", "on the left"),
    ("center", "in the center"),
    ("right", "on the right"),
    ("bottom left", "at the bottom left"),
    ("bottom", "at the bottom"),
    ("bottom right", "at the bottom right"),
)
MAX_COUNT = 3
BACKGROUND = (40, 40, 40)
_COUNT_WORDS = {2: "two", 3: "three"}
# Offsets of each shape's centre inside a cell, in cell units, for 1, 2 and 3 shapes.
_CLUSTERS = {
    1: [(0.0, 0.0)],
    2: [(-0.24, 0.0), (0.24, 0.0)],
    3: [(-0.24, -0.2), (0.24, -0.2), (0.0, 0.24)],
}
# Shape half-size in cell units: a lone shape fills most of its cell, clustered ones share it.
_HALF_SIZE = {1: 0.36, 2: 0.21, 3: 0.2}


def sample_scene(rng: random.Random, group_weights: tuple[float, ...] = (0.2, 0.4, 0.4)) -> list[dict[str, Any]]:
    """Draw a scene layout: 1-3 groups at distinct cells, each with a distinct (colour, shape).

    Args:
        rng: Source of randomness (the caller seeds it, for reproducible data sets).
        group_weights: Relative probability of 1, 2, 3, ... groups.

    Returns:
        Groups sorted by cell (row-major), each ``{"color", "shape", "count", "cell"}``.
    """
    n_groups = rng.choices(range(1, len(group_weights) + 1), weights=group_weights)[0]
    cells = rng.sample(range(len(POSITIONS)), n_groups)
    kinds = rng.sample([(c, s) for c in COLORS for s in SHAPES], n_groups)
    groups = [
        {"color": color, "shape": shape, "count": rng.randint(1, MAX_COUNT), "cell": cell}
        for cell, (color, shape) in zip(cells, kinds, strict=True)
    ]
    # Sorting makes the caption a function of the scene, so equal captions mean equal scenes.
    return sorted(groups, key=lambda g: g["cell"])


def caption_scene(groups: list[dict[str, Any]]) -> str:
    """Describe a layout in plain words, e.g. ``two red circles at the top left and a blue square in the center``."""
    phrases = []
    for g in groups:
        if g["count"] == 1:
            article = "an" if g["color"][0] in "aeiou" else "a"
            noun = f"{article} {g['color']} {g['shape']}"
        else:
            noun = f"{_COUNT_WORDS[g['count']]} {g['color']} {g['shape']}s"
        phrases.append(f"{noun} {POSITIONS[g['cell']][1]}")
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple[int, int, int]
) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = r * 0.9  # a square of the same half-size looks bigger than the circle
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r * 1.1), (cx + r, cy), (cx, cy + r * 1.1), (cx - r, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")


def render_scene(
    groups: list[dict[str, Any]],
    image_size: int = 112,
    rng: random.Random | None = None,
    jitter: dict[int, tuple[float, float]] | None = None,
) -> tuple[Image.Image, list[dict[str, Any]]]:
    """Draw a layout as an RGB image.

    Args:
        groups: Layout from :func:`sample_scene`.
        image_size: Side of the square image in pixels.
        rng: Optional source of a small per-group jitter; ``None`` draws every group centred.
        jitter: Offsets per cell, in cell units, used instead of ``rng``: scenes drawn with the
            same offsets put an object in a given cell at the same pixels (contrast sets).

    Returns:
        The image and, per group, the pixel boxes ``[x0, y0, x1, y1]`` of its shapes.
    """
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cell = image_size / 3
    boxes = []
    for g in groups:
        row, col = divmod(g["cell"], 3)
        if jitter is not None:
            jx, jy = jitter.get(g["cell"], (0.0, 0.0))
        else:
            jx, jy = (rng.uniform(-0.06, 0.06), rng.uniform(-0.06, 0.06)) if rng is not None else (0.0, 0.0)
        r = _HALF_SIZE[g["count"]] * cell
        group_boxes = []
        for dx, dy in _CLUSTERS[g["count"]]:
            cx = (col + 0.5 + dx + jx) * cell
            cy = (row + 0.5 + dy + jy) * cell
            _draw_shape(draw, g["shape"], cx, cy, r, COLORS[g["color"]])
            group_boxes.append([math.floor(cx - r), math.floor(cy - r), math.ceil(cx + r), math.ceil(cy + r)])
        boxes.append(group_boxes)
    return image, boxes


def scene_metadata(groups: list[dict[str, Any]], boxes: list[list[list[int]]], image_size: int) -> dict[str, Any]:
    """JSON-ready description of a scene: its objects and the counts later tasks ask about."""
    objects = []
    by_color: dict[str, int] = {}
    by_shape: dict[str, int] = {}
    for g, group_boxes in zip(groups, boxes, strict=True):
        row, col = divmod(g["cell"], 3)
        objects.append(
            {
                "color": g["color"],
                "shape": g["shape"],
                "count": g["count"],
                "position": POSITIONS[g["cell"]][0],
                "row": row,
                "col": col,
                "boxes": group_boxes,
            }
        )
        by_color[g["color"]] = by_color.get(g["color"], 0) + g["count"]
        by_shape[g["shape"]] = by_shape.get(g["shape"], 0) + g["count"]
    return {
        "image_size": image_size,
        "objects": objects,
        "counts": {
            "total": sum(g["count"] for g in groups),
            "groups": len(groups),
            "by_color": by_color,
            "by_shape": by_shape,
        },
    }


def make_scene(rng: random.Random, image_size: int = 112) -> tuple[Image.Image, str, dict[str, Any]]:
    """Draw one random scene.

    Args:
        rng: Source of randomness; the same state gives the same scene.
        image_size: Side of the square image in pixels.

    Returns:
        ``(image, caption, metadata)``; metadata holds the objects (colour, shape, count,
        position, boxes) and counts by colour and by shape.
    """
    groups = sample_scene(rng)
    image, boxes = render_scene(groups, image_size, rng)
    return image, caption_scene(groups), scene_metadata(groups, boxes, image_size)


def cell_jitter(rng: random.Random) -> dict[int, tuple[float, float]]:
    """One small offset per grid cell (the range :func:`render_scene` draws from), for ``jitter``."""
    return {cell: (rng.uniform(-0.06, 0.06), rng.uniform(-0.06, 0.06)) for cell in range(len(POSITIONS))}

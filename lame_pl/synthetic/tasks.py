"""Compositional synthetic tasks: contrast groups of scenes whose statements differ in one composed property.

Each task draws a *group* of scenes that share their objects and differ only in the property the
task tests; each scene's statement is its positive and the other members' statements are its
hard negatives, so retrieval within a group has a known chance level, ``1 / group size``:

    caption   2 scenes: one object's colour changed (a plain caption; bag-of-attributes suffices)
    count     4 scenes: 1, 2, 3 and 4 shapes of one colour among other-coloured distractors
              ("three red shapes"); the answers are uniform by construction
    relation  2 scenes: two objects swapped between two columns ("the red circle is left of the
              blue square" vs "the blue square is left of the red circle": the same words)
    binding   2 scenes: two objects in fixed cells with their colours swapped ("a red circle and a
              blue square" vs "a blue circle and a red square": the same words)

Members of a group are drawn with the same per-cell jitter, so an object that stays in its cell
keeps its pixels. Groups are emitted in blocks of ``BLOCK`` samples (a count group, or two groups
of the other kinds), so a batch whose size is a multiple of ``BLOCK``, read in file order, holds
whole groups: training then sees the hard negatives in the batch.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from typing import Any

from PIL import Image

from lame_pl.synthetic import scenes

TASKS: tuple[str, ...] = ("caption", "count", "relation", "binding")
GROUP_SIZES: dict[str, int] = {"caption": 2, "count": 4, "relation": 2, "binding": 2}
BLOCK = 4
NUMBER_WORDS = ("one", "two", "three", "four")
# Redraws allowed per group before giving up on finding an unused one.
MAX_TRIES = 1000

Layout = list[dict[str, Any]]


def parse_tasks(text: str) -> tuple[str, ...]:
    """``"count,binding"`` -> ``("count", "binding")``.

    Raises:
        ValueError: For an empty list, an unknown task or a repeated one, naming it.
    """
    tasks = tuple(t.strip() for t in text.split(",") if t.strip())
    if not tasks:
        raise ValueError(f"no task named in {text!r}; choose from {', '.join(TASKS)}")
    for task in tasks:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"a task is named twice in {text!r}")
    return tasks


def _noun(color: str, shape: str) -> str:
    article = "an" if color[0] in "aeiou" else "a"
    return f"{article} {color} {shape}"


def _obj(color: str, shape: str, cell: int) -> dict[str, Any]:
    return {"color": color, "shape": shape, "count": 1, "cell": cell}


def _sorted(layout: Layout) -> Layout:
    return sorted(layout, key=lambda g: g["cell"])


def _two_objects(rng: random.Random) -> tuple[tuple[str, str], tuple[str, str]]:
    """Two objects with different colours and different shapes, so a swap changes both words' roles."""
    c1, c2 = rng.sample(list(scenes.COLORS), 2)
    s1, s2 = rng.sample(scenes.SHAPES, 2)
    return (c1, s1), (c2, s2)


def _caption_group(rng: random.Random) -> list[tuple[Layout, str, str]]:
    # A scene and the same scene with one object's colour changed to one the scene lacks.
    layout = scenes.sample_scene(rng)
    changed = rng.randrange(len(layout))
    unused = [c for c in scenes.COLORS if c not in {g["color"] for g in layout}]
    other = [dict(g) for g in layout]
    other[changed]["color"] = rng.choice(unused)
    return [(scene, scenes.caption_scene(scene), scene[changed]["color"]) for scene in (layout, other)]


def _count_group(rng: random.Random) -> list[tuple[Layout, str, str]]:
    color = rng.choice(list(scenes.COLORS))
    cells = rng.sample(range(len(scenes.POSITIONS)), len(NUMBER_WORDS) + 2)
    n_distractors = rng.randint(1, 2)
    others = [c for c in scenes.COLORS if c != color]
    distractors = [_obj(rng.choice(others), rng.choice(scenes.SHAPES), cell) for cell in cells[:n_distractors]]
    targets = [
        _obj(color, rng.choice(scenes.SHAPES), cell)
        for cell in cells[n_distractors : n_distractors + len(NUMBER_WORDS)]
    ]
    members = []
    for n, word in enumerate(NUMBER_WORDS, 1):
        text = f"{word} {color} shape" + ("s" if n > 1 else "")
        members.append((_sorted(distractors + targets[:n]), text, str(n)))
    return members


def _relation_group(rng: random.Random) -> list[tuple[Layout, str, str]]:
    (c1, s1), (c2, s2) = _two_objects(rng)
    while True:
        left, right = rng.sample(range(len(scenes.POSITIONS)), 2)
        if left % 3 != right % 3:
            break
    if left % 3 > right % 3:
        left, right = right, left
    a, b = f"{c1} {s1}", f"{c2} {s2}"
    return [
        (_sorted([_obj(c1, s1, left), _obj(c2, s2, right)]), f"the {a} is left of the {b}", a),
        (_sorted([_obj(c2, s2, left), _obj(c1, s1, right)]), f"the {b} is left of the {a}", b),
    ]


def _binding_group(rng: random.Random) -> list[tuple[Layout, str, str]]:
    (c1, s1), (c2, s2) = _two_objects(rng)
    if s2 < s1:  # the statement names the shapes in a fixed order, so word order carries no position
        (c1, s1), (c2, s2) = (c2, s2), (c1, s1)
    p1, p2 = rng.sample(range(len(scenes.POSITIONS)), 2)
    return [
        (_sorted([_obj(c1, s1, p1), _obj(c2, s2, p2)]), f"{_noun(c1, s1)} and {_noun(c2, s2)}", f"{c1} {s1}"),
        (_sorted([_obj(c2, s1, p1), _obj(c1, s2, p2)]), f"{_noun(c2, s1)} and {_noun(c1, s2)}", f"{c2} {s1}"),
    ]


_DRAW = {"caption": _caption_group, "count": _count_group, "relation": _relation_group, "binding": _binding_group}


def draw_group(kind: str, rng: random.Random) -> list[tuple[Layout, str, str]]:
    """One contrast group of ``kind``: per member ``(layout, statement, answer)``, in member order.

    Raises:
        ValueError: For an unknown kind.
    """
    if kind not in _DRAW:
        raise ValueError(f"unknown task {kind!r}; choose from {', '.join(TASKS)}")
    return _DRAW[kind](rng)


def block_kinds(n_samples: int, tasks: tuple[str, ...], rng: random.Random) -> list[str]:
    """The task of each ``BLOCK``-sample block of a split: as even as the count allows, in random order.

    Raises:
        ValueError: When ``n_samples`` is not a multiple of ``BLOCK``.
    """
    if n_samples % BLOCK:
        raise ValueError(f"{n_samples} samples is not a multiple of {BLOCK}: groups are written in blocks of {BLOCK}")
    kinds = [tasks[i % len(tasks)] for i in range(n_samples // BLOCK)]
    rng.shuffle(kinds)
    return kinds


def task_samples(
    n_samples: int, tasks: tuple[str, ...], rng: random.Random, used: set[str], image_size: int
) -> Iterator[tuple[str, Image.Image, str, dict[str, Any]]]:
    """``(key, image, statement, metadata)`` for ``n_samples`` samples, whole groups in blocks.

    The key is ``<kind>-<group>-<member>`` (e.g. ``count-000012-2``), so a sample's kind and group
    travel with it through any reader; the metadata adds ``kind``, ``group``, ``member``, ``answer``
    and ``candidates`` (the group's statements in member order) to the scene's objects and counts.

    Args:
        n_samples: Samples to yield; a multiple of ``BLOCK``.
        tasks: Which tasks to draw, evenly.
        rng: Source of randomness; the same state gives the same samples.
        used: Group signatures already taken (updated), so that splits share no group.
        image_size: Side of the square images in pixels.

    Raises:
        RuntimeError: When no unused group turns up after many redraws.
    """
    next_group = dict.fromkeys(TASKS, 0)
    for kind in block_kinds(n_samples, tasks, rng):
        for _ in range(BLOCK // GROUP_SIZES[kind]):
            for _ in range(MAX_TRIES):
                members = draw_group(kind, rng)
                signature = json.dumps([kind, [layout for layout, _, _ in members]])
                if signature not in used:
                    break
            else:
                raise RuntimeError(f"no unused {kind} group after {MAX_TRIES} draws; ask for fewer samples")
            used.add(signature)
            group = f"{kind}-{next_group[kind]:06d}"
            next_group[kind] += 1
            jitter = scenes.cell_jitter(rng)
            candidates = [text for _, text, _ in members]
            for member, (layout, text, answer) in enumerate(members):
                image, boxes = scenes.render_scene(layout, image_size, jitter=jitter)
                meta = scenes.scene_metadata(layout, boxes, image_size)
                meta.update(kind=kind, group=group, member=member, answer=answer, candidates=candidates)
                yield f"{group}-{member}", image, text, meta

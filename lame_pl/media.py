"""Video frames on disk: which files are frames, their order, and which of them a model sees.

A video reaches the model as a handful of frames sampled evenly from a folder of extracted
frames, the way VLM2Vec-V2 samples them for training and for MMEB-v2's video tasks (its
``process_video_frames``): frames in natural order (``frame_2`` before ``frame_10``), then
``num_frames`` indices spread evenly over them, rounded down; a video with fewer frames than
that keeps all of them. Training shards and the evaluators both sample here, so a video is cut
the same way on both sides.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np

# The image types a shard can hold (lame_pl.data.shard_writer.IMAGE_EXTENSIONS), so that a frame
# the evaluator reads is one training can store.
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
# The PIL formats an image may be decoded from (``Image.open(fp, formats=IMAGE_FORMATS)``), for
# shards and for the evaluators: PIL would otherwise try each of its plugins, and some reach far
# (EPS runs Ghostscript where it is installed).
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
# VLM2Vec-V2's frames per video, in training (train_alltasks.yaml) and in MMEB-v2 (video.yaml).
DEFAULT_NUM_FRAMES = 8

T = TypeVar("T")


def natural_key(name: str) -> list[int | str]:
    """Sort key that orders the digit runs of a name by value: ``f2`` < ``f10``."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def list_frames(folder: str | Path) -> list[Path]:
    """The frame images of ``folder`` in natural order (hidden files and other files left out).

    Raises:
        FileNotFoundError: When ``folder`` is not a directory.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"frame folder {str(folder)!r} is not a directory")
    frames = [
        p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in FRAME_SUFFIXES
    ]
    return sorted(frames, key=lambda p: natural_key(p.name))


def sample_frames(frames: Sequence[T], num_frames: int = DEFAULT_NUM_FRAMES) -> list[T]:
    """``num_frames`` of ``frames`` at evenly spread indices (first and last included), in order.

    The indices are ``numpy.linspace(0, n - 1, num_frames)`` truncated to integers, exactly as
    VLM2Vec-V2 computes them (float rounding included, which sometimes differs from exact
    integer division); with fewer than ``num_frames`` frames every frame is kept.

    Raises:
        ValueError: When ``num_frames`` < 1.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    n = len(frames)
    if n <= num_frames:
        return list(frames)
    return [frames[i] for i in np.linspace(0, n - 1, num_frames, dtype=int).tolist()]

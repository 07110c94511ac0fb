"""Helpers for the evaluator tests: images that carry a word, and an encoder that embeds words."""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from lame_pl.evaluation.task import Item

VOCAB = ("cat", "dog", "bird", "fish", "red", "blue")


def word_png(word: str, path: Path | None = None) -> bytes:
    """A small PNG whose metadata names ``word`` (what the fake encoder "sees"); written to ``path`` if given."""
    info = PngInfo()
    info.add_text("word", word)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (40, 80, 120)).save(buffer, format="PNG", pnginfo=info)
    data = buffer.getvalue()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return data


class WordEncoder:
    """Embeds an item as the normalised count of vocabulary words in its text and its images' and frames' words.

    Instructions are ignored, so scores depend only on the words a test puts in: exact answers.
    """

    def __init__(self, fingerprint: str = "words-v1") -> None:
        self.fingerprint = fingerprint
        self.encoded: list[Item] = []

    def encode(self, items: Sequence[Item]) -> torch.Tensor:
        self.encoded.extend(items)
        out = torch.zeros(len(items), len(VOCAB))
        for row, item in enumerate(items):
            words = item.text.lower().split()
            for image in (*item.images, *item.video):
                with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as opened:
                    words.append(opened.text.get("word", ""))
            for word in words:
                if word in VOCAB:
                    out[row, VOCAB.index(word)] += 1
        return torch.nn.functional.normalize(out, dim=-1)


def one_line_error(run: Callable[..., dict], root: Path, out: Path, *extra: str) -> str:
    """The message an evaluator run stops with; it must be a single ``error: ...`` line."""
    with pytest.raises(SystemExit) as error:
        run(root, out, *extra)
    message = str(error.value.code)
    assert message.startswith("error: ") and "\n" not in message
    return message

"""Embedding benchmark items with a trained checkpoint, batched, through an on-disk cache."""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch
from PIL import Image

from lame_pl.checkpoint import FALLBACK_MAX_TEXT_LENGTH, read_checkpoint
from lame_pl.evaluation.tables import EvalDataError
from lame_pl.evaluation.task import ImageRef, Item
from lame_pl.media import IMAGE_FORMATS
from lame_pl.prompt import LAYOUT_VERSION, Side


class ItemEncoder(Protocol):
    """Anything that turns items into L2-normalised embeddings.

    ``fingerprint`` identifies the model and every setting the embeddings depend on; the cache
    keeps embeddings of different fingerprints apart.
    """

    fingerprint: str

    def encode(self, items: Sequence[Item]) -> torch.Tensor:
        """``(len(items), D)`` float32 embeddings, in order."""
        ...


def load_image(image: ImageRef) -> Image.Image:
    """An RGB PIL image from a path or encoded bytes; a clear error when it does not decode."""
    try:
        # Only the allow-listed formats: PIL's others include EPS, which runs Ghostscript.
        with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image, formats=IMAGE_FORMATS) as opened:
            return opened.convert("RGB")
    except (OSError, ValueError) as error:
        what = "inline image bytes" if isinstance(image, bytes) else f"image {image}"
        raise EvalDataError(f"{what} could not be decoded ({error})") from None


def trained_max_text_length(path: Path) -> int:
    """The ``data.max_text_length`` of the run that wrote the checkpoint at ``path``, said on stdout.

    Read memory-mapped, so that the weights are not loaded a second time.
    """
    value = read_checkpoint(path).max_text_length
    if value is not None:
        print(f"max_text_length: {value} (the training run's data.max_text_length)")
        return value
    print(f"max_text_length: {FALLBACK_MAX_TEXT_LENGTH} (the checkpoint names none; set --max-text-length)")
    return FALLBACK_MAX_TEXT_LENGTH


class CheckpointEncoder:
    """A ``LaMEModule`` checkpoint written by the CLI, encoding items as the training collator does.

    A query or candidate goes through ``lame_pl.prompt.PromptProcessor``, the code the training
    collators call (media, instruction, text; a video through the processor's video input),
    left-padded, and is embedded at [EMBED] with the encode mode the checkpoint was trained with.
    The model is loaded by ``lame_pl.LaMEEmbedder.from_checkpoint`` (adapters merged, no decoder).

    Args:
        checkpoint: Path of the ``.ckpt`` file.
        device: Torch device to run on.
        batch_size: Items per forward pass.
        max_text_length: Most tokens of each instruction and each text (cut separately); ``None``
            takes the training run's ``data.max_text_length`` from the checkpoint, so that texts
            are cut as in training (``FALLBACK_MAX_TEXT_LENGTH`` when the checkpoint has none).
    """

    def __init__(
        self, checkpoint: str | Path, device: str = "cpu", batch_size: int = 16, max_text_length: int | None = None
    ):
        from lame_pl.embedder import LaMEEmbedder

        path = Path(checkpoint)
        if not path.is_file():
            raise EvalDataError(f"missing checkpoint file {path}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_text_length is None:
            max_text_length = trained_max_text_length(path)
        self.embedder = LaMEEmbedder.from_checkpoint(path, device=device, max_text_length=max_text_length)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.max_text_length = max_text_length
        self.prompts = self.embedder.prompts
        stat = path.stat()
        # The prompt layout is part of the identity: embeddings cached under another are stale.
        identity = (
            f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:max_text_length={max_text_length}"
            f":layout={LAYOUT_VERSION}"
        )
        self.fingerprint = hashlib.sha256(identity.encode()).hexdigest()

    def inputs(self, items: Sequence[Item]) -> dict[str, torch.Tensor]:
        """The model inputs of ``items`` (one batch, on the CPU), as the training collator builds them."""
        sides = [item_side(item) for item in items]
        try:
            return self.prompts(sides)
        except ValueError as error:  # a record the prompt cannot hold: one line, as for any bad record
            raise EvalDataError(str(error)) from None

    def encode(self, items: Sequence[Item]) -> torch.Tensor:
        """Embeddings of ``items`` in batches of ``batch_size``."""
        out = []
        for start in range(0, len(items), self.batch_size):
            out.append(self.embedder.embed(self.inputs(items[start : start + self.batch_size])))
        return torch.cat(out)


def item_side(item: Item) -> Side:
    """``item`` with its images and frames decoded, ready for ``PromptProcessor``."""
    video = tuple(load_image(frame) for frame in item.video) or None
    if video and len({frame.size for frame in video}) > 1:
        where = "inline frames" if isinstance(item.video[0], bytes) else f"frames {item.video[0]} ..."
        raise EvalDataError(f"video {where}: frames differ in size ({sorted({f.size for f in video})})")
    return Side(item.instruction, item.text, tuple(load_image(image) for image in item.images), video)


class EmbeddingCache:
    """Embeddings on disk, one file per (model fingerprint, task), keyed by each item's digest.

    A re-run with the same checkpoint and records finds every key and encodes nothing; a new
    checkpoint (another fingerprint) or a changed record (another digest) is encoded afresh.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, fingerprint: str, task: str) -> Path:
        """Where the embeddings of ``task`` under model ``fingerprint`` live."""
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", task)
        return self.root / fingerprint[:24] / f"{safe}.pt"

    def load(self, fingerprint: str, task: str) -> dict[str, torch.Tensor]:
        """The stored ``{item key: embedding}`` (empty when there is none)."""
        path = self.path(fingerprint, task)
        if not path.is_file():
            return {}
        stored = torch.load(path, map_location="cpu", weights_only=True)
        return dict(zip(stored["keys"], stored["embeddings"], strict=True))

    def save(self, fingerprint: str, task: str, embeddings: dict[str, torch.Tensor]) -> None:
        """Writes ``embeddings`` atomically (a temporary file, then a rename)."""
        path = self.path(fingerprint, task)
        path.parent.mkdir(parents=True, exist_ok=True)
        keys = list(embeddings)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        torch.save({"keys": keys, "embeddings": torch.stack([embeddings[k] for k in keys])}, tmp)
        tmp.replace(path)


def embed_items(
    items: Sequence[Item], encoder: ItemEncoder, cache: EmbeddingCache | None = None, task: str = ""
) -> tuple[torch.Tensor, int]:
    """``(len(items), D)`` embeddings and how many items had to be encoded.

    Identical items are encoded once, and items found in the cache not at all.
    """
    keys = [item.key() for item in items]
    if not keys:
        raise ValueError("no item to embed")
    known = cache.load(encoder.fingerprint, task) if cache is not None else {}
    todo: dict[str, Item] = {}
    for key, item in zip(keys, items, strict=True):
        if key not in known and key not in todo:
            todo[key] = item
    if todo:
        fresh = encoder.encode(list(todo.values()))
        known.update(zip(todo, fresh, strict=True))
        if cache is not None:
            cache.save(encoder.fingerprint, task, known)
    return torch.stack([known[key] for key in keys]), len(todo)

"""The CLIP anchor as an ``ItemEncoder``: a ``CLIPAnchor`` checkpoint embedding benchmark items.

An item's images (a video's frames, averaged) go through the vision tower and its text through
the text tower; an item with both is their normalised sum, as ``CLIPAnchor.encode`` fuses a
side. Instructions are not embedded: a dual encoder is not instruction-tuned, and the anchor
trains without them. An item with neither text nor image embeds its instruction.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lame_pl.clip_anchor import ENCODER_KIND, ENCODER_KIND_KEY, fuse
from lame_pl.evaluation.encode import load_image
from lame_pl.evaluation.tables import EvalDataError
from lame_pl.evaluation.task import Item

CLIP_CLASS_PATH = "lame_pl.clip_anchor.CLIPAnchor"
# Bumped when the way an item becomes CLIP inputs changes: cached embeddings of another are stale.
CLIP_LAYOUT_VERSION = 1


def is_clip_checkpoint(path: str | Path) -> bool:
    """Whether the checkpoint at ``path`` holds a ``CLIPAnchor`` (its stored kind or class path).

    Read memory-mapped, so that the weights are not loaded a second time; a missing file is not one.
    """
    if not Path(path).is_file():
        return False
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if checkpoint.get(ENCODER_KIND_KEY) == ENCODER_KIND:
        return True
    return (checkpoint.get("hyper_parameters") or {}).get("_class_path") == CLIP_CLASS_PATH


class CLIPEncoder:
    """A ``CLIPAnchor`` checkpoint (or module) embedding ``Item``s.

    Args:
        checkpoint: Path of the ``.ckpt`` file written by ``lightning fit``.
        device: Torch device to run on.
        batch_size: Items per forward pass of each tower.
        module: An already built ``CLIPAnchor`` instead of ``checkpoint`` (benchmarks, tests).
    """

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        device: str = "cpu",
        batch_size: int = 16,
        module: torch.nn.Module | None = None,
    ) -> None:
        from lame_pl.clip_anchor import CLIPAnchor
        from lame_pl.datamodules.clip import CLIPProcessor

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if module is None:
            if checkpoint is None:
                raise ValueError("CLIPEncoder needs a checkpoint or a module")
            path = Path(checkpoint)
            if not path.is_file():
                raise EvalDataError(f"missing checkpoint file {path}")
            # weights_only: a user-given file must not run code.
            module = CLIPAnchor.load_from_checkpoint(str(path), map_location=device, weights_only=True)
            stat = path.stat()
            identity = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        else:
            identity = f"module:{id(module)}"
        self.device = torch.device(device)
        self.module = module.to(self.device).eval()
        self.processor = CLIPProcessor(self.module.spec)
        self.batch_size = batch_size
        self.fingerprint = hashlib.sha256(f"clip:{identity}:layout={CLIP_LAYOUT_VERSION}".encode()).hexdigest()

    def _images(self, items: Sequence[Item]) -> dict[int, torch.Tensor]:
        """Each item's visual embedding (its images' and frames' mean, normalised), by row."""
        refs = [(row, ref) for row, item in enumerate(items) for ref in (*item.images, *item.video)]
        if not refs:
            return {}
        chunks = []
        for start in range(0, len(refs), self.batch_size):
            pixels = self.processor.images([load_image(ref) for _, ref in refs[start : start + self.batch_size]])
            chunks.append(self.module.clip.encode_image(pixels.to(self.device), normalize=True).float().cpu())
        embeddings = torch.cat(chunks)
        rows = torch.tensor([row for row, _ in refs])
        return {row: F.normalize(embeddings[rows == row].mean(0), dim=-1) for row in rows.unique().tolist()}

    def _texts(self, items: Sequence[Item]) -> dict[int, torch.Tensor]:
        """Each item's text embedding, by row; an item with no text and no media embeds its instruction."""
        texts = [
            (row, item.text or ("" if item.images or item.video else item.instruction))
            for row, item in enumerate(items)
        ]
        texts = [(row, text) for row, text in texts if text.strip()]
        out: dict[int, torch.Tensor] = {}
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start : start + self.batch_size]
            tokens = self.processor.texts([text for _, text in chunk]).to(self.device)
            embeddings = self.module.clip.encode_text(tokens, normalize=True).float().cpu()
            out.update({row: embedding for (row, _), embedding in zip(chunk, embeddings, strict=True)})
        return out

    @torch.inference_mode()
    def embed(
        self,
        texts: Sequence[str] | None = None,
        images: Sequence[Any] | None = None,
        instructions: str | Sequence[str] | None = None,
        batch_size: int | None = None,
        device: str | torch.device | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """``(N, D)`` L2-normalised embeddings of rows given as texts, images (PIL or paths) or both.

        Takes rows as ``LaMEEmbedder.encode`` does: when both are given, row ``i`` is ``texts[i]``
        with ``images[i]`` (either may be None), fused as ``encode`` fuses an item. A dual encoder
        embeds no instruction: a non-empty one is refused rather than dropped.

        Args:
            texts: One string a row, or ``None``.
            images: One PIL image or path a row (``None`` for none), or ``None``.
            instructions: Must be empty (accepted for ``LaMEEmbedder.encode``'s signature).
            batch_size: Rows per forward pass; ``None`` is the encoder's.
            device: Move the model there first; ``None`` stays where it is.
            progress: Show a progress bar.
        """
        if texts is None and images is None:
            raise ValueError("embed needs texts, images or both")
        given = [instructions] if isinstance(instructions, str) else list(instructions or [])
        if any(given):
            raise ValueError(
                "embed: the CLIP anchor is a dual encoder and embeds no instruction; leave instructions empty"
            )
        if device is not None:
            self.device = torch.device(device)
            self.module.to(self.device)
        step = batch_size or self.batch_size
        if step < 1:
            raise ValueError(f"embed: batch_size must be >= 1, got {step}")
        rows = len(texts) if texts is not None else len(images or [])
        if texts is not None and images is not None and len(images) != rows:
            raise ValueError(f"embed: {len(texts)} texts but {len(images)} images; give one of each per row")
        parts: list[list[torch.Tensor | None]] = [[None, None] for _ in range(rows)]
        starts = range(0, rows, step)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="embed", unit="batch")
        for start in starts:
            stop = min(rows, start + step)
            pictures = [(i, images[i]) for i in range(start, stop) if images is not None and images[i] is not None]
            if pictures:
                pixels = self.processor.images([_pil(image) for _, image in pictures]).to(self.device)
                for (i, _), row in zip(pictures, self.module.clip.encode_image(pixels, normalize=True), strict=True):
                    parts[i][0] = row.float().cpu()
            words = [(i, texts[i]) for i in range(start, stop) if texts is not None and texts[i]]
            if words:
                tokens = self.processor.texts([text for _, text in words]).to(self.device)
                for (i, _), row in zip(words, self.module.clip.encode_text(tokens, normalize=True), strict=True):
                    parts[i][1] = row.float().cpu()
        out = []
        for i, row in enumerate(parts):
            present = [part for part in row if part is not None]
            if not present:
                raise ValueError(f"embed: row {i} has neither a text nor an image")
            out.append(fuse(present))
        return torch.stack(out)

    @torch.inference_mode()
    def encode(self, items: Sequence[Item]) -> torch.Tensor:
        """``(len(items), D)`` float32 L2-normalised embeddings, in order."""
        images, texts = self._images(items), self._texts(items)
        out = []
        for row, item in enumerate(items):
            parts = [part[row] for part in (images, texts) if row in part]
            if not parts:
                raise EvalDataError(f"item {item.key()[:12]} has no text, image, video or instruction to embed")
            out.append(fuse(parts))
        return torch.stack(out)


def _pil(image: Any) -> Any:
    """A PIL image as it is; a path or bytes decoded (``load_image``)."""
    return image if hasattr(image, "convert") else load_image(image)

"""A user's own corpus for ``lightning predict``: a folder of images or a file of text lines.

No captions are needed: each item is embedded alone, one side per corpus, through the training
prompt layout (``lame_pl.prompt``). An image is laid out as a training query (the image, then
``instruction`` when one is given, else none) and written as the ``query`` side; a text line as
a training target (a caption, after ``instruction`` when given) and written as ``target``.

- **Images**: every file under the folder, recursively, whose extension is one a shard can hold
  (``lame_pl.data.shard_writer.IMAGE_EXTENSIONS``; hidden files and folders left out), in sorted
  order of its path relative to the folder. Key and text: that relative path (``a/cat.jpg``).
  An image that cannot be read or decoded is skipped and counted (``batch["skipped"]`` by
  reason, ``batch["skipped_keys"]``), never a crash mid-corpus.
- **Texts**: one text per line (UTF-8, surrounding spaces stripped); blank lines are skipped and
  counted (``corpus_info``). Key: ``line{N}``, N the 1-based line number; text: the line.

The dataset is map-style, so a rerun can leave out the items already written
(``skip_predicted``, called by ``callbacks.EmbeddingWriter(resume=True)``).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import torch.utils.data
from torch.utils.data import DataLoader

from lame_pl.backbone import BackboneSpec, build_processor
from lame_pl.data.decoding import open_image
from lame_pl.data.shard_writer import IMAGE_EXTENSIONS, image_extension, read_image
from lame_pl.prompt import VISION_TOKENS, PromptProcessor, Side

FALLBACK_MAX_TEXT_LENGTH = 64  # the data modules' default, when no checkpoint names one


def list_images(folder: Path) -> list[str]:
    """Relative POSIX paths of the image files under ``folder``, recursively, sorted; hidden ones left out."""
    found = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        if image_extension(path.name) is not None:
            found.append(relative.as_posix())
    return sorted(found)


def read_lines(path: Path) -> tuple[list[tuple[int, str]], int]:
    """The non-blank lines of a UTF-8 text file as ``(line number, stripped text)``, and the blank count.

    Raises:
        ValueError: When the file is not UTF-8 or a line holds a vision special token (naming
            the file and line).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"data.texts {path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    lines, blank = [], 0
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            blank += 1
            continue
        token = next((t for t in VISION_TOKENS if t in line), None)
        if token is not None:
            raise ValueError(f"data.texts {path}:{number}: holds the special token {token}; strip it")
        lines.append((number, line))
    return lines, blank


class _Items(torch.utils.data.Dataset):
    """The corpus's items by index: an image (decoded here, in the loader's worker) or a line."""

    def __init__(self, root: Path | None, keys: list[str], texts: list[str], max_image_pixels: int) -> None:
        self.root, self.keys, self.texts = root, keys, texts
        self.max_image_pixels = max_image_pixels

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item: dict[str, Any] = {"key": self.keys[index], "text": self.texts[index], "image": None, "reason": None}
        if self.root is None:
            return item
        data, reason = read_image(self.root / self.keys[index])
        if data is not None:
            item["image"], reason, _ = open_image(data, image_extension(self.keys[index]) or "", self.max_image_pixels)
        item["reason"] = reason or None
        return item


class CorpusCollator:
    """Items to a predict batch of one side: ``{"keys", "texts", "query"|"target", "skipped", "skipped_keys"}``.

    Unreadable images are left out of the side and reported in ``skipped`` (``{reason: count}``,
    as the shard pipelines report theirs) and ``skipped_keys``. A batch with no readable item
    holds no side.
    """

    def __init__(self, processor: Any, corpus: str, instruction: str, max_text_length: int) -> None:
        self.prompts = PromptProcessor(processor, max_text_length)
        self.corpus = corpus
        self.instruction = instruction

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """Collate one batch of items."""
        good = [i for i in items if i["reason"] is None]
        bad = [i for i in items if i["reason"] is not None]
        batch: dict[str, Any] = {
            "keys": [i["key"] for i in good],
            "texts": [i["text"] for i in good],
            "skipped": dict(Counter(i["reason"] for i in bad)),
            "skipped_keys": [i["key"] for i in bad],
        }
        if good and self.corpus == "images":
            batch["query"] = self.prompts([Side(self.instruction, "", (i["image"],)) for i in good])
        elif good:
            batch["target"] = self.prompts([Side(self.instruction, i["text"]) for i in good])
        return batch


class CorpusDataModule(L.LightningDataModule):
    """A folder of images or a text file of lines, to embed with ``lightning predict``.

    Give exactly one of ``images`` and ``texts``. Layout and keys: see the module docstring.

    Args:
        backbone: The backbone spec (linked from the model by the CLI); its processor is the
            training one.
        images: A folder of images, searched recursively.
        texts: A UTF-8 text file, one text per line.
        batch_size: Items per predict batch.
        num_workers: DataLoader worker processes (images are decoded there); 0 loads in the
            main process.
        instruction: Instruction of every item (an image's query instruction, a text's target
            instruction); "" for none. ``None``: with ``lightning predict --ckpt_path``, the
            training run's (its query instruction for images, its target one for texts: the
            layout the model was trained on; said at start), else none.
        max_text_length: Most tokens of the instruction and of each line (cut separately);
            ``None``: the training run's ``data.max_text_length`` with ``--ckpt_path``, else 64.
        max_image_pixels: Images with more pixels are skipped as ``image_too_large``.

    Raises:
        ValueError: When both or neither of ``images`` and ``texts`` are given, the path is
            missing, or the corpus holds no item (the message names the path).
    """

    def __init__(
        self,
        backbone: BackboneSpec,
        images: str | None = None,
        texts: str | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        instruction: str | None = None,
        max_text_length: int | None = None,
        max_image_pixels: int = 64_000_000,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if max_text_length is None:  # the CLI sets the checkpoint's (lame_pl.cli) when predicting with one
            max_text_length = FALLBACK_MAX_TEXT_LENGTH
        if (images is None) == (texts is None):
            raise ValueError(
                "give data.images=FOLDER or data.texts=FILE"
                if images is None
                else f"give data.images or data.texts, not both (got {images} and {texts})"
            )
        for key, value, low in (
            ("batch_size", batch_size, 1),
            ("num_workers", num_workers, 0),
            ("max_text_length", max_text_length, 1),
            ("max_image_pixels", max_image_pixels, 1),
        ):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"data.{key} must be an integer >= {low}, got {value!r}")
        self.batch_size, self.num_workers = batch_size, num_workers
        self.instruction = instruction or ""
        self.blank_lines = 0
        if images is not None:
            self.corpus, self.source = "images", Path(images)
            if not self.source.is_dir():
                raise ValueError(f"data.images {self.source}: no such folder")
            keys = list_images(self.source)
            if not keys:
                raise ValueError(f"data.images {self.source}: holds no {'/'.join(IMAGE_EXTENSIONS)} image")
            self.items = _Items(self.source, keys, keys, max_image_pixels)
        else:
            self.corpus, self.source = "texts", Path(str(texts))
            if not self.source.is_file():
                raise ValueError(f"data.texts {self.source}: no such file")
            lines, self.blank_lines = read_lines(self.source)
            if not lines:
                raise ValueError(f"data.texts {self.source}: holds no text ({self.blank_lines} blank lines)")
            self.items = _Items(None, [f"line{n}" for n, _ in lines], [t for _, t in lines], max_image_pixels)
        self.pending = list(range(len(self.items)))
        self.collator = CorpusCollator(build_processor(backbone), self.corpus, self.instruction, max_text_length)

    @property
    def corpus_info(self) -> dict[str, Any]:
        """What the embeddings writer records: corpus kind, source, instruction, item and blank counts."""
        # Absolute, so that a resumed run from another working directory sees the same corpus.
        return {
            "corpus": self.corpus,
            "source": str(self.source.resolve()),
            "instruction": self.instruction,
            "items": len(self.items),
            "blank_lines": self.blank_lines,
            "content": self.content_fingerprint(),
            "max_text_length": self.collator.prompts.max_text_length,
        }

    def content_fingerprint(self) -> str:
        """A digest of what the corpus holds now (the text file's bytes; each image's path, size and
        modification time), so that a resumed run does not keep rows of files that changed since."""
        digest = hashlib.sha256()
        if self.corpus == "texts":
            digest.update(self.source.read_bytes())
        else:
            for key in self.items.keys:
                stat = (self.source / key).stat()
                digest.update(f"{key}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()[:32]

    def skip_predicted(self, done: set[str]) -> int:
        """Leaves out of the predict loader the items whose key is in ``done``; returns how many.

        ``callbacks.EmbeddingWriter(resume=True)`` calls it with the keys (written and skipped)
        of the shards already in its folder, before the loader is built.
        """
        self.pending = [i for i, key in enumerate(self.items.keys) if key not in done]
        return len(self.items) - len(self.pending)

    def predict_dataloader(self) -> DataLoader:
        """The pending items in corpus order, ``batch_size`` a batch (the last one may be smaller).

        Raises:
            ValueError: When fewer items are left to embed than there are ranks (Lightning's
                predict sampler gives every rank at least one, and would stop on a bare assert).
        """
        ranks = getattr(self.trainer, "world_size", 1) if self.trainer is not None else 1
        if 0 < len(self.pending) < ranks:
            raise ValueError(
                f"data: {len(self.pending)} item(s) of {self.source} left to embed, fewer than the {ranks} ranks "
                f"(each rank needs one): run on {len(self.pending)} device(s) or one process"
            )
        return DataLoader(
            torch.utils.data.Subset(self.items, self.pending),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=self.collator,
        )

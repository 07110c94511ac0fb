"""The image-text format: an image and its caption (img2dataset layout).

Shard layout, one sample per pair (written by ``tools/make_shards.py`` ``synthetic``, ``folder``
and ``manifest`` with ``image``/``text`` rows, through ``pair_sample``):

    KEY.<ext>   the image's bytes, copied as they are; ext is jpg, jpeg, png or webp (lower-cased
                from the source file name; ``IMAGE_EXTENSIONS``, a reader takes the first present)
    KEY.txt     the caption, UTF-8, surrounding whitespace stripped
    KEY.json    provenance, free-form: ``{"source": <image path relative to --src or the image
                root>}`` plus, for manifest rows, the row's other columns

This module holds the format's writer (``pair_sample``, ``folder_samples``), its decode stage
(``DecodePairs``: raw tar samples to ``{"key", "image", "text"}``) and its collator
(``PairCollator``: decoded pairs to model inputs). ``lame_pl.datamodules.ImageTextDataModule``
streams it.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

from lame_pl.data.collate import ProcessorCollator
from lame_pl.data.decoding import DecodeStage, open_image, vision_tokens
from lame_pl.data.shard_writer import IMAGE_EXTENSIONS, MAX_KEY_LENGTH, image_extension, read_image
from lame_pl.data.skips import Skips
from lame_pl.data.text import caption_text

# --------------------------------------------------------------------------------- writing


def pair_sample(key: str, ext: str, image: bytes, caption: str, meta: dict[str, Any]) -> dict[str, Any]:
    """A sample of this format for ``lame_pl.data.shard_writer.write_split``.

    Args:
        key: The sample's key (unique within a split, no dot).
        ext: The image's extension, one of ``IMAGE_EXTENSIONS``.
        image: The encoded image's bytes.
        caption: The caption, already stripped.
        meta: Provenance for ``KEY.json``.
    """
    return {"__key__": key, ext: image, "txt": caption, "json": meta}


def safe_key(relative: str) -> str:
    """A WebDataset key from a relative path without extension: ``a/b/cat 1`` -> ``a__b__cat_1``.

    Only ``[A-Za-z0-9_-]`` remain (a dot would split the key, a slash would make a folder); a
    long path is cut and ends with a hash of the whole, so distinct long paths stay distinct.
    """
    parts = [re.sub(r"[^A-Za-z0-9_-]+", "_", part) for part in relative.split("/")]
    key = "__".join(p for p in parts if p) or "x"
    if len(key) > MAX_KEY_LENGTH:
        key = key[: MAX_KEY_LENGTH - 9] + "-" + hashlib.sha1(relative.encode()).hexdigest()[:8]
    return key


def _unique_key(relative: str, taken: set[str]) -> str:
    key = safe_key(relative)
    if key in taken:  # e.g. "a b/c" and "a_b/c"; the hash keeps the key stable across runs
        key = key[: MAX_KEY_LENGTH - 9] + "-" + hashlib.sha1(relative.encode()).hexdigest()[:8]
    base, n = key, 1
    while key in taken:
        key, n = f"{base}-{n}", n + 1
    taken.add(key)
    return key


def _read_caption(path: Path) -> tuple[str | None, str | None]:
    """The stripped caption, or ``(None, reason)`` when it is missing, unreadable, not UTF-8 or empty."""
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        return None, "missing_caption"
    except OSError:
        return None, "unreadable_caption"
    except UnicodeDecodeError:
        return None, "caption_not_utf8"
    text = text.strip()
    return (text, None) if text else (None, "empty_caption")


def folder_images(src: Path) -> Iterator[tuple[str, str, Path]]:
    """``(relative path, extension, path)`` of every image under ``src``, in sorted walk order."""
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames.sort()  # os.walk's order is the file system's; sorting makes runs reproducible
        for name in sorted(filenames):
            ext = image_extension(name)
            if ext is None or name.startswith("."):
                continue
            image_path = Path(dirpath) / name
            yield image_path.relative_to(src).as_posix(), ext, image_path


def split_of(stem: str, val_fraction: float, test_fraction: float) -> str:
    """The split of an image, from a hash of its path relative to ``--src`` without extension.

    The hash maps the path to a number in [0, 1): below ``test_fraction`` is test, below
    ``test_fraction + val_fraction`` is val, the rest train. It depends on nothing but the path,
    so a rerun splits the same way, adding images never moves old ones, and raising
    ``val_fraction`` leaves the test split as it was. Images that share a caption file
    (``cat.jpg`` and ``cat.png`` with ``cat.txt``) land in the same split.
    """
    # The first 8 bytes of SHA-1 as an integer over 2**64: uniform, and stable across Python
    # versions and machines (the built-in hash() is salted per process).
    u = int.from_bytes(hashlib.sha1(stem.encode()).digest()[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    return "val" if u < test_fraction + val_fraction else "train"


def folder_samples(src: Path, skips: Skips, keep: Callable[[str], bool] | None = None) -> Iterator[dict[str, Any]]:
    """Image-caption samples from ``src``, walked recursively in sorted order.

    Args:
        src: Folder holding ``NAME.<jpg|jpeg|png|webp>`` beside ``NAME.txt``.
        skips: Receives the images skipped (no caption, empty caption, unreadable or empty file).
        keep: When given, only the images whose relative path without extension it accepts
            (one split's share) are read.
    """
    taken: set[str] = set()
    for relative, ext, image_path in folder_images(src):
        stem = relative.rsplit(".", 1)[0]
        if keep is not None and not keep(stem):
            continue
        caption, reason = _read_caption(image_path.with_suffix(".txt"))
        if reason is None:
            data, reason = read_image(image_path)
        if reason is not None:
            skips.add(reason, relative)
            continue
        yield pair_sample(_unique_key(stem, taken), ext, data, caption, {"source": relative})


# --------------------------------------------------------------------------------- reading


def complete(sample: dict[str, Any]) -> bool:
    """Whether a raw sample holds a caption and an image member."""
    return "txt" in sample and any(ext in sample for ext in IMAGE_EXTENSIONS)


class DecodePairs(DecodeStage):
    """Raw samples to ``{"key", "image", "text"}`` pairs; bad ones are counted and dropped.

    The image header is read before any pixel is decoded, so an absurdly large image costs
    nothing but its bytes.
    """

    complete = staticmethod(complete)

    def _decode(self, sample: dict[str, Any]) -> dict[str, Any] | None:
        key = sample["__key__"]
        skip = partial(self._skip, sample)
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if ext is None:
            members = sorted(k for k in sample if not k.startswith("__"))
            return skip("missing_image", f"no {'/'.join(IMAGE_EXTENSIONS)} member; it has {members}")
        # The one caption normalisation, shared with tools/decoder_vocab.py.
        text = caption_text(sample.get("txt", b""))
        if not text:
            return skip("empty_caption", "no txt member" if "txt" not in sample else "the txt member is blank")
        token = next((t for t in vision_tokens() if t in text), None)
        if token is not None:  # the processor would expect an image the caption does not carry
            return skip("vision_token", f"the caption holds the special token {token}")
        image, reason, detail = open_image(sample[ext], ext, self.max_image_pixels)
        if image is None:
            return skip(reason, detail)
        return {"key": key, "image": image, "text": text}


# --------------------------------------------------------------------------------- collating


class PairCollator(ProcessorCollator):
    """Turns a list of ``{"key", "image", "text"}`` samples into model inputs.

    The query is the image and ``query_instruction``; the target is ``target_instruction`` and
    the caption (layout: ``lame_pl.prompt``). The decoder label is the caption, so every row is
    labelled.

    Args:
        processor: A Qwen-VL processor (``lame_pl.backbone.build_processor``).
        query_instruction: Instruction of every query.
        target_instruction: Instruction of every target.
        max_text_length: Most tokens of an instruction and of a caption (cut separately); image
            tokens never count and are never cut.
        decoder_max_length: Most decoder tokens, ``<|endoftext|>`` included.
    """

    def __init__(
        self,
        processor: Any,
        query_instruction: str,
        target_instruction: str = "",
        max_text_length: int = 64,
        decoder_max_length: int = 32,
    ) -> None:
        super().__init__(processor, max_text_length, decoder_max_length)
        self.query_instruction = query_instruction
        self.target_instruction = target_instruction

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """Collate samples into ``{"query", "target", "decoder", "keys", "texts"}``."""
        texts = [s["text"] for s in samples]
        decoder, unseen = self._decoder_inputs(texts)
        from lame_pl.prompt import Side

        return self._with_unseen(
            {
                "query": self.prompts([Side(self.query_instruction, "", (s["image"],)) for s in samples]),
                "target": self.prompts([Side(self.target_instruction, t) for t in texts]),
                "decoder": decoder,
                "keys": [s["key"] for s in samples],
                "texts": texts,
            },
            unseen,
        )

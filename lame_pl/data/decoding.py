"""What every format's decode stage shares: checked image opening and the stage that runs a format's ``_decode``.

A format module (``lame_pl.data.image_text``, ``lame_pl.data.instruction_pairs``) subclasses
``DecodeStage`` with its ``_decode`` (raw tar sample to decoded sample, or None after counting a
skip) and its ``complete`` (whether a raw sample holds every member it needs). A stage is a plain
callable over a sample iterator, which ``webdataset.DataPipeline`` runs like its own stages, so
this package imports neither webdataset nor torch (the shard writers start without them).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

from PIL import Image

from lame_pl.data.skips import SkipCounter
from lame_pl.media import IMAGE_FORMATS

# Qwen-VL's resizing refuses images longer than this ratio; one such image would fail its batch.
MAX_ASPECT_RATIO = 200


def vision_tokens() -> tuple[str, ...]:
    """The backbone's vision special tokens (``lame_pl.prompt.VISION_TOKENS``), a text must not hold.

    Imported on first use: ``lame_pl.prompt`` pulls in torch.
    """
    from lame_pl.prompt import VISION_TOKENS

    return VISION_TOKENS


def open_image(data: bytes, ext: str, max_pixels: int) -> tuple[Image.Image | None, str, str]:
    """(image, "", "") for usable image bytes, else (None, skip reason, detail).

    The header is read before any pixel is decoded, so an absurdly large image costs nothing
    but its bytes. Only ``lame_pl.media.IMAGE_FORMATS`` are tried: PIL's other plugins (EPS runs
    Ghostscript) never see shard bytes.
    """
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        width, height = image.size
    except Image.DecompressionBombError as exn:
        return None, "image_too_large", str(exn)
    except Exception as exn:  # PIL's format plugins raise many types on malformed headers
        return None, "bad_image", f"{ext}: {exn}"
    if width * height > max_pixels:
        return None, "image_too_large", f"{width}x{height} pixels > data.max_image_pixels {max_pixels}"
    if min(width, height) < 1 or max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        return None, "bad_image", f"{width}x{height}: aspect ratio beyond {MAX_ASPECT_RATIO}"
    try:
        image.load()
    except Exception as exn:  # truncated or corrupt pixel data, in whatever form the plugin reports it
        return None, "bad_image", f"{ext}: {exn}"
    return image, "", ""


class DecodeStage:
    """Raw samples to decoded ones; a subclass's ``_decode`` returns None for a sample it skipped.

    Args:
        skips: The pipeline's skip counter.
        max_image_pixels: Images with more pixels are skipped as ``image_too_large``.
    """

    @staticmethod
    def complete(sample: dict[str, Any]) -> bool:
        """Whether a raw sample holds all its members; ``TarSamples`` asks next to damaged tar data."""
        raise NotImplementedError

    def __init__(self, skips: SkipCounter, max_image_pixels: int) -> None:
        self.skips = skips
        self.max_image_pixels = max_image_pixels

    def __call__(self, src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        return self.run(src)

    def run(self, src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for sample in src:
            if "__corrupt__" in sample:  # marked by TarSamples next to damaged tar data
                self._skip(sample, "corrupt_tar", sample["__corrupt__"])
                continue
            if "__skip__" in sample:  # a member TarSamples would not read (too large, a link)
                self._skip(sample, *sample["__skip__"])
                continue
            decoded = self._decode(sample)
            if decoded is not None:
                self.skips.good()
                # Where the sample came from, so that a later stage can name it in a skip.
                decoded.setdefault("__url__", sample["__url__"])
                yield decoded

    def _skip(self, sample: dict[str, Any], reason: str, detail: str) -> None:
        self.skips.skip(reason, sample["__url__"], sample["__key__"], detail)

    def _decode(self, sample: dict[str, Any]) -> dict[str, Any] | None:
        raise NotImplementedError

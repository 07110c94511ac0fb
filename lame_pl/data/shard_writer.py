"""Writing a split of WebDataset shards: shard size limits, the split's manifest, skipped input.

Every writer (``tools/make_shards.py``'s subcommands, the converters in ``lame_pl.data``) writes
a split as ``SPLIT_DIR/shard-000000.tar ...`` with ``SPLIT_DIR/manifest.json`` beside them:
``{<provenance>, "num_samples": N, "shards": [{"url": "shard-000000.tar", "num_samples": n}, ...],
"skipped": {reason: count}}``. The datamodules read it for their epoch length and progress bars.
The constants here describe the layout that readers (``datamodules``) share with the writers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lame_pl.data.skips import Skips

MANIFEST = "manifest.json"
# Image members a reader recognises by extension, in the order a reader prefers them.
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
# tarfile's USTAR headers hold at most 100 characters of member name; keep "KEY.neg12_f15.jpeg" within that.
MAX_KEY_LENGTH = 80
# A tar file ends with two zero blocks, then is padded to a multiple of a 10240-byte record.
TAR_BLOCK = 512
# Per member: a PAX extended header (one header block, one data block; tarfile writes it because
# webdataset stamps members with a fractional mtime), then the member's own header block.
TAR_HEADER = 3 * TAR_BLOCK
TAR_END = 2 * TAR_BLOCK + 10240
# Encoded image formats kept as they are, told apart by their first bytes.
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpg"))

# An image as a converter finds it: a path (relative to the image root, or absolute), or the
# encoded bytes a parquet table holds inline.
ImageSource = str | bytes


class DataError(Exception):
    """Input that cannot be turned into shards; the message names the file (and line) or the row."""


class EmptySplitError(DataError):
    """Nothing was left to write to a split (every input skipped, or none given)."""


def image_extension(path: str) -> str | None:
    """The lower-cased extension of an image file name, or None when it is not in ``IMAGE_EXTENSIONS``."""
    ext = path.rsplit(".", 1)[-1].lower() if "." in os.path.basename(path) else ""
    return ext if ext in IMAGE_EXTENSIONS else None


def read_image(path: Path) -> tuple[bytes | None, str | None]:
    """The file's bytes, or ``(None, reason)`` when it is missing, unreadable or empty.

    The bytes are not decoded: the readers check images as they load them.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, "missing_image"
    except OSError:
        return None, "unreadable_image"
    return (data, None) if data else (None, "empty_image")


def load_image_source(source: ImageSource, root: Path | None, where: str, skips: Skips) -> tuple[str, bytes] | None:
    """(extension, bytes) of an image path or inline image, or None (counted in ``skips``) when unusable.

    Raises:
        DataError: For a relative path without ``root``.
    """
    if isinstance(source, bytes):
        if not source:
            skips.add("empty_image", f"{where} (inline bytes)")
            return None
        ext = sniff_image(source)
        if ext is None:
            skips.add("unsupported_image_type", f"{where} (inline bytes {source[:8]!r})")
            return None
        return ext, source
    ext = image_extension(source)
    if ext is None:
        skips.add("unsupported_image_type", f"{where} ({source})")
        return None
    path = Path(source)
    if not path.is_absolute():
        if root is None:
            raise DataError(f"{where}: path {source!r} is relative and no image root was given")
        path = root / path
    data, reason = read_image(path)
    if reason is not None:
        skips.add(reason, f"{where} ({source})")
        return None
    return ext, data


def sniff_image(data: bytes) -> str | None:
    """The member extension of encoded image bytes we keep as they are, from their first bytes."""
    for magic, ext in _MAGIC:
        if data.startswith(magic):
            return ext
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def tar_bytes(sample: dict[str, bytes]) -> int:
    """Most bytes an encoded sample's members take in a tar file: headers, then data padded to 512 bytes."""
    return sum(TAR_HEADER + -(-len(v) // TAR_BLOCK) * TAR_BLOCK for k, v in sample.items() if not k.startswith("__"))


def write_split(
    split_dir: Path,
    samples: Iterable[dict[str, Any]],
    samples_per_shard: int,
    meta: dict[str, Any],
    shard_bytes: int | None = None,
    skips: Skips | None = None,
) -> dict[str, Any]:
    """Write samples to ``split_dir/shard-%06d.tar`` and the split's manifest; return the manifest.

    Args:
        split_dir: Output folder (created).
        samples: WebDataset sample dicts (``__key__`` plus one value per member); a generator
            may count what it leaves out in ``skips`` as it goes.
        samples_per_shard: Most samples per shard.
        meta: Extra fields for ``manifest.json``.
        shard_bytes: Most bytes per shard file; a sample larger than that gets a shard of its own.
        skips: When given, its counts (read once ``samples`` is exhausted) go into the manifest
            as ``"skipped"``.

    Raises:
        EmptySplitError: When ``samples`` yields nothing (no empty shard is left behind).
    """
    import webdataset as wds  # imported late: it pulls in torch, and bad arguments should fail fast
    from webdataset.writer import make_encoder

    encode = make_encoder(True)  # ShardWriter's own encoder: the bytes written are the same
    split_dir.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    with wds.ShardWriter(str(split_dir / "shard-%06d.tar"), maxcount=samples_per_shard, verbose=0) as sink:
        for sample in samples:
            encoded = encode(sample)
            # ShardWriter checks its maxsize only once a sample has overshot it, and counts data
            # without tar headers; rolling over here keeps every file within shard_bytes.
            if shard_bytes is not None and counts.get(Path(sink.fname).name, 0) > 0:
                used = sink.tarstream.tarstream.offset  # bytes written to this shard so far, headers included
                if used + tar_bytes(encoded) + TAR_END > shard_bytes:
                    sink.next_stream()
            sink.write(encoded)
            # ShardWriter rolls over on count or size; its current file name tells which shard got it.
            name = Path(sink.fname).name
            counts[name] = counts.get(name, 0) + 1
    if not counts:
        (split_dir / "shard-000000.tar").unlink(missing_ok=True)
        raise EmptySplitError(f"no sample to write to {split_dir}")
    manifest = {
        **meta,
        "num_samples": sum(counts.values()),
        "shards": [{"url": name, "num_samples": c} for name, c in counts.items()],
    }
    if skips is not None:
        manifest["skipped"] = dict(sorted(skips.counts.items()))
    (split_dir / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest

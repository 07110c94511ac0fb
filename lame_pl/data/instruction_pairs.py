"""The instruction-pair format: a query, its positive target and optional hard negatives.

Each side (query, target, negative) has its own instruction, a text, and an image or a video
(its frames), any of which may be absent as long as the side has a text or media. Converters read
their sources into ``PairRow``s and write them with ``write_pairs``; ``parse_pair_json`` reads a
sample's JSON back (``datamodules.samples.DecodeInstructionPairs`` decodes its media).

Shard layout: one sample per pair, its members named ``KEY.`` + the names below (WebDataset splits
a member name at the basename's first dot, so the names below hold no other dot):

    json            UTF-8 JSON object, always with every field below:
        "query_instruction":  str    ("" = none: the datamodule's default applies)
        "query_text":         str    ("" = none)
        "query_image":        str | null        member holding the query image, e.g. "query.jpg"
        "query_video":        [str, ...] | null members holding the query video's frames, in order,
                                                e.g. ["query_f0.jpg", "query_f1.jpg"]
        "target_instruction": str    ("" = none)
        "target_text":        str    ("" = none)
        "target_image":       str | null        e.g. "target.png"
        "target_video":       [str, ...] | null e.g. ["target_f0.jpg", ...]
        "negatives":          list of {"instruction": str, "text": str, "image": str | null,
                              "video": [str, ...] | null}, possibly empty; negative ``j``'s
                              members are "neg<j>.<ext>" (image) or "neg<j>_f<i>.<ext>" (frames)
        "source":             provenance, free-form (``PairRow.source``)
    query.<ext>, target.<ext>, neg<j>.<ext>                 a side's image bytes, as read
    query_f<i>.<ext>, target_f<i>.<ext>, neg<j>_f<i>.<ext>  frame ``i`` (0-based) of a side's video

``ext`` is jpg, jpeg, png or webp, lower-cased. Texts and instructions are stripped of surrounding
whitespace. A side has an image or a video, never both, and a non-empty text, media, or both.
Shards written before targets and negatives had instructions and before videos (no
``target_instruction``, no negative ``instruction``, no ``*_video``/``video`` keys) read the same:
an absent key means "" or null.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lame_pl.data.shard_writer import (
    MAX_KEY_LENGTH,
    DataError,
    EmptySplitError,
    Skips,
    image_extension,
    read_image,
    write_split,
)

# An image as a converter finds it: a path (relative to the image root, or absolute), or the
# encoded bytes a parquet table holds inline.
ImageSource = str | bytes

# Encoded image formats kept as they are, told apart by their first bytes.
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpg"))


@dataclass
class PairSide:
    """One side of a pair, as a converter reads it from its source.

    Attributes:
        instruction: Task instruction for this side; "" means the datamodule's default.
        text: The side's text (never includes the instruction).
        image: The side's image, if any.
        video: The side's video as frame images, already sampled (``lame_pl.media``), if any.
    """

    instruction: str = ""
    text: str = ""
    image: ImageSource | None = None
    video: list[ImageSource] | None = None


@dataclass
class PairRow:
    """One instruction pair read from a source, before its images are loaded and written.

    Attributes:
        key: The sample's key in the shards (unique within a split).
        query: The query side.
        target: The positive target.
        negatives: Hard negatives, possibly none.
        source: Provenance kept in the sample's JSON (e.g. the source row's file and line).
    """

    key: str
    query: PairSide
    target: PairSide
    negatives: list[PairSide] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------- writing


def write_pairs(
    rows: Iterable[PairRow],
    split_dir: Path,
    *,
    image_root: Path | None,
    samples_per_shard: int,
    shard_bytes: int | None,
    meta: dict[str, Any],
    skips: Skips,
) -> dict[str, Any]:
    """Load each row's media and write the rows as one split of instruction-pair shards.

    A row is skipped and counted in ``skips`` (by reason, with its key) when a side has neither
    text nor media (``empty_query``, ``empty_target``, ``empty_negative``), a video has no frame
    (``empty_video``), or an image or frame is missing, unreadable, empty or of a type other than
    jpg/jpeg/png/webp (``missing_image``, ``unreadable_image``, ``empty_image``,
    ``unsupported_image_type``). Image bytes are copied as they are, never re-encoded.

    Args:
        rows: The pairs, in the order to write them.
        split_dir: Output folder for ``shard-*.tar`` and ``manifest.json`` (created).
        image_root: Folder that relative image and frame paths start from; None when every path
            is absolute or every image is inline bytes.
        samples_per_shard: Most samples per shard.
        shard_bytes: Most bytes per shard file, or None for no limit.
        meta: Provenance fields for ``manifest.json``; ``"kind"`` is set to ``"instruction-pairs"``.
        skips: Receives the rows skipped; its counts also go into the manifest as ``"skipped"``.

    Returns:
        The manifest written to ``split_dir/manifest.json``.

    Raises:
        DataError: When no row survives (the message lists the skips), or for a row no source
            can produce: a key that is empty, longer than ``MAX_KEY_LENGTH``, holds characters
            outside ``[A-Za-z0-9_-]`` or repeats; a side with both an image and a video; a
            relative path without ``image_root``; a field of the wrong type.
    """
    meta = {**meta, "kind": "instruction-pairs"}
    try:
        return write_split(split_dir, _pair_samples(rows, image_root, skips), samples_per_shard, meta,
                           shard_bytes, skips)
    except EmptySplitError:
        raise EmptySplitError(f"no row could be written to {split_dir}\n{skips.report()}") from None


def _pair_samples(rows: Iterable[PairRow], root: Path | None, skips: Skips) -> Iterator[dict[str, Any]]:
    """WebDataset samples of the rows that have everything they need; the rest counted in ``skips``."""
    taken: set[str] = set()
    for row in rows:
        _check_key(row, taken)
        sides = [("query", row.query), ("target", row.target), *((f"neg{j}", n) for j, n in enumerate(row.negatives))]
        for stem, side in sides:
            _check_side(side, stem, row.key)
        empty = next((stem for stem, side in sides if not side.text.strip() and side.image is None
                      and side.video is None), None)
        if empty is not None:
            skips.add("empty_negative" if empty.startswith("neg") else f"empty_{empty}", f"sample {row.key}")
            continue
        members: dict[str, bytes] = {}
        fields = {}
        for stem, side in sides:
            loaded = _load_side(side, stem, root, row.key, skips)
            if loaded is None:
                break
            fields[stem], side_members = loaded
            members.update(side_members)
        else:
            record = {
                **{f"query_{k}": v for k, v in fields.pop("query").items()},
                **{f"target_{k}": v for k, v in fields.pop("target").items()},
                "negatives": list(fields.values()),
                "source": row.source,
            }
            try:
                encoded = json.dumps(record).encode("utf-8")
            except (TypeError, ValueError) as err:
                raise DataError(f"sample {row.key}: 'source' is not JSON-serialisable ({err})") from None
            yield {"__key__": row.key, "json": encoded, **members}


def _check_key(row: PairRow, taken: set[str]) -> None:
    key = row.key
    if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", key) or len(key) > MAX_KEY_LENGTH:
        raise DataError(f"sample key {key!r} must be 1 to {MAX_KEY_LENGTH} characters of [A-Za-z0-9_-] "
                        "(a dot would end the key inside the tar)")
    if key in taken:
        raise DataError(f"sample key {key!r} is used twice in one split")
    taken.add(key)


def _check_side(side: PairSide, stem: str, key: str) -> None:
    """Raise for what no source can mean: wrong types, or an image and a video on one side."""
    where = f"sample {key}: {_side_name(stem)}"
    for name in ("instruction", "text"):
        if not isinstance(getattr(side, name), str):
            raise DataError(f"{where} {name} must be a string, got {type(getattr(side, name)).__name__}")
    if side.image is not None and not isinstance(side.image, (str, bytes)):
        raise DataError(f"{where} image must be a path or encoded bytes, got {type(side.image).__name__}")
    if side.video is not None:
        if not isinstance(side.video, list) or not all(isinstance(f, (str, bytes)) for f in side.video):
            raise DataError(f"{where} video must be a list of frame paths or encoded bytes")
        if side.image is not None:
            raise DataError(f"{where} has both an image and a video; a side has one or the other")


def _side_name(stem: str) -> str:
    return f"negatives[{stem[3:]}]" if stem.startswith("neg") else stem


def _load_side(
    side: PairSide, stem: str, root: Path | None, key: str, skips: Skips
) -> tuple[dict[str, Any], dict[str, bytes]] | None:
    """(the side's JSON fields, its members), or None when its media is unusable (counted in ``skips``)."""
    where = f"sample {key}: {_side_name(stem)}"
    image = video = None
    members: dict[str, bytes] = {}
    if side.image is not None:
        loaded = _load_media(side.image, root, f"{where} image", skips)
        if loaded is None:
            return None
        ext, data = loaded
        image = f"{stem}.{ext}"
        members[image] = data
    if side.video is not None:
        if not side.video:
            skips.add("empty_video", f"{where} video")
            return None
        video = []
        for i, frame in enumerate(side.video):
            loaded = _load_media(frame, root, f"{where} video frame {i}", skips)
            if loaded is None:
                return None
            ext, data = loaded
            video.append(f"{stem}_f{i}.{ext}")
            members[video[-1]] = data
    fields = {"instruction": side.instruction.strip(), "text": side.text.strip(), "image": image, "video": video}
    return fields, members


def _load_media(source: ImageSource, root: Path | None, where: str, skips: Skips) -> tuple[str, bytes] | None:
    """(extension, bytes) of an image path or inline image, or None (counted) when unusable."""
    if isinstance(source, bytes):
        if not source:
            skips.add("empty_image", f"{where} (inline bytes)")
            return None
        ext = _sniff(source)
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


def _sniff(data: bytes) -> str | None:
    """The member extension of encoded image bytes we keep as they are, from their first bytes."""
    for magic, ext in _MAGIC:
        if data.startswith(magic):
            return ext
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


# --------------------------------------------------------------------------------- reading


def _optional_str(record: dict[str, Any], name: str, where: str) -> str:
    """A string field that older shards may lack ("" when absent)."""
    value = record.get(name, "")
    if not isinstance(value, str):
        raise ValueError(f"{where}{name!r} must be a string, got {type(value).__name__}")
    return value.strip()


def _side_fields(record: dict[str, Any], prefix: str, where: str, instruction_required: bool) -> dict[str, Any]:
    """``{"instruction", "text", "image", "video"}`` of one side (media as member names); ValueError names what is wrong."""
    if instruction_required and not isinstance(record.get(f"{prefix}instruction"), str):
        value = record.get(f"{prefix}instruction")
        raise ValueError(f"{where}{prefix + 'instruction'!r} must be a string, got {type(value).__name__}")
    instruction = _optional_str(record, f"{prefix}instruction", where)
    text = record.get(f"{prefix}text")
    if not isinstance(text, str):
        raise ValueError(f"{where}{prefix + 'text'!r} must be a string, got {type(text).__name__}")
    image, video = record.get(f"{prefix}image"), record.get(f"{prefix}video")
    if image is not None and (not isinstance(image, str) or not image):
        raise ValueError(f"{where}{prefix + 'image'!r} must be a member name or null, got {image!r}")
    if video is not None and (not isinstance(video, list) or not video
                              or not all(isinstance(name, str) and name for name in video)):
        raise ValueError(f"{where}{prefix + 'video'!r} must be a non-empty list of member names or null, "
                         f"got {video!r:.80}")
    if image is not None and video is not None:
        raise ValueError(f"{where}has both an image and a video")
    if not text.strip() and image is None and video is None:
        raise ValueError(f"{where}has neither a text nor an image or video")
    return {"instruction": instruction, "text": text.strip(), "image": image, "video": video}


def parse_pair_json(data: bytes) -> dict[str, Any]:
    """The fields of an instruction pair's ``KEY.json`` (the layout in this module's docstring).

    Returns:
        ``{"query": side, "target": side, "negatives": [side, ...]}``, each side
        ``{"instruction": str, "text": str, "image": member name | None, "video": [member name, ...] | None}``.

    Raises:
        ValueError: When the JSON does not parse, is not an object, or lacks or mistypes a field.
    """
    try:
        record = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exn:
        raise ValueError(f"does not parse: {exn}") from None
    if not isinstance(record, dict):
        raise ValueError(f"not a JSON object but {type(record).__name__}")
    query = _side_fields(record, "query_", "query: ", instruction_required=True)
    target = _side_fields(record, "target_", "target: ", instruction_required=False)
    negatives = record.get("negatives")
    if not isinstance(negatives, list) or not all(isinstance(n, dict) for n in negatives):
        raise ValueError(f"'negatives' must be a list of objects, got {negatives!r:.80}")
    return {
        "query": query,
        "target": target,
        "negatives": [_side_fields(n, "", f"negatives[{i}]: ", instruction_required=False)
                      for i, n in enumerate(negatives)],
    }

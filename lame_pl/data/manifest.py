"""A JSONL or CSV manifest of image-text rows or of instruction pairs, read into either format's samples.

A ``.jsonl`` file holds one JSON object per line (blank lines ignored), a ``.csv`` file a header
row, then one row per sample; the first row decides the kind of the whole file: ``image`` and
``text`` columns make it image-text (``lame_pl.data.image_text``), any of ``SIDE_FIELDS`` makes it
instruction pairs (``lame_pl.data.instruction_pairs``). ``validate_manifest`` reads every row once
before anything is written, so a malformed row stops ``tools/make_shards.py manifest`` with the file
and line number; ``image_text_samples`` and ``pair_rows`` then read the rows for the writers. A
sample's key is its 0-based data-row index as 9 digits, skipped rows included.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lame_pl.data.image_text import pair_sample
from lame_pl.data.instruction_pairs import PairRow, PairSide
from lame_pl.data.shard_writer import DataError, image_extension, read_image
from lame_pl.data.skips import Skips
from lame_pl.data.table_rows import jsonl_objects
from lame_pl.media import list_frames, sample_frames

SIDE_FIELDS = ("query_text", "query_image", "query_video", "target_text", "target_image", "target_video")
NEGATIVE_FIELDS = ("instruction", "text", "image", "video")


def manifest_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, row)`` for each data row of a ``.jsonl`` or ``.csv`` manifest.

    CSV cells that are empty come back as ``None``, like fields absent from a JSON row.

    Raises:
        DataError: When the file cannot be read or a line is not a row; the message names the
            file and the line.
    """
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".csv"):
        raise DataError(f"{path}: a manifest must be a .jsonl or a .csv file")
    if suffix == ".jsonl":
        yield from jsonl_objects(path)
        return
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            try:
                if reader.fieldnames is None:
                    raise DataError(f"{path}:1: empty file; expected a header row")
                header = set(reader.fieldnames)
                if not ({"image", "text"} <= header or header & set(SIDE_FIELDS)):
                    raise DataError(
                        f"{path}:1: the header names neither the columns 'image' and 'text' nor "
                        f"instruction-pair fields ({', '.join(SIDE_FIELDS)}); it has "
                        f"{reader.fieldnames}"
                    )
                for row in reader:
                    if None in row:
                        raise DataError(
                            f"{path}:{reader.line_num}: more fields than the header's {len(reader.fieldnames)}"
                        )
                    if any(v is None for v in row.values()):
                        raise DataError(
                            f"{path}:{reader.line_num}: fewer fields than the header's {len(reader.fieldnames)}"
                        )
                    yield reader.line_num, {k: (v if v != "" else None) for k, v in row.items()}
            except UnicodeDecodeError:
                raise DataError(f"{path}:{reader.line_num + 1}: not UTF-8 text") from None
            except csv.Error as err:
                raise DataError(f"{path}:{reader.line_num}: {err}") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read the manifest ({err.strerror or err})") from None


def _optional_str(row: dict[str, Any], field: str, where: str) -> str | None:
    value = row.get(field)
    if value is not None and not isinstance(value, str):
        raise DataError(f"{where}: {field!r} must be a string, got {type(value).__name__} {value!r}")
    return value


def _side(row: dict[str, Any], prefix: str, where: str) -> dict[str, Any]:
    """``{"instruction", "text", "image", "video"}`` of one side of a manifest row (paths as given, or None)."""
    side = {
        "instruction": (_optional_str(row, f"{prefix}instruction", where) or "").strip(),
        "text": (_optional_str(row, f"{prefix}text", where) or "").strip(),
        "image": _optional_str(row, f"{prefix}image", where) or None,
        "video": _optional_str(row, f"{prefix}video", where) or None,
    }
    if side["image"] is not None and side["video"] is not None:
        raise DataError(f"{where}: {prefix}image and {prefix}video are both given; a side has an image or a video")
    return side


def _negatives(row: dict[str, Any], where: str, from_csv: bool) -> list[dict[str, Any]]:
    value = row.get("negatives")
    if value is None:
        return []
    if from_csv and isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: 'negatives' must be a JSON list in a CSV cell ({err.msg})") from None
    if not isinstance(value, list):
        raise DataError(f"{where}: 'negatives' must be a list, got {type(value).__name__}")
    out = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            item = {"text": item}
        if not isinstance(item, dict) or set(item) - set(NEGATIVE_FIELDS):
            raise DataError(
                f"{where}: negatives[{i}] must be a string or an object with 'text', 'image', 'video' "
                f"and/or 'instruction', got {item!r}"
            )
        negative = _side(item, "", f"{where}: negatives[{i}]")
        if not negative["text"] and negative["image"] is None and negative["video"] is None:
            raise DataError(f"{where}: negatives[{i}] has neither a text nor an image or video")
        out.append(negative)
    return out


def parse_row(row: dict[str, Any], kind: str, where: str, from_csv: bool) -> dict[str, Any]:
    """Check one manifest row and normalise it.

    Returns:
        For ``image-text``: ``{"image", "text", "extra"}``; for ``instruction``:
        ``{"query", "target", "negatives"}``, each side ``{"instruction", "text", "image", "video"}``
        (the image path and the frame folder as given, or None).

    Raises:
        DataError: For a missing column or a value of the wrong type, naming ``where``.
    """
    if kind == "image-text":
        for column in ("image", "text"):
            if column not in row:
                raise DataError(
                    f"{where}: missing column {column!r} (the file's first row made it an image-text "
                    f"manifest; the row has {sorted(row)})"
                )
        image = _optional_str(row, "image", where)
        if not image:
            raise DataError(f"{where}: 'image' is empty; give the image's path")
        text = _optional_str(row, "text", where) or ""
        extra = {k: v for k, v in row.items() if k not in ("image", "text")}
        return {"image": image, "text": text.strip(), "extra": extra}
    return {
        "query": _side(row, "query_", where),
        "target": _side(row, "target_", where),
        "negatives": _negatives(row, where, from_csv),
    }


def _row_kind(row: dict[str, Any], where: str) -> str:
    if any(field in row for field in SIDE_FIELDS):
        return "instruction"
    if "image" in row or "text" in row:
        return "image-text"
    raise DataError(
        f"{where}: a row needs the columns 'image' and 'text', or instruction-pair fields "
        f"({', '.join(SIDE_FIELDS)}); it has {sorted(row)}"
    )


def validate_manifest(path: Path) -> tuple[str, int]:
    """Read every row once, before anything is written: returns the file's kind and its row count.

    Raises:
        DataError: At the first unreadable or malformed row.
    """
    kind, rows = None, 0
    for line_no, row in manifest_rows(path):
        where = f"{path}:{line_no}"
        kind = kind or _row_kind(row, where)
        parse_row(row, kind, where, path.suffix.lower() == ".csv")
        rows += 1
    if kind is None:
        raise DataError(f"{path}: the manifest holds no row")
    return kind, rows


def image_text_samples(path: Path, root: Path, skips: Skips) -> Iterator[dict[str, Any]]:
    """Image-caption samples from a validated manifest, in file order; the key is the 0-based data-row index."""
    for index, (line_no, row) in enumerate(manifest_rows(path)):
        where = f"{path}:{line_no}"
        parsed = parse_row(row, "image-text", where, from_csv=False)
        if not parsed["text"]:
            skips.add("empty_caption", where)
            continue
        ext = image_extension(parsed["image"])
        if ext is None:
            skips.add("unsupported_image_type", f"{where} ({parsed['image']})")
            continue
        data, reason = read_image(root / parsed["image"])
        if reason is not None:
            skips.add(reason, f"{where} ({parsed['image']})")
            continue
        yield pair_sample(f"{index:09d}", ext, data, parsed["text"], {"source": parsed["image"], **parsed["extra"]})


def _frames(folder: str | None, root: Path, num_frames: int) -> list[str] | None:
    """The sampled frames of a frame folder, as paths relative to ``root`` (absolute if the folder is)."""
    if folder is None:
        return None
    return [(Path(folder) / frame.name).as_posix() for frame in sample_frames(list_frames(root / folder), num_frames)]


def pair_rows(path: Path, root: Path, num_frames: int, skips: Skips) -> Iterator[PairRow]:
    """Instruction pairs from a validated manifest, in file order; the key is the 0-based data-row index.

    A row whose frame folder does not exist is skipped here (``missing_video``); ``write_pairs``
    counts the rest of what makes a row unusable.
    """
    from_csv = path.suffix.lower() == ".csv"
    for index, (line_no, row) in enumerate(manifest_rows(path)):
        where = f"{path}:{line_no}"
        parsed = parse_row(row, "instruction", where, from_csv)
        sides = [parsed["query"], parsed["target"], *parsed["negatives"]]
        try:
            videos = [_frames(side["video"], root, num_frames) for side in sides]
        except FileNotFoundError as err:
            skips.add("missing_video", f"{where} ({err})")
            continue
        query, target, *negatives = [
            PairSide(side["instruction"], side["text"], side["image"], video)
            for side, video in zip(sides, videos, strict=True)
        ]
        source = {
            "query_image": parsed["query"]["image"],
            "query_video": parsed["query"]["video"],
            "target_image": parsed["target"]["image"],
            "target_video": parsed["target"]["video"],
            "negatives": [{"image": n["image"], "video": n["video"]} for n in parsed["negatives"]],
        }
        yield PairRow(f"{index:09d}", query, target, negatives, source)

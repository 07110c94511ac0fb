"""Readers of VLM2Vec-V2's training sources, each turning source rows into ``PairRow``s.

The fields are those VLM2Vec's own loaders read (``src/data/dataset/``: ``mmeb_dataset``,
``vidore_dataset``, ``visrag_dataset``, ``llavahound_dataset_caption``, ``llavahound_dataset_qa``).
A reader raises ``DataError`` for a row that no source can mean (a field of the wrong type, a
malformed conversation) and counts in ``skips`` a row whose media is absent; ``write_pairs``
counts the rest (a side left empty, an image file that is missing).

Instructions:
    MMEB-train  read off the data per subset and side (``lame_pl.data.instruction_split``).
    colpali     none, as in VLM2Vec-V2 (its loader drops the row's prompt): "" leaves the
                datamodule's default in force.
    VisRAG      VLM2Vec-V2 prefixes long per-source prose; we use instead the MMEB-v2
                visual-document instructions the evaluator uses (``lame_pl.evaluation.mmeb``),
                the page's as the target's instruction, so that it is never a decoder label.
    video       VLM2Vec-V2's one-line task instructions (below). A caption query's own request
                ("Describe the video in detail.") is the query's instruction: it asks for the
                task, and the video is the query's content.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lame_pl.data.instruction_pairs import ImageSource, PairRow, PairSide
from lame_pl.data.instruction_split import split_instruction
from lame_pl.data.shard_writer import DataError
from lame_pl.data.skips import Skips
from lame_pl.data.table_rows import SourceRow
from lame_pl.data.vlm2vec_mixture import VIDEO_CAPTION, VIDEO_QA, VIDEO_RETRIEVAL
from lame_pl.instructions import (
    LLAVA_VIDEO_PLACEHOLDER,
    VIDEO_QA_INSTRUCTION,
    VIDEO_RETRIEVAL_QUERY_INSTRUCTION,
    VIDEO_RETRIEVAL_TARGET_INSTRUCTION,
    VISDOC_PAGE_TEXT,
    VISDOC_QUERY_INSTRUCTION,
)
from lame_pl.instructions import (
    strip_mmeb_placeholder as clean_text,
)
from lame_pl.media import list_frames, sample_frames

MMEB_REQUIRED = ("qry", "qry_image_path", "pos_text", "pos_image_path")
MMEB_OPTIONAL = ("neg_text", "neg_image_path")
VIDORE_REQUIRED = ("query", "image", "answer")
VISRAG_REQUIRED = ("query", "image")
VIDEO_REQUIRED = ("video", "conversations")
VIDEO_OPTIONAL = ("id",)


def _key(row: SourceRow) -> str:
    return f"{row.index:09d}"


# --------------------------------------------------------------------------------- MMEB-train


@dataclass(frozen=True)
class SideTexts:
    """The cleaned texts of an MMEB-train subset, per side, from which its instructions are inferred.

    Attributes:
        query: Every row's query text.
        target: Every row's positive text and non-empty negative text (negatives are candidates
            like the positive, and carry the same instruction).
    """

    query: list[str]
    target: list[str]


def mmeb_texts(rows: Iterable[SourceRow]) -> SideTexts:
    """Read the texts of every row (checking their types) for ``infer_instruction``."""
    texts = SideTexts([], [])
    for row in rows:
        for name in ("qry_image_path", "pos_image_path", "neg_image_path"):
            row.text(name)  # type check now, before anything is written
        texts.query.append(clean_text(row.text("qry")))
        texts.target.append(clean_text(row.text("pos_text")))
        negative = clean_text(row.text("neg_text"))
        if negative:
            texts.target.append(negative)
    return texts


def mmeb_pairs(
    rows: Iterable[SourceRow], query_instruction: str, target_instruction: str, skips: Skips
) -> Iterator[PairRow]:
    """MMEB-train rows as pairs, each side's instruction split off its text.

    Image paths stay as the table gives them, relative to the image root. A row whose text does
    not start with its side's instruction is skipped and counted as ``instruction_mismatch``
    (only an instruction given by hand can miss: an inferred one is every row's prefix).
    """
    for row in rows:
        query = split_instruction(clean_text(row.text("qry")), query_instruction)
        target = split_instruction(clean_text(row.text("pos_text")), target_instruction)
        negative_text = clean_text(row.text("neg_text"))
        negative_image = row.text("neg_image_path") or None
        negative = split_instruction(negative_text, target_instruction) if negative_text else ""
        if query is None or target is None or negative is None:
            side = "query" if query is None else "target" if target is None else "negative"
            skips.add("instruction_mismatch", f"{row.where} ({side})")
            continue
        negatives = []
        if negative_text or negative_image:
            negatives.append(PairSide(target_instruction, negative, negative_image))
        yield PairRow(
            key=_key(row),
            query=PairSide(query_instruction, query, row.text("qry_image_path") or None),
            target=PairSide(target_instruction, target, row.text("pos_image_path") or None),
            negatives=negatives,
            source={"row": row.where},
        )


# --------------------------------------------------------------------------------- visual documents


def _inline_image(row: SourceRow, name: str = "image") -> ImageSource | None:
    """A Hugging Face image cell (``{"bytes", "path"}``, bytes, or a path): its bytes, else its file.

    A relative path is taken from the table's folder.
    """
    value = row.data.get(name)
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
    elif isinstance(value, (bytes, bytearray)):
        data, path = value, None
    elif value is None or isinstance(value, str):
        data, path = None, value
    else:
        raise DataError(
            f"{row.where}: field {name!r} must be an image (a bytes/path struct, bytes or a path), "
            f"got {type(value).__name__}"
        )
    if data:
        if not isinstance(data, (bytes, bytearray)):
            raise DataError(f"{row.where}: field {name!r} holds 'bytes' of type {type(data).__name__}")
        return bytes(data)
    if not path:
        return None
    if not isinstance(path, str):
        raise DataError(f"{row.where}: field {name!r} holds a 'path' of type {type(path).__name__}")
    return str((row.file.parent / path).resolve())


def vidore_pairs(rows: Iterable[SourceRow], skips: Skips) -> Iterator[PairRow]:
    """colpali_train_set rows: (page image + query) -> answer text."""
    for row in rows:
        image = _inline_image(row)
        if image is None:
            skips.add("missing_image", row.where)
            continue
        yield PairRow(
            _key(row),
            PairSide("", row.text("query").strip(), image),
            PairSide("", row.text("answer").strip()),
            source={"row": row.where},
        )


def visrag_pairs(rows: Iterable[SourceRow], skips: Skips) -> Iterator[PairRow]:
    """VisRAG in-domain rows: query text -> page image."""
    for row in rows:
        image = _inline_image(row)
        if image is None:
            skips.add("missing_image", row.where)
            continue
        yield PairRow(
            _key(row),
            PairSide(VISDOC_QUERY_INSTRUCTION, row.text("query").strip()),
            PairSide(VISDOC_PAGE_TEXT, "", image),
            source={"row": row.where},
        )


# --------------------------------------------------------------------------------- video


def conversation_turns(row: SourceRow) -> tuple[str, str]:
    """The first two turns of a LLaVA-Hound conversation (the request or question, the reply)."""
    turns = row.data.get("conversations")
    if not isinstance(turns, list) or len(turns) < 2:
        raise DataError(f"{row.where}: 'conversations' must be a list of at least two turns, got {turns!r:.80}")
    values = []
    for i, turn in enumerate(turns[:2]):
        value = turn.get("value") if isinstance(turn, dict) else None
        if not isinstance(value, str):
            raise DataError(
                f"{row.where}: conversations[{i}] must be an object with a string 'value', got {turn!r:.80}"
            )
        values.append(value.replace(LLAVA_VIDEO_PLACEHOLDER, "").strip())
    return values[0], values[1]


def video_folder_name(row: SourceRow) -> str:
    """The row's ``video`` field: the name of its frame folder.

    Raises:
        DataError: When it is not a string or is empty.
    """
    video = row.text("video").strip()
    if not video:
        raise DataError(f"{row.where}: field 'video' is empty; it names the video's frame folder")
    return video


def video_pairs(
    rows: Iterable[SourceRow], kind: str, frames_root: Path, num_frames: int, skips: Skips
) -> Iterator[PairRow]:
    """LLaVA-Hound rows as pairs, in the mode ``kind`` names, each video as ``num_frames`` sampled frames.

    Args:
        rows: Rows with ``video`` (a frame folder under ``frames_root``) and ``conversations``.
        kind: ``VIDEO_CAPTION``, ``VIDEO_RETRIEVAL`` or ``VIDEO_QA``.
        frames_root: The folder holding one frame folder per video.
        num_frames: Frames per video, sampled as VLM2Vec-V2 does (``lame_pl.media``).
        skips: Counts videos whose folder is missing (``missing_video``) or holds no frame (``empty_video``).
    """
    if kind not in (VIDEO_CAPTION, VIDEO_RETRIEVAL, VIDEO_QA):
        raise ValueError(f"not a video kind: {kind!r}")
    frames_root = frames_root.resolve()
    for row in rows:
        request, reply = conversation_turns(row)
        video = video_folder_name(row)
        folder = frames_root / video
        if not folder.is_dir():
            skips.add("missing_video", f"{row.where} ({folder})")
            continue
        frames: list[ImageSource] = [str(p) for p in sample_frames(list_frames(folder), num_frames)]
        if not frames:
            skips.add("empty_video", f"{row.where} ({folder})")
            continue
        if kind == VIDEO_CAPTION:
            query, target = PairSide(request, "", video=frames), PairSide("", reply)
        elif kind == VIDEO_RETRIEVAL:
            query = PairSide(VIDEO_RETRIEVAL_QUERY_INSTRUCTION, reply)
            target = PairSide(VIDEO_RETRIEVAL_TARGET_INSTRUCTION, "", video=frames)
        else:
            query, target = PairSide(VIDEO_QA_INSTRUCTION, request, video=frames), PairSide("", reply)
        source: dict[str, Any] = {"row": row.where, "video": video}
        if row.data.get("id") is not None:
            source["id"] = str(row.data["id"])
        yield PairRow(_key(row), query, target, source=source)

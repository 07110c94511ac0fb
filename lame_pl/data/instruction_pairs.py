"""The instruction-pair format: a query, its positive target and optional hard negatives.

Each side (query, target, negative) has its own instruction, a text, and an image or a video
(its frames), any of which may be absent as long as the side has a text or media. Converters read
their sources into ``PairRow``s and write them with ``write_pairs``; ``parse_pair_json`` reads a
sample's JSON back, ``DecodeInstructionPairs`` (the decode stage) decodes a raw tar sample with its
media, and ``InstructionCollator`` turns decoded samples into model inputs.
``lame_pl.datamodules.InstructionPairDataModule`` streams the format.

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
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lame_pl.data.collate import ProcessorCollator
from lame_pl.data.decoding import DecodeStage, open_image, vision_tokens
from lame_pl.data.shard_writer import (
    MAX_KEY_LENGTH,
    DataError,
    EmptySplitError,
    ImageSource,
    load_image_source,
    write_split,
)
from lame_pl.data.skips import Skips

if TYPE_CHECKING:
    from PIL import Image

    from lame_pl.prompt import Side

# What the decoder regenerates for an instruction pair: the target's text, or, where the target
# has none (text-to-image, visual documents), the query's text.
DECODER_LABELS = ("target_text", "target_or_query_text")


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
        return write_split(
            split_dir, _pair_samples(rows, image_root, skips), samples_per_shard, meta, shard_bytes, skips
        )
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
        empty = next(
            (stem for stem, side in sides if not side.text.strip() and side.image is None and side.video is None), None
        )
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
        raise DataError(
            f"sample key {key!r} must be 1 to {MAX_KEY_LENGTH} characters of [A-Za-z0-9_-] "
            "(a dot would end the key inside the tar)"
        )
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
        loaded = load_image_source(side.image, root, f"{where} image", skips)
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
            loaded = load_image_source(frame, root, f"{where} video frame {i}", skips)
            if loaded is None:
                return None
            ext, data = loaded
            video.append(f"{stem}_f{i}.{ext}")
            members[video[-1]] = data
    fields = {"instruction": side.instruction.strip(), "text": side.text.strip(), "image": image, "video": video}
    return fields, members


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
    if video is not None and (
        not isinstance(video, list) or not video or not all(isinstance(name, str) and name for name in video)
    ):
        raise ValueError(
            f"{where}{prefix + 'video'!r} must be a non-empty list of member names or null, got {video!r:.80}"
        )
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
        "negatives": [
            _side_fields(n, "", f"negatives[{i}]: ", instruction_required=False) for i, n in enumerate(negatives)
        ],
    }


# --------------------------------------------------------------------------------- decoding


def complete(sample: dict[str, Any]) -> bool:
    """Whether a raw sample holds its ``json`` member."""
    # Only the JSON knows which image members belong; without it nothing of the sample is usable.
    return "json" in sample


class DecodeInstructionPairs(DecodeStage):
    """Raw instruction pairs (``KEY.json`` + media members) to decoded samples; bad ones are counted and dropped.

    Samples come out as ``{"key", "query": side, "target": side, "negatives": [side, ...]}``,
    each side ``{"instruction": str, "text": str, "images": [PIL image, ...], "video": [PIL image,
    ...] | None}`` (``images`` holds the side's image, if any; ``video`` its frames, in order). The
    JSON is read by ``lame_pl.data.instruction_pairs.parse_pair_json``: one that does not parse or
    lacks a field is ``bad_json``; a text or instruction holding a vision special token is
    ``vision_token``; an
    image or frame member the JSON names but the sample lacks is ``missing_image``; images and
    frames get the checks of ``DecodePairs``, and a video whose frames differ in size is ``bad_image``.
    """

    complete = staticmethod(complete)

    def _decode(self, sample: dict[str, Any]) -> dict[str, Any] | None:
        key = sample["__key__"]
        skip = partial(self._skip, sample)
        if "json" not in sample:
            members = sorted(k for k in sample if not k.startswith("__"))
            return skip("bad_json", f"no json member; it has {members}")
        try:
            pair = parse_pair_json(sample["json"])
        except ValueError as exn:
            return skip("bad_json", str(exn))
        decoded = {}
        for name, side in (
            ("query", pair["query"]),
            ("target", pair["target"]),
            *((f"negatives[{i}]", n) for i, n in enumerate(pair["negatives"])),
        ):
            # A vision token in a text would make the processor expect media the side lacks and
            # fail the whole batch; the record is bad, not the run.
            token = next((t for t in vision_tokens() for part in ("instruction", "text") if t in side[part]), None)
            if token is not None:
                return skip("vision_token", f"{name}: its instruction or text holds the special token {token}")
            images = self._open_members(sample, name, [] if side["image"] is None else [side["image"]])
            if images is None:
                return None
            video = None
            if side["video"] is not None:
                video = self._open_members(sample, name, side["video"])
                if video is None:
                    return None
                sizes = sorted({frame.size for frame in video})
                if len(sizes) > 1:  # the video processor stacks frames: they must share one size
                    return skip("bad_image", f"{name}: the video's frames differ in size {sizes}")
            decoded[name] = {"instruction": side["instruction"], "text": side["text"], "images": images, "video": video}
        query, target = decoded.pop("query"), decoded.pop("target")
        return {"key": key, "query": query, "target": target, "negatives": list(decoded.values())}

    def _open_members(self, sample: dict[str, Any], side: str, members: list[str]) -> list[Image.Image] | None:
        """The decoded images of ``members``, or None (skip counted) at the first one missing or bad."""
        images = []
        for member in members:
            # Member extensions are read lower-cased (``_split_name``), as the writer writes them.
            data = sample.get(member.lower())
            if data is None:
                present = sorted(k for k in sample if not k.startswith("__"))
                self._skip(
                    sample, "missing_image", f"{side}: the json names member {member!r}; the sample has {present}"
                )
                return None
            image, reason, detail = open_image(data, member, self.max_image_pixels)
            if image is None:
                self._skip(sample, reason, f"{side} {member}: {detail}")
                return None
            images.append(image)
        return images


# --------------------------------------------------------------------------------- collating


class InstructionCollator(ProcessorCollator):
    """Turns instruction-pair samples (``DecodeInstructionPairs``) into model inputs.

    Each side of a sample is ``{"instruction", "text", "images", "video"}`` (``video`` a list of
    frames or None). A side uses its own instruction; an empty one falls back to
    ``query_instruction`` for a query, ``target_instruction`` for a target, and for a hard
    negative to its sample's target instruction, else ``target_instruction``. Each side (query,
    target, and the hard negatives of all samples flattened into one ``"negative"`` side shared
    by every query, left out when the batch has none) goes through ``lame_pl.prompt``.

    ``batch["decoder"]`` holds ``input_ids``/``attention_mask`` (right-padded, ending in
    ``<|endoftext|>``) and ``labelled``, a ``(B,)`` bool tensor: see ``decoder_label``.
    Instructions are never decoder labels.

    Args:
        processor: A Qwen-VL processor (``lame_pl.backbone.build_processor``).
        query_instruction: Instruction of the queries whose sample gives none.
        target_instruction: Instruction of the targets (and negatives) whose sample gives none.
        max_text_length: Most tokens in each instruction and each side's text (cut separately);
            vision tokens never count and are never cut.
        decoder_max_length: Most decoder tokens, ``<|endoftext|>`` included.
        decoder_label: ``target_text``: the target's text; a row whose target has none is
            unlabelled. ``target_or_query_text``: the target's text, else the query's text, else
            unlabelled.
    """

    def __init__(
        self,
        processor: Any,
        query_instruction: str = "",
        target_instruction: str = "",
        max_text_length: int = 64,
        decoder_max_length: int = 32,
        decoder_label: str = "target_text",
    ) -> None:
        if decoder_label not in DECODER_LABELS:
            raise ValueError(f"decoder_label must be one of {', '.join(DECODER_LABELS)}; got {decoder_label!r}")
        super().__init__(processor, max_text_length, decoder_max_length)
        self.query_instruction = query_instruction
        self.target_instruction = target_instruction
        self.decoder_label = decoder_label

    def _label(self, sample: dict[str, Any]) -> str | None:
        target = sample["target"]["text"]
        if target.strip() or self.decoder_label == "target_text":
            return target
        return sample["query"]["text"]

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """Collate samples into ``{"query", "target", "decoder", "keys", "texts"}`` and ``"negative"`` if any."""
        queries, targets, negatives = [], [], []
        for s in samples:
            queries.append(side(s["query"], self.query_instruction))
            target_instruction = s["target"]["instruction"] or self.target_instruction
            targets.append(side(s["target"], target_instruction))
            negatives += [side(n, target_instruction) for n in s["negatives"]]
        decoder, unseen = self._decoder_inputs([self._label(s) for s in samples])
        batch = {
            "query": self.prompts(queries),
            "target": self.prompts(targets),
            "decoder": decoder,
            "keys": [s["key"] for s in samples],
            "texts": [s["target"]["text"] for s in samples],
        }
        if negatives:
            batch["negative"] = self.prompts(negatives)
        return self._with_unseen(batch, unseen)


def side(record: dict[str, Any], default_instruction: str = "") -> Side:
    """A decoded sample side (``{"instruction", "text", "images", "video"}``) as a ``lame_pl.prompt.Side``.

    Raises:
        ValueError: When a field is missing or a video has no frame.
    """
    from lame_pl.prompt import Side as PromptSide  # on first use: it pulls in torch

    missing = [k for k in ("instruction", "text", "images", "video") if k not in record]
    if missing:
        raise ValueError(f"sample side lacks {missing}; it has {sorted(record)}")
    video = record["video"]
    if video is not None and len(video) == 0:
        raise ValueError("sample side has a video with no frame")
    return PromptSide(
        record["instruction"] or default_instruction,
        record["text"],
        tuple(record["images"]),
        None if video is None else tuple(video),
    )

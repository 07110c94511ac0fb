"""``make_shards.py mmeb-train``: VLM2Vec-V2's training data, as stored locally, to instruction-pair shards.

Input, as VLM2Vec's ``experiments/public/data/download_data.sh`` leaves it (each option optional;
by default every subset whose input is there is converted, and the others are listed):

    --mmeb-root DIR          a clone of TIGER-Lab/MMEB-train: per subset ``<Subset>/<split>-*.parquet``
                             (or ``<Subset>/<split>/*.parquet``, ``<Subset>/<split>.jsonl``,
                             ``<Subset>.parquet``, ``<Subset>.jsonl``), columns ``qry``,
                             ``qry_image_path``, ``pos_text``, ``pos_image_path``, optional
                             ``neg_text``, ``neg_image_path``; image paths relative to
                             ``--image-root`` (default: the MMEB-train folder)
    --colpali PATH           vidore/colpali_train_set: a .parquet/.jsonl file, or a folder whose
                             ``train*`` tables are read (``query``, ``image``, ``answer``)
    --visrag PATH            openbmb/VisRAG-Ret-Train-In-domain-data, the same way (``query``, ``image``)
    --video-annotations DIR  ShareGPTVideo's ``video_instruction/train/sft/``: video_caption_300k.jsonl,
                             video_qa_240k.jsonl (or video_240k_caption_15k.jsonl)
    --video-frames DIR       the extracted ``train_300k/``: one frame folder per video

Output: ``OUT/<subset>/shard-*.tar`` + ``manifest.json`` per subset (the layout of
``lame_pl.data.instruction_pairs``), and ``OUT/mixture.yaml``, a config overlay whose
``data.init_args.train_mixture`` lists exactly the subsets this run wrote, with VLM2Vec-V2's
weights and ``homogeneous: true``; add it after the base and stage configs with ``--config``.

Rows are capped as VLM2Vec-V2 caps them (``lame_pl.data.vlm2vec_mixture``): the first N of each
subset; ``--no-row-caps`` converts every row, ``--max-rows N`` caps every subset at N. MMEB-train's
instructions are merged into its texts; they are split off per subset and side
(``lame_pl.data.instruction_split``), printed and stored in each manifest; with a single subset,
``--query-instruction`` / ``--target-instruction`` give them instead.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lame_pl.data.instruction_pairs import PairRow, write_pairs
from lame_pl.data.instruction_split import AmbiguousInstruction, infer_instruction
from lame_pl.data.shard_args import add_shard_size_args, check_split_dir, positive_int
from lame_pl.data.shard_writer import MANIFEST, DataError
from lame_pl.data.skips import Skips
from lame_pl.data.table_rows import iter_rows, table_files
from lame_pl.data.vlm2vec_mixture import MMEB, SUBSET_BY_NAME, SUBSETS, VIDEO_KINDS, VIDORE, VISRAG, Subset
from lame_pl.data.vlm2vec_sources import (
    MMEB_OPTIONAL,
    MMEB_REQUIRED,
    VIDEO_OPTIONAL,
    VIDEO_REQUIRED,
    VIDORE_REQUIRED,
    VISRAG_REQUIRED,
    SideTexts,
    conversation_turns,
    mmeb_pairs,
    mmeb_texts,
    video_folder_name,
    video_pairs,
    vidore_pairs,
    visrag_pairs,
)
from lame_pl.instructions import strip_mmeb_placeholder as clean_text
from lame_pl.media import DEFAULT_NUM_FRAMES

MIXTURE_FILE = "mixture.yaml"


def _subset_list(text: str) -> list[str]:
    names = []
    for name in (part.strip() for part in text.split(",")):
        if not name:
            continue
        if name not in SUBSET_BY_NAME:
            raise argparse.ArgumentTypeError(f"unknown subset {name!r}; the subsets are {', '.join(SUBSET_BY_NAME)}")
        if name not in names:
            names.append(name)
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated subset names, got none")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``mmeb-train`` subcommand's options to ``parser``."""
    parser.add_argument(
        "--out", required=True, type=Path, help="output folder: OUT/<subset>/ per subset, and OUT/mixture.yaml"
    )
    parser.add_argument(
        "--mmeb-root", type=Path, default=None, help="the MMEB-train folder (a clone of TIGER-Lab/MMEB-train)"
    )
    parser.add_argument("--split", default="original", help="MMEB-train split to read (default original, VLM2Vec-V2's)")
    parser.add_argument(
        "--image-root", type=Path, default=None, help="folder MMEB-train image paths start from (default: --mmeb-root)"
    )
    parser.add_argument(
        "--colpali",
        type=Path,
        default=None,
        help="vidore/colpali_train_set: a .parquet/.jsonl file or a folder of train* tables",
    )
    parser.add_argument(
        "--visrag",
        type=Path,
        default=None,
        help="VisRAG-Ret-Train-In-domain-data: a .parquet/.jsonl file or a folder of train* tables",
    )
    parser.add_argument(
        "--video-annotations",
        type=Path,
        default=None,
        help="folder with LLaVA-Hound's video_caption_300k.jsonl and video_qa_240k.jsonl",
    )
    parser.add_argument(
        "--video-frames",
        type=Path,
        default=None,
        help="folder with one frame folder per video (LLaVA-Hound's train_300k/)",
    )
    parser.add_argument(
        "--num-frames",
        type=positive_int,
        default=None,
        help=f"frames sampled per video (default: the mixture's, {DEFAULT_NUM_FRAMES})",
    )
    parser.add_argument(
        "--subsets",
        type=_subset_list,
        default=None,
        help="comma-separated subsets to convert (default: every subset whose input is present)",
    )
    caps = parser.add_mutually_exclusive_group()
    caps.add_argument(
        "--no-row-caps", action="store_true", help="convert every row, not the first N that VLM2Vec-V2 keeps per subset"
    )
    caps.add_argument(
        "--max-rows",
        type=positive_int,
        default=None,
        help="convert at most the first N rows of each subset (instead of VLM2Vec-V2's caps)",
    )
    parser.add_argument(
        "--query-instruction",
        default=None,
        help="the query instruction of the one MMEB-train subset converted (default: inferred)",
    )
    parser.add_argument(
        "--target-instruction",
        default=None,
        help="the target instruction of the one MMEB-train subset converted (default: inferred)",
    )
    add_shard_size_args(parser)


# --------------------------------------------------------------------------------- locating inputs


@dataclass
class _Input:
    """Where one subset's rows come from."""

    subset: Subset
    files: list[Path]
    image_root: Path | None = None
    frames_root: Path | None = None


def _mmeb_files(root: Path, name: str, split: str) -> list[Path] | str:
    """The subset's table files, or why none was found."""
    folder = root / name
    candidates = (
        sorted(folder.glob(f"{split}-*.parquet")),
        sorted((folder / split).glob("*.parquet")),
        [folder / f"{split}.parquet"],
        [folder / f"{split}.jsonl"],
        [root / f"{name}.parquet"],
        [root / f"{name}.jsonl"],
    )
    for files in candidates:
        if files and all(path.is_file() for path in files):
            return files
    if folder.is_dir():
        held = sorted(p.name for p in folder.iterdir())[:5]
        return f"{folder} holds no {split}-*.parquet, {split}/*.parquet or {split}.jsonl (it has {held}); see --split"
    return f"no <subset>/ folder, <subset>.parquet or <subset>.jsonl in {root}"


def _locate(subset: Subset, args: argparse.Namespace) -> _Input | str:
    """The subset's input, or a sentence saying what is missing."""
    if subset.kind == MMEB:
        if args.mmeb_root is None:
            return "no --mmeb-root"
        files = _mmeb_files(args.mmeb_root, subset.name, args.split)
        if isinstance(files, str):
            return files
        return _Input(subset, files, image_root=args.image_root or args.mmeb_root)
    if subset.kind in (VIDORE, VISRAG):
        option = "--colpali" if subset.kind == VIDORE else "--visrag"
        path = args.colpali if subset.kind == VIDORE else args.visrag
        if path is None:
            return f"no {option}"
        return _Input(subset, table_files(path, option))
    if args.video_annotations is None:
        return "no --video-annotations"
    for name in subset.annotations:
        if (args.video_annotations / name).is_file():
            if args.video_frames is None:
                raise DataError(
                    f"subset {subset.name}: --video-annotations is given but --video-frames is not; "
                    "give the folder of frame folders"
                )
            return _Input(subset, [args.video_annotations / name], frames_root=args.video_frames)
    return f"no {' or '.join(subset.annotations)} in {args.video_annotations}"


def _check_paths(args: argparse.Namespace) -> None:
    for option, path in (
        ("--mmeb-root", args.mmeb_root),
        ("--image-root", args.image_root),
        ("--video-annotations", args.video_annotations),
        ("--video-frames", args.video_frames),
    ):
        if path is not None and not path.is_dir():
            raise DataError(f"{option} {str(path)!r} is not a directory")
    for option, path in (("--colpali", args.colpali), ("--visrag", args.visrag)):
        if path is not None and not path.exists():
            raise DataError(f"{option} {str(path)!r} does not exist")
    if args.out.exists() and not args.out.is_dir():
        raise DataError(f"--out {str(args.out)!r} exists and is not a directory")


def _plan(args: argparse.Namespace) -> list[_Input]:
    """The inputs to convert, in the mixture's order; prints what was found and what was not."""
    wanted = [SUBSET_BY_NAME[name] for name in args.subsets] if args.subsets else list(SUBSETS)
    found: list[_Input] = []
    missing: dict[str, list[str]] = {}  # why -> the subsets it leaves out
    for subset in wanted:
        located = _locate(subset, args)
        if isinstance(located, str):
            if args.subsets:
                raise DataError(f"subset {subset.name}: input not found ({located})")
            missing.setdefault(located, []).append(subset.name)
        else:
            found.append(located)
    listed = "\n  ".join(f"{', '.join(names)}: {why}" for why, names in missing.items())
    if not found:
        raise DataError(
            "no input found for any subset; give --mmeb-root, --colpali, --visrag or "
            f"--video-annotations with --video-frames\n  {listed}"
        )
    order = {subset.name: i for i, subset in enumerate(SUBSETS)}
    found.sort(key=lambda item: order[item.subset.name])
    print(f"found {len(found)} subset{'s' if len(found) != 1 else ''}: {', '.join(item.subset.name for item in found)}")
    if args.split != "original" and any(item.subset.kind == MMEB for item in found):
        print(
            f"warning: --split {args.split}: instructions are inferred as one per subset and side, as in the "
            "original split; a split that paraphrases them per row (diverse_instruction) leaves them in the texts"
        )
    if missing:
        print(f"not found ({sum(map(len, missing.values()))}):\n  {listed}")
    return found


# --------------------------------------------------------------------------------- converting


def _row_cap(subset: Subset, args: argparse.Namespace) -> int | None:
    if args.no_row_caps:
        return None
    return args.max_rows if args.max_rows is not None else subset.row_cap


def _origin(args: argparse.Namespace) -> str:
    return "given" if args.query_instruction is not None or args.target_instruction is not None else "inferred"


def _instructions(item: _Input, texts: SideTexts, args: argparse.Namespace) -> dict[str, str]:
    """The subset's query and target instruction: given, or inferred from every row's text."""
    chosen = {}
    for side, given, side_texts in (
        ("query", args.query_instruction, texts.query),
        ("target", args.target_instruction, texts.target),
    ):
        if given is not None:
            chosen[side] = clean_text(given)
            continue
        try:
            chosen[side] = infer_instruction(side_texts)
        except AmbiguousInstruction:
            raise DataError(
                f"{item.files[0]} holds a single row, which does not show "
                f"where its {side} instruction ends; convert it alone and pass --query-instruction "
                "and --target-instruction"
            ) from None
    print(f"{item.subset.name}: instructions ({_origin(args)}): query {chosen['query']!r}, target {chosen['target']!r}")
    return chosen


def _validate(item: _Input, cap: int | None) -> int:
    """Check the non-media fields of the rows to convert: returns how many rows will be read.

    MMEB-train rows are checked as their texts are read for the instructions; the page images of
    the visual-document sets are checked as they are written.
    """
    kind, rows = item.subset.kind, 0
    fields = VIDEO_REQUIRED if kind in VIDEO_KINDS else {VIDORE: ("query", "answer"), VISRAG: ("query",)}[kind]
    for row in iter_rows(item.files, fields, limit=cap):
        if kind in VIDEO_KINDS:
            conversation_turns(row)
            video_folder_name(row)
        else:
            for name in fields:
                row.text(name)
        rows += 1
    return rows


def _pairs(
    item: _Input, instructions: dict[str, str], num_frames: int, cap: int | None, skips: Skips
) -> Iterator[PairRow]:
    kind = item.subset.kind
    if kind == MMEB:
        rows = iter_rows(item.files, MMEB_REQUIRED, MMEB_OPTIONAL, limit=cap)
        return mmeb_pairs(rows, instructions["query"], instructions["target"], skips)
    if kind == VIDORE:
        return vidore_pairs(iter_rows(item.files, VIDORE_REQUIRED, limit=cap), skips)
    if kind == VISRAG:
        return visrag_pairs(iter_rows(item.files, VISRAG_REQUIRED, limit=cap), skips)
    rows = iter_rows(item.files, VIDEO_REQUIRED, VIDEO_OPTIONAL, limit=cap)
    assert item.frames_root is not None
    return video_pairs(rows, kind, item.frames_root, num_frames, skips)


def _convert(item: _Input, args: argparse.Namespace, stale: list[Path]) -> dict[str, Any]:
    """Convert one subset to ``OUT/<subset>/``; returns its manifest.

    Raises:
        DataError: For malformed input (before ``stale`` files are removed) or when no row survives.
    """
    start = time.perf_counter()
    subset = item.subset
    cap = _row_cap(subset, args)
    num_frames = args.num_frames or subset.num_frames or DEFAULT_NUM_FRAMES
    instructions: dict[str, str] = {}
    if subset.kind == MMEB:
        # Every row's text, also past the cap: the instruction is the subset's, not the first rows'.
        texts = mmeb_texts(iter_rows(item.files, MMEB_REQUIRED, MMEB_OPTIONAL))
        instructions = _instructions(item, texts, args)
        rows = len(texts.query) if cap is None else min(cap, len(texts.query))
    else:
        rows = _validate(item, cap)
    for old in stale:
        old.unlink(missing_ok=True)
    meta: dict[str, Any] = {
        "split": "train",
        "source": "vlm2vec-v2",
        "subset": subset.name,
        "source_kind": subset.kind,
        "inputs": [str(path.resolve()) for path in item.files],
        "weight": subset.weight,
        "row_cap": cap,
        "rows": rows,
    }
    if subset.kind == MMEB:
        meta.update(
            mmeb_split=args.split,
            query_instruction=instructions["query"],
            target_instruction=instructions["target"],
            instruction_origin=_origin(args),
        )
    if subset.kind in VIDEO_KINDS:
        meta["num_frames"] = num_frames
    skips = Skips()
    split_dir = args.out / subset.name
    pairs = _pairs(item, instructions, num_frames, cap, skips)
    try:
        manifest = write_pairs(
            pairs,
            split_dir,
            image_root=item.image_root,
            samples_per_shard=args.samples_per_shard,
            shard_bytes=args.shard_bytes,
            meta=meta,
            skips=skips,
        )
    except DataError as err:
        # Leave no half-written set behind for a later mixture to pick up.
        for partial in [*split_dir.glob("shard-*.tar"), split_dir / MANIFEST]:
            partial.unlink(missing_ok=True)
        if subset.kind != MMEB:
            raise
        first, _, rest = str(err).partition("\n")
        hint = f" (MMEB-train image paths are read from --image-root {str(item.image_root)!r})"
        raise DataError(f"{first}{hint}\n{rest}".rstrip()) from None
    print(
        f"{subset.name}: {manifest['num_samples']} samples from {rows} rows in {len(manifest['shards'])} shards "
        f"-> {split_dir} ({time.perf_counter() - start:.1f}s)"
    )
    print(skips.report())
    return manifest


def mixture_overlay(written: list[Subset], out: Path) -> dict[str, Any]:
    """The config overlay that trains on the subsets written: their weights, whole batches per subset.

    Each set's ``shards`` is its folder name under ``mixture_root`` (``out``, absolute), as in
    ``configs/qwen2vl-2b/base.yaml``; moving the shards needs only a new ``mixture_root``.
    """
    sets = [
        {"name": subset.name, "shards": subset.name, "weight": float(subset.weight), "homogeneous": True}
        for subset in written
    ]
    return {"data": {"init_args": {"train_shards": None, "mixture_root": str(out.resolve()), "train_mixture": sets}}}


def _write_mixture(written: list[Subset], out: Path) -> None:
    header = (
        "# VLM2Vec-V2's training mixture as converted by `tools/make_shards.py mmeb-train`: the subsets this\n"
        "# run wrote, with VLM2Vec-V2's weights (a set supplies weight / sum of the samples) and whole batches\n"
        "# per subset. Add it after the base and stage configs:\n"
        f"#   lightning fit --config configs/qwen2vl-2b/base.yaml --config configs/qwen2vl-2b/stage2.yaml "
        f"--config {out / MIXTURE_FILE}\n"
    )
    text = yaml.safe_dump(mixture_overlay(written, out), sort_keys=False, default_flow_style=False)
    (out / MIXTURE_FILE).write_text(header + text)


def run(args: argparse.Namespace) -> None:
    """Convert the subsets whose input is present (or ``--subsets``) and write ``OUT/mixture.yaml``.

    Every subset is attempted; one that fails leaves no shards behind, the others are written and
    listed in the mixture, and the failures are raised together at the end.

    Raises:
        DataError: For a bad option or path, malformed input, an output folder that is not
            empty without ``--overwrite``, or subsets of which no row could be written.
    """
    _check_paths(args)
    given = [
        opt
        for opt, value in (
            ("--query-instruction", args.query_instruction),
            ("--target-instruction", args.target_instruction),
        )
        if value is not None
    ]
    if given and not (args.subsets and len(args.subsets) == 1 and SUBSET_BY_NAME[args.subsets[0]].kind == MMEB):
        raise DataError(
            f"{given[0]} applies to one MMEB-train subset: pass --subsets NAME with a single MMEB-train subset"
        )
    plan = _plan(args)
    stale = {item.subset.name: check_split_dir(args.out, item.subset.name, args.overwrite) for item in plan}
    written: list[Subset] = []
    failed: list[str] = []
    for item in plan:
        try:
            _convert(item, args, stale[item.subset.name])
        except DataError as err:
            print(f"FAILED {item.subset.name}: {err}")
            failed.append(f"{item.subset.name}: {str(err).splitlines()[0]}")
            continue
        written.append(item.subset)
    if written:
        _write_mixture(written, args.out)
        print(f"{args.out / MIXTURE_FILE}: a mixture of the {len(written)} subsets written")
        others = sorted(
            p.name
            for p in args.out.iterdir()
            if p.is_dir() and (p / MANIFEST).is_file() and p.name not in {s.name for s in written}
        )
        if others:
            print(f"note: {args.out} also holds {', '.join(others)}, not in {MIXTURE_FILE} (written by another run)")
    if failed:
        raise DataError(f"{len(failed)} of {len(plan)} subsets failed: " + "; ".join(failed))

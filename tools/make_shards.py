"""Write WebDataset shards: image-caption pairs (img2dataset layout) or instruction pairs.

Shards go to ``OUT/<split>/shard-000000.tar ...`` with ``OUT/<split>/manifest.json`` beside
them: ``{"num_samples": N, "shards": [{"url": "shard-000000.tar", "num_samples": n}, ...], ...}``
plus provenance fields and, for ``folder`` and ``manifest``, the skipped input counted by reason.
The datamodule reads it for its epoch length and progress bars. The writing itself lives in the
package (``lame_pl/data/shard_writer.py``; instruction pairs: ``lame_pl/data/instruction_pairs.py``).

    python tools/make_shards.py synthetic --out data/synthetic
    python tools/make_shards.py folder --src photos/ --out data/photos [--split-name train]
    python tools/make_shards.py folder --src photos/ --out data/photos --val-fraction 0.1 --test-fraction 0.1
    python tools/make_shards.py manifest --manifest pairs.jsonl --out data/pairs [--image-root imgs/]

Subcommands:
    synthetic   coloured shapes on a 3x3 grid with plain-words captions (tools/synthetic_scenes.py);
                writes train/, val/ and test/. With ``--tasks caption,count,relation,binding``:
                contrast groups of compositional statements instead (tools/synthetic_tasks.py),
                keyed ``<kind>-<group>-<member>``, the kind and the group's statements in KEY.json
    folder      images with same-named caption files, found recursively: ``a/b/cat1.jpg`` +
                ``a/b/cat1.txt``; an image without a caption, or with an empty one, is skipped.
                One split (``--split-name``, default train), or with ``--val-fraction`` and/or
                ``--test-fraction`` train/, val/ and test/ in one call, each image's split
                chosen by a hash of its path (``split_of``): the same folder always splits the
                same way, and images added later never move the old ones
    manifest    a JSONL or CSV file of image-text rows or of instruction pairs (see below)
    mmeb-train  VLM2Vec-V2's training data as stored locally (MMEB-train, visual documents,
                LLaVA-Hound video), one instruction-pair split per subset, plus a mixture config
                overlay; its options and layout are in ``lame_pl/data/mmeb_train.py``

Shard size (every subcommand): ``--samples-per-shard`` (default 1000) and/or ``--shard-bytes``
(``500MB``, ``1GB``, ``64KiB`` or plain bytes; KB/MB/GB are powers of 1000, KiB/MiB/GiB of
1024). With both, a shard is closed at whichever limit comes first. No shard file exceeds
``--shard-bytes`` unless it holds a single sample larger than that.

Image-text layout (``folder``, ``manifest`` with ``image``/``text`` rows), one sample per pair:
    KEY.<ext>   the source image's bytes, copied as they are; ext is jpg, jpeg, png or webp
                (lower-cased from the source file name)
    KEY.txt     the caption, UTF-8, surrounding whitespace stripped
    KEY.json    ``{"source": <image path relative to --src or the image root>}`` plus, for
                manifest rows, the row's other columns

Instruction-pair layout: the schema is documented once, in ``lame_pl/data/instruction_pairs.py``.

Manifest input: a ``.jsonl`` file (one JSON object per line, blank lines ignored) or a ``.csv``
file (a header row, then one row per sample). Image and frame-folder paths are relative to
``--image-root``, which defaults to the manifest's folder; absolute paths are kept. A sample's key
is its 0-based data-row index as 9 digits (``000000041``), skipped rows included, so a key leads
back to its row. ``folder`` keys are the relative path without extension, ``/`` as ``__`` and
other characters outside ``[A-Za-z0-9_-]`` as ``_``. The first row (a CSV's header) decides the
kind of the whole file:
    image-text          columns ``image`` and ``text``
    instruction pairs   any of ``query_text``, ``query_image``, ``query_video``, ``target_text``,
                        ``target_image``, ``target_video``; plus optional ``query_instruction``,
                        ``target_instruction`` and ``negatives``
``*_video`` is a folder of extracted frames; ``--num-frames`` of them (default 8, VLM2Vec-V2's)
are sampled evenly, in natural file-name order (``lame_pl/media.py``). A side has an image or a
video, not both. ``negatives`` is a list whose items are a string (a text negative) or an object
with ``text``, ``image``, ``video`` and/or ``instruction``; in a CSV it is a JSON-encoded list in
one cell (an empty cell means none). A row whose image file or frame folder is missing, whose
frame folder holds no frame, or whose caption (query, target) is empty, is skipped and counted; a
malformed row (bad JSON, a missing column, a wrong type, a side with both an image and a video,
a negative with nothing in it) stops the tool before anything is written, with the file and line
number.
"""

from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import io
import json
import os
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lame_pl.data import mmeb_train
from lame_pl.data.instruction_pairs import PairRow, PairSide, write_pairs
from lame_pl.data.shard_args import add_shard_size_args, check_split_dir, positive_int
from lame_pl.data.shard_args import parse_bytes as parse_bytes  # re-exported: callers size shards with it
from lame_pl.data.shard_writer import (
    MANIFEST,
    MAX_KEY_LENGTH,
    DataError,
    EmptySplitError,
    Skips,
    image_extension,
    read_image,
    write_split,
)
from lame_pl.data.table_rows import jsonl_objects
from lame_pl.media import DEFAULT_NUM_FRAMES, list_frames, sample_frames

try:
    from tools.synthetic_scenes import make_scene
    from tools.synthetic_tasks import BLOCK, TASKS, parse_tasks, task_samples
except ImportError:  # run as a script: tools/ is on sys.path, the repository root may not be
    from synthetic_scenes import make_scene
    from synthetic_tasks import BLOCK, TASKS, parse_tasks, task_samples

SPLITS = ("train", "val", "test")
# Redraws allowed per sample before giving up on finding an unused caption.
MAX_TRIES = 1000
SIDE_FIELDS = ("query_text", "query_image", "query_video", "target_text", "target_image", "target_video")
NEGATIVE_FIELDS = ("instruction", "text", "image", "video")


def fraction(text: str) -> float:
    """An argparse type: a number in [0, 1).

    Raises:
        argparse.ArgumentTypeError: When the text is not one.
    """
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {value}")
    return value


def _task_list(text: str) -> tuple[str, ...]:
    try:
        return parse_tasks(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser, one subcommand per data source."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    syn = sub.add_parser("synthetic", help="coloured-shape scenes with unique plain-words captions")
    syn.add_argument("--out", required=True, type=Path, help="output directory (gets train/, val/, test/)")
    syn.add_argument("--train", type=positive_int, default=6000, help="training samples (default 6000)")
    syn.add_argument("--val", type=positive_int, default=256, help="validation samples (default 256)")
    syn.add_argument("--test", type=positive_int, default=256, help="test samples (default 256)")
    syn.add_argument("--image-size", type=positive_int, default=112, help="square image side in pixels (default 112)")
    syn.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same shards")
    syn.add_argument("--format", choices=("png", "jpg"), default="png", help="image encoding (default png)")
    syn.add_argument("--tasks", type=_task_list, default=None,
                     help="write the compositional set instead of plain captions: contrast groups of these tasks, "
                          f"comma-separated, from {','.join(TASKS)} (tools/synthetic_tasks.py); sample counts and "
                          f"--samples-per-shard must then be multiples of {BLOCK}")
    add_shard_size_args(syn)

    folder = sub.add_parser("folder", help="images with same-named caption files (a/b/cat1.jpg + a/b/cat1.txt)")
    folder.add_argument("--src", required=True, type=Path, help="folder searched recursively for images")
    folder.add_argument("--out", required=True, type=Path, help="output directory (gets SPLIT_NAME/)")
    folder.add_argument("--split-name", default=None,
                        help="subfolder of --out for the shards when no fraction is given (default train)")
    folder.add_argument("--val-fraction", type=fraction, default=None,
                        help="share of the images for OUT/val/, chosen by a hash of each image's path (default: none)")
    folder.add_argument("--test-fraction", type=fraction, default=None,
                        help="share of the images for OUT/test/, chosen the same way (default: none)")
    add_shard_size_args(folder)

    man = sub.add_parser("manifest", help="a JSONL/CSV of image-text rows or instruction pairs")
    man.add_argument("--manifest", required=True, type=Path, help="the .jsonl or .csv file")
    man.add_argument("--out", required=True, type=Path, help="output directory (gets SPLIT_NAME/)")
    man.add_argument("--image-root", type=Path, default=None,
                     help="folder that relative image and frame-folder paths start from (default: the manifest's "
                          "folder)")
    man.add_argument("--split-name", default="train", help="subfolder of --out for the shards (default train)")
    man.add_argument("--num-frames", type=positive_int, default=DEFAULT_NUM_FRAMES,
                     help=f"frames sampled from each video's frame folder (default {DEFAULT_NUM_FRAMES})")
    add_shard_size_args(man)

    mmeb = sub.add_parser("mmeb-train", help="VLM2Vec-V2's training data (MMEB-train, visual documents, video) "
                                             "to one instruction-pair split per subset")
    mmeb_train.add_arguments(mmeb)
    return parser


def _check_out(parser: argparse.ArgumentParser, out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        parser.error(f"--out {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            parser.error(f"--out {str(out)!r} exists and is not empty; pass --overwrite to replace its shards")
        # Remove only what this tool writes, so a mistyped --out never wipes unrelated files.
        for split in SPLITS:
            split_dir = out / split
            if split_dir.is_dir():
                for old in [*split_dir.glob("shard-*.tar"), split_dir / MANIFEST]:
                    old.unlink(missing_ok=True)


def synthetic_samples(
    n: int, rng: random.Random, used: set[str], image_size: int, image_format: str
) -> Iterator[dict[str, Any]]:
    """Yield ``n`` encoded samples whose captions are not in ``used`` (which is updated).

    Raises:
        RuntimeError: When no unused caption turns up after many redraws.
    """
    for index in range(n):
        for _ in range(MAX_TRIES):
            image, caption, meta = make_scene(rng, image_size)
            if caption not in used:
                break
        else:
            raise RuntimeError(f"no unused caption after {MAX_TRIES} draws at sample {index}; ask for fewer samples")
        used.add(caption)
        yield {"__key__": f"{index:09d}", image_format: _encode_image(image, image_format), "txt": caption, "json": meta}


def _encode_image(image: Any, image_format: str) -> bytes:
    buf = io.BytesIO()
    if image_format == "png":
        image.save(buf, format="PNG", compress_level=1)  # level 1: ~3x faster, a few % larger
    else:
        image.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def compositional_samples(
    n: int, tasks: tuple[str, ...], rng: random.Random, used: set[str], image_size: int, image_format: str
) -> Iterator[dict[str, Any]]:
    """Yield ``n`` encoded samples of contrast groups (``tools/synthetic_tasks.py``), keyed ``<kind>-<group>-<member>``."""
    for key, image, text, meta in task_samples(n, tasks, rng, used, image_size):
        yield {"__key__": key, image_format: _encode_image(image, image_format), "txt": text, "json": meta}


def run_synthetic(args: argparse.Namespace) -> None:
    """Write the synthetic train/val/test splits with captions (with ``--tasks``: contrast groups)
    unique within and across splits."""
    sizes = {"train": args.train, "val": args.val, "test": args.test}
    if args.tasks is not None:
        # Whole groups per block, and blocks never split between shards, so that a batch read in
        # file order holds every group's hard negatives.
        for name, value in (*sizes.items(), ("samples-per-shard", args.samples_per_shard)):
            if value % BLOCK:
                raise RuntimeError(f"--{name} {value} is not a multiple of {BLOCK}, which --tasks needs")
        if args.shard_bytes is not None:
            raise RuntimeError("--shard-bytes cannot be used with --tasks: a shard closed by size could split a "
                               "contrast group; use --samples-per-shard")
    used: set[str] = set()
    # Test first, then val, then train: each split avoids every caption already taken, so the
    # held-out splits keep the same scenes when only --train changes.
    for split in ("test", "val", "train"):
        start = time.perf_counter()
        rng = random.Random(f"{args.seed}-{split}")
        meta = {"split": split, "source": "synthetic", "seed": args.seed, "image_size": args.image_size}
        if args.tasks is None:
            samples = synthetic_samples(sizes[split], rng, used, args.image_size, args.format)
        else:
            samples = compositional_samples(sizes[split], args.tasks, rng, used, args.image_size, args.format)
            meta["tasks"] = list(args.tasks)
        manifest = write_split(args.out / split, samples, args.samples_per_shard, meta, args.shard_bytes)
        print(
            f"{split}: {manifest['num_samples']} samples in {len(manifest['shards'])} shards "
            f"-> {args.out / split} ({time.perf_counter() - start:.1f}s)"
        )


# --------------------------------------------------------------------------------- keys and files


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


def _finish(split_dir: Path, manifest: dict[str, Any], skips: Skips, start: float) -> None:
    print(f"{manifest['split']}: {manifest['num_samples']} samples in {len(manifest['shards'])} shards "
          f"-> {split_dir} ({time.perf_counter() - start:.1f}s)")
    print(skips.report())


# --------------------------------------------------------------------------------- folder


def _folder_images(src: Path) -> Iterator[tuple[str, str, Path]]:
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
    for relative, ext, image_path in _folder_images(src):
        stem = relative.rsplit(".", 1)[0]
        if keep is not None and not keep(stem):
            continue
        caption, reason = _read_caption(image_path.with_suffix(".txt"))
        if reason is None:
            data, reason = read_image(image_path)
        if reason is not None:
            skips.add(reason, relative)
            continue
        yield {"__key__": _unique_key(stem, taken), ext: data, "txt": caption, "json": {"source": relative}}


def _folder_splits(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, float] | None:
    """``{split: fraction}`` of the splits to write when a fraction is given (None: one split).

    Raises:
        DataError: When a split would get none of the images found (before anything is written).
    """
    if args.val_fraction is None and args.test_fraction is None:
        return None
    if args.split_name is not None:
        parser.error("--split-name cannot be combined with --val-fraction/--test-fraction, "
                     "which write OUT/train/, OUT/val/ and OUT/test/")
    val, test = args.val_fraction or 0.0, args.test_fraction or 0.0
    if val + test >= 1:
        parser.error(f"--val-fraction {val} and --test-fraction {test} leave nothing for train: their sum must be "
                     "below 1")
    fractions = {"train": 1 - val - test, "val": val, "test": test}
    found = Counter(split_of(relative.rsplit(".", 1)[0], val, test) for relative, _, _ in _folder_images(args.src))
    total = sum(found.values())
    for split, share in fractions.items():
        if share > 0 and total and not found[split]:
            flag = "--val-fraction and --test-fraction" if split == "train" else f"--{split}-fraction"
            raise DataError(f"the {split} split gets none of the {total} images in --src {str(args.src)!r} "
                            f"(its share is {share:.3g}); change {flag} or add images")
    return {split: share for split, share in fractions.items() if share > 0}


def run_folder(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Shard a folder of images with same-named caption files: one split, or train/val/test by fraction."""
    if not args.src.is_dir():
        parser.error(f"--src {str(args.src)!r} is not a directory")
    splits = _folder_splits(args, parser)
    names = [args.split_name or "train"] if splits is None else list(splits)
    # Every split's folder is checked before any is touched, so a refusal costs no shards.
    stale = [old for name in names for old in check_split_dir(args.out, name, args.overwrite)]
    for old in stale:
        old.unlink(missing_ok=True)
    for name in names:
        start = time.perf_counter()
        skips = Skips()
        meta = {"split": name, "source": "folder", "src": str(args.src.resolve()), "kind": "image-text"}
        keep = None
        if splits is not None:
            val, test = splits.get("val", 0.0), splits.get("test", 0.0)
            meta["split_by"] = {"hash": "sha1 of the image path relative to src, without extension",
                                "val_fraction": val, "test_fraction": test}
            keep = functools.partial(_in_split, split=name, val_fraction=val, test_fraction=test)
        split_dir = args.out / name
        try:
            manifest = write_split(split_dir, folder_samples(args.src, skips, keep), args.samples_per_shard,
                                   meta, args.shard_bytes, skips)
        except EmptySplitError:
            where = "" if splits is None else f" for the {name} split"
            raise DataError(f"--src {str(args.src)!r}: no image with a caption file was found{where}\n"
                            f"{skips.report()}") from None
        _finish(split_dir, manifest, skips, start)


def _in_split(stem: str, split: str, val_fraction: float, test_fraction: float) -> bool:
    return split_of(stem, val_fraction, test_fraction) == split


# --------------------------------------------------------------------------------- manifest


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
                    raise DataError(f"{path}:1: the header names neither the columns 'image' and 'text' nor "
                                    f"instruction-pair fields ({', '.join(SIDE_FIELDS)}); it has "
                                    f"{reader.fieldnames}")
                for row in reader:
                    if None in row:
                        raise DataError(f"{path}:{reader.line_num}: more fields than the header's "
                                        f"{len(reader.fieldnames)}")
                    if any(v is None for v in row.values()):
                        raise DataError(f"{path}:{reader.line_num}: fewer fields than the header's "
                                        f"{len(reader.fieldnames)}")
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
    side = {"instruction": (_optional_str(row, f"{prefix}instruction", where) or "").strip(),
            "text": (_optional_str(row, f"{prefix}text", where) or "").strip(),
            "image": _optional_str(row, f"{prefix}image", where) or None,
            "video": _optional_str(row, f"{prefix}video", where) or None}
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
            raise DataError(f"{where}: negatives[{i}] must be a string or an object with 'text', 'image', 'video' "
                            f"and/or 'instruction', got {item!r}")
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
                raise DataError(f"{where}: missing column {column!r} (the file's first row made it an image-text "
                                f"manifest; the row has {sorted(row)})")
        image = _optional_str(row, "image", where)
        if not image:
            raise DataError(f"{where}: 'image' is empty; give the image's path")
        text = _optional_str(row, "text", where) or ""
        extra = {k: v for k, v in row.items() if k not in ("image", "text")}
        return {"image": image, "text": text.strip(), "extra": extra}
    return {"query": _side(row, "query_", where), "target": _side(row, "target_", where),
            "negatives": _negatives(row, where, from_csv)}


def _row_kind(row: dict[str, Any], where: str) -> str:
    if any(field in row for field in SIDE_FIELDS):
        return "instruction"
    if "image" in row or "text" in row:
        return "image-text"
    raise DataError(f"{where}: a row needs the columns 'image' and 'text', or instruction-pair fields "
                    f"({', '.join(SIDE_FIELDS)}); it has {sorted(row)}")


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
        yield {"__key__": f"{index:09d}", ext: data, "txt": parsed["text"],
               "json": {"source": parsed["image"], **parsed["extra"]}}


def _frames(folder: str | None, root: Path, num_frames: int) -> list[str] | None:
    """The sampled frames of a frame folder, as paths relative to ``root`` (absolute if the folder is)."""
    if folder is None:
        return None
    return [(Path(folder) / frame.name).as_posix()
            for frame in sample_frames(list_frames(root / folder), num_frames)]


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
            PairSide(side["instruction"], side["text"], side["image"], video) for side, video in zip(sides, videos, strict=True)
        ]
        source = {"query_image": parsed["query"]["image"], "query_video": parsed["query"]["video"],
                  "target_image": parsed["target"]["image"], "target_video": parsed["target"]["video"],
                  "negatives": [{"image": n["image"], "video": n["video"]} for n in parsed["negatives"]]}
        yield PairRow(f"{index:09d}", query, target, negatives, source)


def run_manifest(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Shard the rows of a JSONL/CSV manifest (image-text pairs or instruction pairs)."""
    if not args.manifest.is_file():
        parser.error(f"--manifest {str(args.manifest)!r} is not a file")
    root = args.image_root if args.image_root is not None else args.manifest.parent
    if not root.is_dir():
        parser.error(f"--image-root {str(root)!r} is not a directory")
    stale = check_split_dir(args.out, args.split_name, args.overwrite)
    start = time.perf_counter()
    kind, rows = validate_manifest(args.manifest)
    for old in stale:
        old.unlink(missing_ok=True)
    skips = Skips()
    meta = {"split": args.split_name, "source": "manifest", "src": str(args.manifest.resolve()),
            "kind": "image-text" if kind == "image-text" else "instruction-pairs", "rows": rows}
    split_dir = args.out / args.split_name
    try:
        if kind == "image-text":
            manifest = write_split(split_dir, image_text_samples(args.manifest, root, skips),
                                   args.samples_per_shard, meta, args.shard_bytes, skips)
        else:
            meta["num_frames"] = args.num_frames
            manifest = write_pairs(pair_rows(args.manifest, root, args.num_frames, skips), split_dir,
                                   image_root=root, samples_per_shard=args.samples_per_shard,
                                   shard_bytes=args.shard_bytes, meta=meta, skips=skips)
    except EmptySplitError:
        raise DataError(f"{args.manifest}: every one of its {rows} rows was skipped\n{skips.report()}") from None
    _finish(split_dir, manifest, skips, start)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status (bad arguments or input exit with status 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "synthetic":
        _check_out(parser, args.out, args.overwrite)
        try:
            run_synthetic(args)
        except RuntimeError as err:
            parser.error(str(err))
    else:
        try:
            if args.command == "folder":
                run_folder(args, parser)
            elif args.command == "mmeb-train":
                mmeb_train.run(args)
            else:
                run_manifest(args, parser)
        except DataError as err:
            parser.error(str(err))
    return 0


if __name__ == "__main__":
    sys.exit(main())

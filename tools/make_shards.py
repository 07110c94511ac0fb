"""Write WebDataset shards: image-caption pairs (img2dataset layout) or instruction pairs.

Shards go to ``OUT/<split>/shard-000000.tar ...`` with ``OUT/<split>/manifest.json`` beside
them: ``{"num_samples": N, "shards": [{"url": "shard-000000.tar", "num_samples": n}, ...], ...}``
plus provenance fields. The datamodule reads it for its epoch length and progress bars.

    python tools/make_shards.py synthetic --out data/synthetic
    python tools/make_shards.py folder --src photos/ --out data/photos [--split-name train]
    python tools/make_shards.py manifest --manifest pairs.jsonl --out data/pairs [--image-root imgs/]

Subcommands:
    synthetic   coloured shapes on a 3x3 grid with plain-words captions (tools/synthetic_scenes.py);
                writes train/, val/ and test/. With ``--tasks caption,count,relation,binding``:
                contrast groups of compositional statements instead (tools/synthetic_tasks.py),
                keyed ``<kind>-<group>-<member>``, the kind and the group's statements in KEY.json
    folder      images with same-named caption files, found recursively: ``a/b/cat1.jpg`` +
                ``a/b/cat1.txt``; an image without a caption, or with an empty one, is skipped
    manifest    a JSONL or CSV file of image-text rows or of instruction pairs (see below)

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

Manifest input: a ``.jsonl`` file (one JSON object per line, blank lines ignored) or a ``.csv``
file (a header row, then one row per sample). Image paths are relative to ``--image-root``,
which defaults to the manifest's folder; absolute paths are kept. A sample's key is its 0-based
data-row index as 9 digits (``000000041``), skipped rows included, so a key leads back to its
row. ``folder`` keys are the relative path without extension, ``/`` as ``__`` and other
characters outside ``[A-Za-z0-9_-]`` as ``_``. The first row (a CSV's header) decides the kind
of the whole file:
    image-text          columns ``image`` and ``text``
    instruction pairs   any of ``query_text``, ``query_image``, ``target_text``,
                        ``target_image``; plus optional ``query_instruction`` and ``negatives``
A row whose image file is missing, or whose caption is empty, is skipped and counted; a
malformed row (bad JSON, a missing column, a wrong type) stops the tool before anything is
written, with the file and line number.

Instruction-pair layout, one sample per pair (member names are ``KEY.`` + the names below):
    json            UTF-8 JSON object, always with every field below:
        "query_instruction": str   ("" when the row has none)
        "query_text":        str   ("" when the row has none)
        "query_image":       str | null   member holding the query image, e.g. "query.jpg"
        "target_text":       str   ("" when the row has none)
        "target_image":      str | null   member holding the target image, e.g. "target.png"
        "negatives":         list of {"text": str, "image": str | null}, possibly empty;
                             "image" names the member holding that negative's image
        "source":            {"query_image": path | null, "target_image": path | null,
                              "negatives": [path | null, ...]}  (paths as in the manifest)
    query.<ext>     the query image's bytes, when the row has one
    target.<ext>    the target image's bytes, when the row has one
    neg<i>.<ext>    the image of negative ``i`` (0-based), when it has one
A reader gets the sample as ``{"json": ..., "query.jpg": bytes, ...}`` (WebDataset splits a
member name at its first dot) and looks the images up by the names the JSON gives. Each side
(query, target, each negative) has a non-empty text, an image, or both. ``negatives`` is a list
whose items are a string (a text negative) or an object with ``text`` and/or ``image``; in a
CSV it is a JSON-encoded list in one cell (an empty cell means none). ``ext`` is as above.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:
    from tools.synthetic_scenes import make_scene
    from tools.synthetic_tasks import BLOCK, TASKS, parse_tasks, task_samples
except ImportError:  # run as a script: tools/ is on sys.path, the repository root may not be
    from synthetic_scenes import make_scene
    from synthetic_tasks import BLOCK, TASKS, parse_tasks, task_samples

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
# Redraws allowed per sample before giving up on finding an unused caption.
MAX_TRIES = 1000
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
INSTRUCTION_FIELDS = ("query_text", "query_image", "target_text", "target_image")
# tarfile's USTAR headers hold at most 100 characters of member name; keep "KEY.neg12.jpeg" within that.
MAX_KEY_LENGTH = 80
# A tar file ends with two zero blocks, then is padded to a multiple of a 10240-byte record.
TAR_BLOCK = 512
# Per member: a PAX extended header (one header block, one data block; tarfile writes it because
# webdataset stamps members with a fractional mtime), then the member's own header block.
TAR_HEADER = 3 * TAR_BLOCK
TAR_END = 2 * TAR_BLOCK + 10240
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class DataError(Exception):
    """Input the tool cannot turn into shards; the message names the file (and line)."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _task_list(text: str) -> tuple[str, ...]:
    try:
        return parse_tasks(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def parse_bytes(text: str) -> int:
    """A size such as ``500MB``, ``1.5GB``, ``64KiB`` or ``4096`` in bytes.

    Raises:
        argparse.ArgumentTypeError: When the text is not a positive size.
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"expected a size such as 500MB, 1GB or 4096, got {text!r}")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive size, got {text!r}")
    return value


def _add_shard_size_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--samples-per-shard", type=_positive_int, default=1000,
                        help="most samples per tar shard (default 1000)")
    parser.add_argument("--shard-bytes", type=parse_bytes, default=None,
                        help="most bytes per tar shard file, e.g. 500MB or 1GB (default: no limit)")
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in the output folder")


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser, one subcommand per data source."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    syn = sub.add_parser("synthetic", help="coloured-shape scenes with unique plain-words captions")
    syn.add_argument("--out", required=True, type=Path, help="output directory (gets train/, val/, test/)")
    syn.add_argument("--train", type=_positive_int, default=6000, help="training samples (default 6000)")
    syn.add_argument("--val", type=_positive_int, default=256, help="validation samples (default 256)")
    syn.add_argument("--test", type=_positive_int, default=256, help="test samples (default 256)")
    syn.add_argument("--image-size", type=_positive_int, default=112, help="square image side in pixels (default 112)")
    syn.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same shards")
    syn.add_argument("--format", choices=("png", "jpg"), default="png", help="image encoding (default png)")
    syn.add_argument("--tasks", type=_task_list, default=None,
                     help="write the compositional set instead of plain captions: contrast groups of these tasks, "
                          f"comma-separated, from {','.join(TASKS)} (tools/synthetic_tasks.py); sample counts and "
                          f"--samples-per-shard must then be multiples of {BLOCK}")
    _add_shard_size_args(syn)

    folder = sub.add_parser("folder", help="images with same-named caption files (a/b/cat1.jpg + a/b/cat1.txt)")
    folder.add_argument("--src", required=True, type=Path, help="folder searched recursively for images")
    folder.add_argument("--out", required=True, type=Path, help="output directory (gets SPLIT_NAME/)")
    folder.add_argument("--split-name", default="train", help="subfolder of --out for the shards (default train)")
    _add_shard_size_args(folder)

    man = sub.add_parser("manifest", help="a JSONL/CSV of image-text rows or instruction pairs")
    man.add_argument("--manifest", required=True, type=Path, help="the .jsonl or .csv file")
    man.add_argument("--out", required=True, type=Path, help="output directory (gets SPLIT_NAME/)")
    man.add_argument("--image-root", type=Path, default=None,
                     help="folder that relative image paths start from (default: the manifest's folder)")
    man.add_argument("--split-name", default="train", help="subfolder of --out for the shards (default train)")
    _add_shard_size_args(man)
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


def _check_split_dir(parser: argparse.ArgumentParser, out: Path, split: str, overwrite: bool) -> list[Path]:
    """Refuse a non-empty output folder without ``--overwrite``; return the old files to remove.

    The removal is left to the caller, after the input is validated, so a bad manifest never
    costs the shards already there.
    """
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", split) or split in (".", ".."):
        parser.error(f"--split-name {split!r} must be a plain folder name")
    if out.exists() and not out.is_dir():
        parser.error(f"--out {str(out)!r} exists and is not a directory")
    split_dir = out / split
    if split_dir.exists() and not split_dir.is_dir():
        parser.error(f"{str(split_dir)!r} exists and is not a directory")
    if split_dir.is_dir() and any(split_dir.iterdir()):
        if not overwrite:
            parser.error(f"--out {str(out)!r} already holds {str(split_dir)!r} and it is not empty; "
                         "pass --overwrite to replace its shards")
        return [*split_dir.glob("shard-*.tar"), split_dir / MANIFEST]
    return []


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


def _tar_bytes(sample: dict[str, bytes]) -> int:
    """Most bytes a sample's members take in a tar file: headers, then data padded to 512 bytes."""
    return sum(TAR_HEADER + -(-len(v) // TAR_BLOCK) * TAR_BLOCK for k, v in sample.items() if not k.startswith("__"))


def write_split(
    split_dir: Path,
    samples: Iterator[dict[str, Any]],
    samples_per_shard: int,
    meta: dict[str, Any],
    shard_bytes: int | None = None,
) -> dict[str, Any]:
    """Write samples to ``split_dir/shard-%06d.tar`` and the split's manifest; return the manifest.

    Args:
        split_dir: Output folder (created).
        samples: WebDataset sample dicts (``__key__`` plus one value per member).
        samples_per_shard: Most samples per shard.
        meta: Extra fields for ``manifest.json``.
        shard_bytes: Most bytes per shard file; a sample larger than that gets a shard of its own.

    Raises:
        DataError: When ``samples`` yields nothing (no empty shard is left behind).
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
            # without tar headers; rolling over here keeps every file within --shard-bytes.
            if shard_bytes is not None and counts.get(Path(sink.fname).name, 0) > 0:
                used = sink.tarstream.tarstream.offset  # bytes written to this shard so far, headers included
                if used + _tar_bytes(encoded) + TAR_END > shard_bytes:
                    sink.next_stream()
            sink.write(encoded)
            # ShardWriter rolls over on count or size; its current file name tells which shard got it.
            name = Path(sink.fname).name
            counts[name] = counts.get(name, 0) + 1
    if not counts:
        (split_dir / "shard-000000.tar").unlink(missing_ok=True)
        raise DataError("no sample to write")
    manifest = {
        **meta,
        "num_samples": sum(counts.values()),
        "shards": [{"url": name, "num_samples": c} for name, c in counts.items()],
    }
    (split_dir / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


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


def _image_extension(path: str) -> str | None:
    ext = path.rsplit(".", 1)[-1].lower() if "." in os.path.basename(path) else ""
    return ext if ext in IMAGE_EXTENSIONS else None


def _read_image(path: Path) -> tuple[bytes | None, str | None]:
    """The file's bytes, or ``(None, reason)`` when it is missing, unreadable or empty."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, "missing_image"
    except OSError:
        return None, "unreadable_image"
    return (data, None) if data else (None, "empty_image")


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


class Skips:
    """Skipped samples counted by reason, with the first few examples of each."""

    def __init__(self, examples: int = 3) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}
        self.max_examples = examples

    def add(self, reason: str, where: str) -> None:
        """Count one skipped sample; ``where`` says which (a path, or file:line)."""
        self.counts[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < self.max_examples:
            shown.append(where)

    def report(self) -> str:
        """One line per reason, e.g. ``missing_caption: 3 (e.g. a/b.jpg, ...)``."""
        if not self.counts:
            return "skipped: 0"
        lines = [f"skipped: {sum(self.counts.values())}"]
        for reason, n in sorted(self.counts.items()):
            lines.append(f"  {reason}: {n} (e.g. {', '.join(self.examples[reason])})")
        return "\n".join(lines)


# --------------------------------------------------------------------------------- folder


def folder_samples(src: Path, skips: Skips) -> Iterator[dict[str, Any]]:
    """Image-caption samples from ``src``, walked recursively in sorted order.

    Args:
        src: Folder holding ``NAME.<jpg|jpeg|png|webp>`` beside ``NAME.txt``.
        skips: Receives the images skipped (no caption, empty caption, unreadable or empty file).
    """
    taken: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames.sort()  # os.walk's order is the file system's; sorting makes runs reproducible
        for name in sorted(filenames):
            ext = _image_extension(name)
            if ext is None or name.startswith("."):
                continue
            image_path = Path(dirpath) / name
            relative = image_path.relative_to(src).as_posix()
            caption, reason = _read_caption(image_path.with_suffix(".txt"))
            if reason is None:
                data, reason = _read_image(image_path)
            if reason is not None:
                skips.add(reason, relative)
                continue
            key = _unique_key(relative.rsplit(".", 1)[0], taken)
            yield {"__key__": key, ext: data, "txt": caption, "json": {"source": relative}}


def run_folder(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Shard a folder of images with same-named caption files."""
    if not args.src.is_dir():
        parser.error(f"--src {str(args.src)!r} is not a directory")
    stale = _check_split_dir(parser, args.out, args.split_name, args.overwrite)
    for old in stale:
        old.unlink(missing_ok=True)
    start = time.perf_counter()
    skips = Skips()
    meta = {"split": args.split_name, "source": "folder", "src": str(args.src.resolve()), "kind": "image-text"}
    split_dir = args.out / args.split_name
    try:
        manifest = write_split(split_dir, folder_samples(args.src, skips), args.samples_per_shard,
                               meta, args.shard_bytes)
    except DataError:
        raise DataError(f"--src {str(args.src)!r}: no image with a caption file was found\n{skips.report()}") from None
    _finish(split_dir, manifest, skips, start)


def _finish(split_dir: Path, manifest: dict[str, Any], skips: Skips, start: float) -> None:
    manifest["skipped"] = dict(sorted(skips.counts.items()))
    (split_dir / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"{manifest['split']}: {manifest['num_samples']} samples in {len(manifest['shards'])} shards "
          f"-> {split_dir} ({time.perf_counter() - start:.1f}s)")
    print(skips.report())


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
    try:
        if suffix == ".jsonl":
            with open(path, "rb") as f:
                for line_no, raw in enumerate(f, 1):
                    try:
                        line = raw.decode("utf-8")
                    except UnicodeDecodeError:
                        raise DataError(f"{path}:{line_no}: not UTF-8 text") from None
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise DataError(f"{path}:{line_no}: not valid JSON ({err.msg}, column {err.colno})") from None
                    if not isinstance(row, dict):
                        raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}")
                    yield line_no, row
            return
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            try:
                if reader.fieldnames is None:
                    raise DataError(f"{path}:1: empty file; expected a header row")
                header = set(reader.fieldnames)
                if not ({"image", "text"} <= header or header & set(INSTRUCTION_FIELDS)):
                    raise DataError(f"{path}:1: the header names neither the columns 'image' and 'text' nor "
                                    f"instruction-pair fields ({', '.join(INSTRUCTION_FIELDS)}); it has "
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


def _negatives(row: dict[str, Any], where: str, from_csv: bool) -> list[dict[str, str | None]]:
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
        if not isinstance(item, dict) or set(item) - {"text", "image"}:
            raise DataError(f"{where}: negatives[{i}] must be a string or an object with 'text' and/or 'image', "
                            f"got {item!r}")
        text = _optional_str(item, "text", f"{where}: negatives[{i}]") or ""
        image = _optional_str(item, "image", f"{where}: negatives[{i}]") or None
        if not text.strip() and image is None:
            raise DataError(f"{where}: negatives[{i}] has neither a text nor an image")
        out.append({"text": text.strip(), "image": image})
    return out


def parse_row(row: dict[str, Any], kind: str, where: str, from_csv: bool) -> dict[str, Any]:
    """Check one manifest row and normalise it.

    Returns:
        For ``image-text``: ``{"image", "text", "extra"}``; for ``instruction``:
        ``{"query_instruction", "query_text", "query_image", "target_text", "target_image", "negatives"}``.

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
    parsed: dict[str, Any] = {"query_instruction": (_optional_str(row, "query_instruction", where) or "").strip()}
    for field in INSTRUCTION_FIELDS:
        value = _optional_str(row, field, where)
        parsed[field] = (value or "").strip() if field.endswith("_text") else (value or None)
    parsed["negatives"] = _negatives(row, where, from_csv)
    return parsed


def _row_kind(row: dict[str, Any], where: str) -> str:
    if any(field in row for field in INSTRUCTION_FIELDS):
        return "instruction"
    if "image" in row or "text" in row:
        return "image-text"
    raise DataError(f"{where}: a row needs the columns 'image' and 'text', or instruction-pair fields "
                    f"({', '.join(INSTRUCTION_FIELDS)}); it has {sorted(row)}")


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


def _load_images(
    named: dict[str, str | None], root: Path, where: str, skips: Skips
) -> dict[str, tuple[str, bytes]] | None:
    """``{member stem: (ext, bytes)}`` for each image path given, or None (counted) if any is unusable."""
    loaded = {}
    for stem, path in named.items():
        if path is None:
            continue
        ext = _image_extension(path)
        if ext is None:
            skips.add("unsupported_image_type", f"{where} ({path})")
            return None
        data, reason = _read_image(root / path)
        if reason is not None:
            skips.add(reason, f"{where} ({path})")
            return None
        loaded[stem] = (ext, data)
    return loaded


def manifest_samples(path: Path, kind: str, root: Path, skips: Skips) -> Iterator[dict[str, Any]]:
    """Samples from a validated manifest, in file order; the key is the 0-based data-row index."""
    from_csv = path.suffix.lower() == ".csv"
    for index, (line_no, row) in enumerate(manifest_rows(path)):
        where = f"{path}:{line_no}"
        parsed = parse_row(row, kind, where, from_csv)
        key = f"{index:09d}"
        if kind == "image-text":
            if not parsed["text"]:
                skips.add("empty_caption", where)
                continue
            images = _load_images({"image": parsed["image"]}, root, where, skips)
            if images is None:
                continue
            ext, data = images["image"]
            yield {"__key__": key, ext: data, "txt": parsed["text"],
                   "json": {"source": parsed["image"], **parsed["extra"]}}
            continue
        if not parsed["query_text"] and parsed["query_image"] is None:
            skips.add("empty_query", where)
            continue
        if not parsed["target_text"] and parsed["target_image"] is None:
            skips.add("empty_target", where)
            continue
        negatives = parsed["negatives"]
        named = {"query": parsed["query_image"], "target": parsed["target_image"]}
        named.update({f"neg{i}": neg["image"] for i, neg in enumerate(negatives)})
        images = _load_images(named, root, where, skips)
        if images is None:
            continue
        member = {stem: f"{stem}.{ext}" for stem, (ext, _) in images.items()}
        record = {
            "query_instruction": parsed["query_instruction"],
            "query_text": parsed["query_text"],
            "query_image": member.get("query"),
            "target_text": parsed["target_text"],
            "target_image": member.get("target"),
            "negatives": [{"text": neg["text"], "image": member.get(f"neg{i}")} for i, neg in enumerate(negatives)],
            "source": {"query_image": parsed["query_image"], "target_image": parsed["target_image"],
                       "negatives": [neg["image"] for neg in negatives]},
        }
        yield {"__key__": key, "json": record, **{member[stem]: data for stem, (_, data) in images.items()}}


def run_manifest(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Shard the rows of a JSONL/CSV manifest (image-text pairs or instruction pairs)."""
    if not args.manifest.is_file():
        parser.error(f"--manifest {str(args.manifest)!r} is not a file")
    root = args.image_root if args.image_root is not None else args.manifest.parent
    if not root.is_dir():
        parser.error(f"--image-root {str(root)!r} is not a directory")
    stale = _check_split_dir(parser, args.out, args.split_name, args.overwrite)
    start = time.perf_counter()
    kind, rows = validate_manifest(args.manifest)
    for old in stale:
        old.unlink(missing_ok=True)
    skips = Skips()
    meta = {"split": args.split_name, "source": "manifest", "src": str(args.manifest.resolve()),
            "kind": "image-text" if kind == "image-text" else "instruction-pairs", "rows": rows}
    split_dir = args.out / args.split_name
    try:
        manifest = write_split(split_dir, manifest_samples(args.manifest, kind, root, skips),
                               args.samples_per_shard, meta, args.shard_bytes)
    except DataError:
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
            else:
                run_manifest(args, parser)
        except DataError as err:
            parser.error(str(err))
    return 0


if __name__ == "__main__":
    sys.exit(main())

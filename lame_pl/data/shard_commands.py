"""What each ``tools/make_shards.py`` subcommand does once its arguments are parsed (``lame_pl.data.shards_cli``).

``synthetic`` draws the demo's scenes or the compositional contrast groups (``lame_pl.synthetic``),
``folder`` shards images with caption files, one split or train/val/test by a hash of each path,
``manifest`` shards a JSONL/CSV of image-text rows or instruction pairs; ``mmeb-train`` lives in
``lame_pl.data.mmeb_train``. Each written split prints one line.
"""

from __future__ import annotations

import argparse
import functools
import io
import random
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lame_pl.data.image_text import folder_images, folder_samples, pair_sample, split_of
from lame_pl.data.instruction_pairs import write_pairs
from lame_pl.data.manifest import image_text_samples, pair_rows, validate_manifest
from lame_pl.data.shard_args import check_split_dir
from lame_pl.data.shard_writer import DataError, EmptySplitError, write_split
from lame_pl.data.skips import Skips
from lame_pl.synthetic.scenes import make_scene
from lame_pl.synthetic.tasks import BLOCK, task_samples

# Redraws allowed per sample before giving up on finding an unused caption.
MAX_TRIES = 1000


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
        yield pair_sample(f"{index:09d}", image_format, _encode_image(image, image_format), caption, meta)


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
    """Yield ``n`` encoded samples of contrast groups (``lame_pl/synthetic/tasks.py``), keyed ``<kind>-<group>-<member>``."""
    for key, image, text, meta in task_samples(n, tasks, rng, used, image_size):
        yield pair_sample(key, image_format, _encode_image(image, image_format), text, meta)


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
            raise RuntimeError(
                "--shard-bytes cannot be used with --tasks: a shard closed by size could split a "
                "contrast group; use --samples-per-shard"
            )
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
        _written(args.out / split, manifest, start)


def _written(split_dir: Path, manifest: dict[str, Any], start: float) -> None:
    """The one line each written split prints: its samples, shards, folder and time."""
    print(
        f"{manifest['split']}: {manifest['num_samples']} samples in {len(manifest['shards'])} shards "
        f"-> {split_dir} ({time.perf_counter() - start:.1f}s)"
    )


def _finish(split_dir: Path, manifest: dict[str, Any], skips: Skips, start: float) -> None:
    _written(split_dir, manifest, start)
    print(skips.report())


# --------------------------------------------------------------------------------- folder


def _folder_splits(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, float] | None:
    """``{split: fraction}`` of the splits to write when a fraction is given (None: one split).

    Raises:
        DataError: When a split would get none of the images found (before anything is written).
    """
    if args.val_fraction is None and args.test_fraction is None:
        return None
    if args.split_name is not None:
        parser.error(
            "--split-name cannot be combined with --val-fraction/--test-fraction, "
            "which write OUT/train/, OUT/val/ and OUT/test/"
        )
    val, test = args.val_fraction or 0.0, args.test_fraction or 0.0
    if val + test >= 1:
        parser.error(
            f"--val-fraction {val} and --test-fraction {test} leave nothing for train: their sum must be below 1"
        )
    fractions = {"train": 1 - val - test, "val": val, "test": test}
    found = Counter(split_of(relative.rsplit(".", 1)[0], val, test) for relative, _, _ in folder_images(args.src))
    total = sum(found.values())
    for split, share in fractions.items():
        if share > 0 and total and not found[split]:
            flag = "--val-fraction and --test-fraction" if split == "train" else f"--{split}-fraction"
            raise DataError(
                f"the {split} split gets none of the {total} images in --src {str(args.src)!r} "
                f"(its share is {share:.3g}); change {flag} or add images"
            )
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
            meta["split_by"] = {
                "hash": "sha1 of the image path relative to src, without extension",
                "val_fraction": val,
                "test_fraction": test,
            }
            keep = functools.partial(_in_split, split=name, val_fraction=val, test_fraction=test)
        split_dir = args.out / name
        try:
            manifest = write_split(
                split_dir, folder_samples(args.src, skips, keep), args.samples_per_shard, meta, args.shard_bytes, skips
            )
        except EmptySplitError:
            where = "" if splits is None else f" for the {name} split"
            raise DataError(
                f"--src {str(args.src)!r}: no image with a caption file was found{where}\n{skips.report()}"
            ) from None
        _finish(split_dir, manifest, skips, start)


def _in_split(stem: str, split: str, val_fraction: float, test_fraction: float) -> bool:
    return split_of(stem, val_fraction, test_fraction) == split


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
    meta = {
        "split": args.split_name,
        "source": "manifest",
        "src": str(args.manifest.resolve()),
        "kind": "image-text" if kind == "image-text" else "instruction-pairs",
        "rows": rows,
    }
    split_dir = args.out / args.split_name
    try:
        if kind == "image-text":
            manifest = write_split(
                split_dir,
                image_text_samples(args.manifest, root, skips),
                args.samples_per_shard,
                meta,
                args.shard_bytes,
                skips,
            )
        else:
            meta["num_frames"] = args.num_frames
            manifest = write_pairs(
                pair_rows(args.manifest, root, args.num_frames, skips),
                split_dir,
                image_root=root,
                samples_per_shard=args.samples_per_shard,
                shard_bytes=args.shard_bytes,
                meta=meta,
                skips=skips,
            )
    except EmptySplitError:
        raise DataError(f"{args.manifest}: every one of its {rows} rows was skipped\n{skips.report()}") from None
    _finish(split_dir, manifest, skips, start)

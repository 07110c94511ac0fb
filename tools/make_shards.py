"""Write WebDataset shards of image-caption pairs in the img2dataset layout.

Each sample is ``KEY.png`` (or ``KEY.jpg``), ``KEY.txt`` (the caption) and ``KEY.json``
(metadata). Shards go to ``OUT/<split>/shard-000000.tar ...`` with ``OUT/<split>/manifest.json``
giving the samples per shard and the total, which the datamodule reads for its epoch length.

    python tools/make_shards.py synthetic --out data/synthetic

Subcommands:
    synthetic   coloured shapes on a 3x3 grid with plain-words captions (tools/synthetic_scenes.py)
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:
    from tools.synthetic_scenes import make_scene
except ImportError:  # run as a script: tools/ is on sys.path, the repository root may not be
    from synthetic_scenes import make_scene

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
# Redraws allowed per sample before giving up on finding an unused caption.
MAX_TRIES = 1000


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


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
    syn.add_argument("--samples-per-shard", type=_positive_int, default=1000, help="samples per tar shard (default 1000)")
    syn.add_argument("--format", choices=("png", "jpg"), default="png", help="image encoding (default png)")
    syn.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
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
        buf = io.BytesIO()
        if image_format == "png":
            image.save(buf, format="PNG", compress_level=1)  # level 1: ~3x faster, a few % larger
        else:
            image.save(buf, format="JPEG", quality=95)
        yield {"__key__": f"{index:09d}", image_format: buf.getvalue(), "txt": caption, "json": meta}


def write_split(split_dir: Path, samples: Iterator[dict[str, Any]], samples_per_shard: int, meta: dict[str, Any]) -> dict[str, Any]:
    """Write samples to ``split_dir/shard-%06d.tar`` and the split's manifest; return the manifest."""
    import webdataset as wds  # imported late: it pulls in torch, and bad arguments should fail fast

    split_dir.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    with wds.ShardWriter(str(split_dir / "shard-%06d.tar"), maxcount=samples_per_shard, verbose=0) as sink:
        for sample in samples:
            sink.write(sample)
            # ShardWriter rolls over on count or size; its current file name tells which shard got it.
            name = Path(sink.fname).name
            counts[name] = counts.get(name, 0) + 1
    manifest = {
        **meta,
        "num_samples": sum(counts.values()),
        "shards": [{"url": name, "num_samples": c} for name, c in counts.items()],
    }
    (split_dir / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def run_synthetic(args: argparse.Namespace) -> None:
    """Write the synthetic train/val/test splits with captions unique within and across splits."""
    sizes = {"train": args.train, "val": args.val, "test": args.test}
    used: set[str] = set()
    # Test first, then val, then train: each split avoids every caption already taken, so the
    # held-out splits keep the same scenes when only --train changes.
    for split in ("test", "val", "train"):
        start = time.perf_counter()
        rng = random.Random(f"{args.seed}-{split}")
        samples = synthetic_samples(sizes[split], rng, used, args.image_size, args.format)
        meta = {"split": split, "source": "synthetic", "seed": args.seed, "image_size": args.image_size}
        manifest = write_split(args.out / split, samples, args.samples_per_shard, meta)
        print(
            f"{split}: {manifest['num_samples']} samples in {len(manifest['shards'])} shards "
            f"-> {args.out / split} ({time.perf_counter() - start:.1f}s)"
        )


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "synthetic":
        _check_out(parser, args.out, args.overwrite)
        try:
            run_synthetic(args)
        except RuntimeError as err:
            parser.error(str(err))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Command-line options that every shard-writing command shares: shard size limits, the output folder."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lame_pl.data.shard_writer import MANIFEST, DataError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def _checked(text: str, convert: Callable[[str], Any], ok: Callable[[Any], bool], expected: str) -> Any:
    """``convert(text)`` when it converts and ``ok`` accepts it; else an ``ArgumentTypeError`` saying ``expected``."""
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1.

    Raises:
        argparse.ArgumentTypeError: When the text is not one.
    """
    return _checked(text, int, lambda value: value >= 1, "a positive integer")


def fraction(text: str) -> float:
    """An argparse type: a number in [0, 1).

    Raises:
        argparse.ArgumentTypeError: When the text is not one.
    """
    return _checked(text, float, lambda value: 0 <= value < 1, "a fraction in [0, 1)")


def parse_bytes(text: str) -> int:
    """A size such as ``500MB``, ``1.5GB``, ``64KiB`` or ``4096`` in bytes.

    KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB powers of 1024.

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


def add_shard_size_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--samples-per-shard``, ``--shard-bytes`` and ``--overwrite`` to a (sub)command."""
    parser.add_argument(
        "--samples-per-shard", type=positive_int, default=1000, help="most samples per tar shard (default 1000)"
    )
    parser.add_argument(
        "--shard-bytes",
        type=parse_bytes,
        default=None,
        help="most bytes per tar shard file, e.g. 500MB or 1GB (default: no limit)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in the output folder")


def check_split_dir(out: Path, split: str, overwrite: bool) -> list[Path]:
    """Refuse a non-empty ``out/split`` without ``overwrite``; return the old files a rewrite replaces.

    Only the files a writer writes (``shard-*.tar``, the manifest) are returned, so a mistyped
    ``--out`` never costs unrelated files. Removing them is left to the caller, after it has
    validated its input, so that bad input never costs the shards already there.

    Raises:
        DataError: For a split name that is not a plain folder name, an ``out`` or split folder
            that is a file, or a non-empty split folder without ``overwrite``.
    """
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", split) or split in (".", ".."):
        raise DataError(f"--split-name {split!r} must be a plain folder name")
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {str(out)!r} exists and is not a directory")
    split_dir = out / split
    if split_dir.exists() and not split_dir.is_dir():
        raise DataError(f"{str(split_dir)!r} exists and is not a directory")
    if split_dir.is_dir() and any(split_dir.iterdir()):
        if not overwrite:
            raise DataError(
                f"--out {str(out)!r} already holds {str(split_dir)!r} and it is not empty; "
                "pass --overwrite to replace its shards"
            )
        return [*split_dir.glob("shard-*.tar"), split_dir / MANIFEST]
    return []

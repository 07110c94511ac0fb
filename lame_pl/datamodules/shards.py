"""Shard specs: from a config value (pattern, glob, folder, list) to a checked list of shard URLs."""

from __future__ import annotations

import glob
import json
import logging
import os

from braceexpand import braceexpand

from lame_pl.data.shard_writer import MANIFEST

log = logging.getLogger(__name__)
MISSING_NAMED = 5  # missing shards named in an error or warning; the rest are counted


def is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def expand_shards(spec: str | list[str], key: str, allow_missing: bool = False) -> list[str]:
    """Expand a shard spec into a list of shard paths or URLs.

    Every file a brace pattern names must exist, and every glob it expands to must match one:
    a pattern that names 100 shards of which 8 exist would otherwise train on the 8 unnoticed.

    Args:
        spec: A brace pattern (``data/train/shard-{000000..000005}.tar``), a glob, a directory
            (all ``*.tar`` inside, sorted), a single file, or a list of those.
        key: The config key the spec came from, named in errors (e.g. ``data.train_shards``).
        allow_missing: Warn about the shards a pattern names that do not exist, instead of
            raising (``data.allow_missing_shards``).

    Raises:
        ValueError: When a pattern matches no file, names shards that do not exist (without
            ``allow_missing``), or a directory holds no ``.tar``.
        FileNotFoundError: When a named directory or file does not exist.
        PermissionError: When a local shard cannot be opened for reading.
    """
    specs = [spec] if isinstance(spec, str) else list(spec)
    if not specs:
        raise ValueError(f"{key} is an empty list; give a shard pattern, a glob or a directory")
    urls: list[str] = []
    missing: list[str] = []
    for item in specs:
        item = os.path.expanduser(str(item))
        if is_remote(item):
            urls.extend(braceexpand(item))  # cannot be checked from here; the loader will say
        elif os.path.isdir(item):
            found = sorted(glob.glob(os.path.join(item, "*.tar")))
            if not found:
                raise ValueError(f"{key} directory {item!r} holds no .tar shard")
            urls.extend(found)
        elif any(c in item for c in "{*?["):
            candidates = []
            for pattern in braceexpand(item):
                found = sorted(glob.glob(pattern))
                # A glob may match several files, a plain name must be one; either matching none is missing.
                if not found:
                    missing.append(pattern)
                candidates += found
            if not candidates:
                raise ValueError(f"{key} {item!r} matches no shard file")
            urls.extend(candidates)
        elif item.endswith(("/", os.sep)) or not os.path.splitext(item)[1]:
            raise FileNotFoundError(f"{key} directory {item!r} does not exist")
        elif not os.path.isfile(item):
            raise FileNotFoundError(f"{key} shard file {item!r} does not exist")
        else:
            urls.append(item)
    if missing:
        named = ", ".join(repr(m) for m in missing[:MISSING_NAMED])
        more = f" and {len(missing) - MISSING_NAMED} more" if len(missing) > MISSING_NAMED else ""
        message = f"{key} names {len(missing)} shard(s) that do not exist: {named}{more}"
        if not allow_missing:
            raise ValueError(f"{message}; fix the pattern, or set data.allow_missing_shards true to train on the rest")
        log.warning("%s; reading the %d that do (data.allow_missing_shards)", message, len(urls))
    for url in urls:
        if not is_remote(url):
            _check_readable(url, key)
    return urls


def _check_readable(path: str, key: str) -> None:
    """Open a local shard now, so that a file the loader could not read fails before training."""
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise PermissionError(f"{key} shard file {path!r} cannot be read: {exc.strerror or exc}") from exc


def shard_sizes(urls: list[str]) -> list[int] | None:
    """Samples in each of ``urls`` from the ``manifest.json`` beside them, or None if any is not listed."""
    manifests: dict[str, dict[str, int]] = {}
    sizes: list[int] = []
    for url in urls:
        if is_remote(url):
            return None
        folder, name = os.path.split(os.path.abspath(url))
        if folder not in manifests:
            path = os.path.join(folder, MANIFEST)
            try:
                with open(path) as f:
                    manifest = json.load(f)
                manifests[folder] = {s["url"]: int(s["num_samples"]) for s in manifest["shards"]}
            except (OSError, ValueError, KeyError, TypeError):
                manifests[folder] = {}
        if name not in manifests[folder]:
            return None
        sizes.append(manifests[folder][name])
    return sizes


def count_samples(urls: list[str]) -> int | None:
    """Total samples in ``urls`` from the ``manifest.json`` beside them, or None if any is not listed."""
    sizes = shard_sizes(urls)
    return None if sizes is None else sum(sizes)

"""The ablation's data: the compositional shards and decoder vocabulary, written once, and the test split's tags."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lame_pl.ablation.spec import TASKS
from lame_pl.data.shard_writer import MANIFEST
from lame_pl.data.shards_cli import main as make_shards
from lame_pl.decoder_vocab import write_decoder_vocab


def ensure_data(data: Path, train: int, val: int, test: int, seed: int, image_size: int) -> None:
    """Writes the compositional shards and the decoder vocabulary unless ``data`` holds this very set."""
    wanted = {"tasks": TASKS.split(","), "seed": seed, "image_size": image_size}
    sizes = {"train": train, "val": val, "test": test}
    manifests = {split: data / split / MANIFEST for split in sizes}
    if all(m.is_file() for m in manifests.values()) and (data / "decoder_vocab.json").is_file():
        found = {split: json.loads(m.read_text()) for split, m in manifests.items()}
        if all(
            all(found[s].get(k) == v for k, v in wanted.items()) and found[s].get("num_samples") == n
            for s, n in sizes.items()
        ):
            print(f"data: reusing {data}")
            return
    # The shards are written by make_shards' own command line, as a user writes them; 48 samples a
    # shard: batches of 32 straddle shards, so they vary by epoch.
    options = {**sizes, "seed": seed, "image-size": image_size, "samples-per-shard": 48}
    argv = ["synthetic", "--tasks", TASKS, "--out", str(data), "--overwrite"]
    if make_shards([*argv, *(f"--{name}={value}" for name, value in options.items())]) != 0:
        raise RuntimeError(f"make_shards {' '.join(argv)} failed (its message is above)")
    ids = write_decoder_vocab([data / s for s in sizes], data / "decoder_vocab.json")
    print(f"{len(ids)} token ids -> {data / 'decoder_vocab.json'}")


def read_test_records(test_dir: Path) -> dict[str, dict[str, Any]]:
    """``{key: {"kind", "group", "member", "candidates", "text"}}`` for every sample of the test shards.

    Raises:
        ValueError: When there is no shard, or a sample lacks its tags (not a ``--tasks`` set).
    """
    import webdataset as wds

    urls = sorted(str(p) for p in test_dir.glob("*.tar"))
    if not urls:
        raise ValueError(f"{test_dir} holds no .tar shard")
    records = {}
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        meta = json.loads(sample.get("json", b"{}"))
        missing = [f for f in ("kind", "group", "member", "candidates") if f not in meta]
        if missing or "txt" not in sample:
            raise ValueError(
                f"{test_dir}: sample {sample['__key__']!r} lacks {missing or ['txt']}; "
                "write the set with make_shards.py synthetic --tasks"
            )
        records[sample["__key__"]] = {
            **{f: meta[f] for f in ("kind", "group", "member", "candidates")},
            "text": sample["txt"].decode("utf-8").strip(),
        }
    return records

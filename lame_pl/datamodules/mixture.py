"""A weighted mixture of shard sets: each set its own stream, drawn by weight, optionally whole batches at once.

Training on several corpora (MMEB-train's tasks, caption sets, visual documents) samples each by
a weight rather than by its size. A set marked ``homogeneous`` supplies whole batches: every
in-batch negative then comes from the same task, VLM2Vec's "interleave" recipe, so a batch is
never solved by telling tasks apart. The other sets share mixed batches, sample by sample.

Per batch, one set is drawn by weight over all sets. A homogeneous set fills the batch; otherwise
the batch is filled sample by sample, each drawn by weight among the sets that are not
homogeneous. Either way set ``i`` supplies ``weight_i / sum(weights)`` of the samples in
expectation.

A config can name every set once by a path relative to one root (``data.mixture_root``), which a
user points at wherever the shards live; absolute paths and URLs are kept as they are.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch.serialization
import torch.utils.data

from lame_pl.datamodules.epoch_state import EpochState
from lame_pl.datamodules.shards import expand_shards, is_remote


@dataclass
class ShardSet:
    """One set of a training mixture.

    Attributes:
        shards: Brace pattern, glob, directory or list of those (as ``data.train_shards``).
        weight: Relative sampling weight; the set supplies ``weight / sum(weights)`` of the samples.
        homogeneous: Draw whole batches from this set (in-batch negatives from one task).
        name: Shown in logs and errors; defaults to the set's position in the list.
    """

    shards: str | list[str]
    weight: float = 1.0
    homogeneous: bool = False
    name: str | None = None


# Allowed in torch.load(weights_only=True): a datamodule built in Python keeps these in the
# checkpoint's datamodule hyper-parameters.
torch.serialization.add_safe_globals([ShardSet])


def check_mixture(sets: list[ShardSet], key: str = "data.train_mixture") -> list[ShardSet]:
    """Checks weights and names and fills in missing names; errors name the bad entry.

    Raises:
        ValueError: An empty mixture, a weight that is not a positive finite number, or two
            sets with the same name.
    """
    if not sets:
        raise ValueError(f"{key} is an empty list; give at least one shard set")
    checked, names = [], set()
    for i, item in enumerate(sets):
        if isinstance(item, dict):
            item = ShardSet(**item)
        weight = item.weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < float("inf"):
            raise ValueError(f"{key}[{i}].weight must be a positive number, got {weight!r}")
        name = item.name if item.name is not None else str(i)
        if name in names:
            raise ValueError(f"{key}[{i}].name {name!r} is used by another set; names must be unique")
        names.add(name)
        checked.append(ShardSet(item.shards, float(weight), bool(item.homogeneous), name))
    return checked


def _resolve(spec: str, root: str | None) -> str:
    """``spec`` joined to ``root`` when it is a relative local path; as it is otherwise."""
    spec = os.path.expanduser(str(spec))
    if root is None or is_remote(spec) or os.path.isabs(spec):
        return spec
    return os.path.join(root, spec)


def expand_mixture(
    sets: list[ShardSet],
    root: str | None = None,
    key: str = "data.train_mixture",
    root_key: str = "data.mixture_root",
    allow_missing: bool = False,
) -> list[tuple[ShardSet, list[str]]]:
    """Checks the sets (``check_mixture``), resolves their relative paths against ``root`` and lists their shards.

    Args:
        sets: The mixture as configured.
        root: Folder that relative ``shards`` paths start from; None keeps them relative to the
            working directory.
        key: The mixture's config key, named in errors.
        root_key: ``root``'s config key, named in errors.
        allow_missing: Warn about shards a pattern names that do not exist, rather than raise
            (``expand_shards``).

    Returns:
        ``(set, shard URLs)`` per set, in order; each set's ``shards`` is the resolved spec.

    Raises:
        FileNotFoundError: When ``root`` is not a directory, or a set's folder or file does
            not exist; the message names the entry (``data.train_mixture[3] (MSCOCO_t2i): ...``)
            and the resolved path.
        ValueError: As ``check_mixture``, or when a set's pattern matches no shard.
    """
    if root is not None:
        root = os.path.expanduser(str(root))
        if not os.path.isdir(root):
            raise FileNotFoundError(f"{root_key} {root!r} is not a directory")
    expanded = []
    for i, item in enumerate(check_mixture(sets, key)):
        specs = [item.shards] if isinstance(item.shards, str) else list(item.shards)
        resolved = [_resolve(spec, root) for spec in specs]
        try:
            urls = expand_shards(resolved, "shards", allow_missing)
        except (OSError, ValueError) as err:
            hint = f" (relative paths start at {root_key} {root!r})" if root is not None else ""
            raise type(err)(f"{key}[{i}] ({item.name}): {err}{hint}") from None
        shards = resolved[0] if isinstance(item.shards, str) else resolved
        expanded.append((ShardSet(shards, item.weight, item.homogeneous, item.name), urls))
    return expanded


class WeightedMixture(torch.utils.data.IterableDataset):
    """Interleaves endless per-set sample streams by weight, in blocks of ``batch_size``.

    Runs in each loader worker; the streams are the sets' own pipelines (shards to decoded
    samples), so bad samples are already gone and every block of ``batch_size`` samples becomes
    exactly one batch. Each sample gets a ``"source"`` entry with its set's name. Draws are seeded
    by (seed, epoch, resumed batches, rank, worker), like the resampled shard draw.

    Args:
        streams: One endless iterable of decoded samples per set, in the order of ``sets``.
        sets: The checked sets (weights, homogeneity, names).
        batch_size: Samples per batch.
        seed: Base seed.
        state: Epoch and resume offset, written by the main process.
        rank: This process's rank.
    """

    def __init__(
        self,
        streams: list[Iterable[dict[str, Any]]],
        sets: list[ShardSet],
        batch_size: int,
        seed: int,
        state: EpochState,
        rank: int,
    ) -> None:
        super().__init__()
        self.streams = streams
        self.sets = sets
        self.batch_size = batch_size
        self.seed = seed
        self.state = state
        self.rank = rank

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, _ = self.state.worker_role()
        rng = random.Random(f"mixture-{self.seed}-{self.state.epoch}-{self.state.resumed_batches}-{self.rank}-{worker}")
        sources = [iter(stream) for stream in self.streams]
        weights = [s.weight for s in self.sets]
        mixed = [i for i, s in enumerate(self.sets) if not s.homogeneous]
        mixed_weights = [weights[i] for i in mixed]
        while True:
            chosen = rng.choices(range(len(self.sets)), weights)[0]
            if self.sets[chosen].homogeneous:
                picks = [chosen] * self.batch_size
            else:
                picks = rng.choices(mixed, mixed_weights, k=self.batch_size)
            for i in picks:
                sample = next(sources[i], None)
                if sample is None:
                    raise RuntimeError(f"data.train_mixture set {self.sets[i].name!r} ran out of samples")
                sample["source"] = self.sets[i].name
                yield sample

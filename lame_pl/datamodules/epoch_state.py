"""Epochs and worker roles of a shard stream, and the loaders that carry them.

The training loader (``EpochLoader``) writes the epoch and a resume offset into an ``EpochState``
shared with its persistent workers each time it is iterated; each worker reads it to seed its
shard draw (``EpochShards``), its buffer shuffle (``WorkerShuffle``) and, after a resume, the raw
samples it had already delivered (``SkipConsumed``). Evaluation reads every shard once, in order
(``ShardList``), through an ``EvalLoader`` that makes every skip reach a batch.
"""

from __future__ import annotations

import multiprocessing
import random
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch.utils.data
import webdataset as wds
from torch.utils.data import DataLoader

from lame_pl.data.skips import NoGoodSamplesError, describe_counts, name_shards
from lame_pl.datamodules.tar_reading import SKIPS_ONLY


class EpochState:
    """The training epoch and resume offset, shared with loader worker processes.

    Workers are persistent, so they keep the pipeline they were started with; the main process
    writes here before each epoch's iteration and the workers read it when their epoch starts.
    Create it before the workers start (``fork`` inherits it; ``spawn`` pickles it with the dataset).
    """

    def __init__(self) -> None:
        # [epoch, batches this rank had consumed in that epoch before a resume, times set]
        self._values = multiprocessing.RawArray("q", 3)

    @property
    def epoch(self) -> int:
        return int(self._values[0])

    @property
    def resumed_batches(self) -> int:
        return int(self._values[1])

    @property
    def generation(self) -> int:
        """How often ``set`` was called: tells a new loader epoch from another pass inside one."""
        return int(self._values[2])

    def set(self, epoch: int, resumed_batches: int = 0) -> None:
        """Set what the workers read when their next epoch starts."""
        self._values[0], self._values[1] = epoch, resumed_batches
        self._values[2] += 1

    def worker_role(self) -> tuple[int, int]:
        """(the worker this process stands in for, number of workers).

        The loader takes batches from its workers in turn, starting again at worker 0 on every
        epoch; after a resume mid-epoch the workers swap roles so that the worker the loader asks
        first carries on the stream the old run would have asked next, and the order holds.
        """
        worker, num_workers = _worker()
        return (worker + self.resumed_batches) % num_workers, num_workers

    def first_pass(self, holder: Any) -> bool:
        """Whether ``holder`` (a stage in a worker) starts its first pass of this loader epoch.

        A finite stream cut by ``with_epoch`` is run again when it ends early; a stage sees that
        as another call in the same generation.
        """
        first = getattr(holder, "_generation", None) != self.generation
        holder._generation = self.generation
        return first


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class EpochShards(torch.utils.data.IterableDataset):
    """Training shard URLs for this rank and worker, seeded by (seed, epoch, rank, worker).

    Resampled: an endless draw with replacement; after a resume the draw is also seeded by the
    batches consumed before it, so the resumed epoch does not repeat its start. Not resampled:
    every shard once per epoch over all ranks and workers (one shuffle per epoch, the same on
    every rank, then split by rank and by worker), one pass per call; ``with_epoch`` calls again
    when a worker's shards run dry before its share of batches (bad samples), and that pass
    reads them in a new order, so every rank still does the same number of steps.

    Args:
        urls: The training shards.
        seed: Base seed.
        state: Epoch and resume offset, written by the main process.
        rank: This process's rank, known in the main process (workers may lack the process group).
        world_size: Number of ranks.
        resampled: Draw with replacement rather than reading each shard once per epoch.
    """

    def __init__(
        self, urls: list[str], seed: int, state: EpochState, rank: int, world_size: int, resampled: bool
    ) -> None:
        super().__init__()
        self.urls = list(urls)
        self.seed = seed
        self.state = state
        self.rank = rank
        self.world_size = world_size
        self.resampled = resampled

    def __iter__(self) -> Iterator[dict[str, str]]:
        worker, num_workers = self.state.worker_role()
        epoch = self.state.epoch
        if self.resampled:
            rng = random.Random(f"{self.seed}-{epoch}-{self.state.resumed_batches}-{self.rank}-{worker}")
            while True:
                yield {"url": rng.choice(self.urls)}
        self.lap = 0 if self.state.first_pass(self) else self.lap + 1
        order = list(self.urls)
        # The same shuffle on every rank and worker, so that the split below is a partition.
        random.Random(f"{self.seed}-{epoch}").shuffle(order)
        mine = order[self.rank :: self.world_size][worker::num_workers]
        if self.lap:
            random.Random(f"{self.seed}-{epoch}-{self.rank}-{worker}-{self.lap}").shuffle(mine)
        yield from ({"url": url} for url in mine)


class SkipConsumed(wds.PipelineStage):
    """Drops the raw samples this worker had already delivered in the epoch a run resumed in.

    The loader takes batches from its workers in turn, so the worker in role ``w`` of ``n``
    (``EpochState.worker_role``) had delivered ``consumed // n`` batches, one more if
    ``w < consumed % n``. Placed after the shuffle and
    before decoding, it skips ``batch_size`` raw samples per batch; samples skipped as bad before
    the resume are not counted, so as many good samples as were skipped may be seen again.

    Args:
        state: Epoch and resume offset, written by the main process.
        batch_size: Samples per batch.
    """

    def __init__(self, state: EpochState, batch_size: int) -> None:
        self.state = state
        self.batch_size = batch_size

    def run(self, src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        worker, num_workers = self.state.worker_role()
        consumed = self.state.resumed_batches if self.state.first_pass(self) else 0
        skip = (consumed // num_workers + (worker < consumed % num_workers)) * self.batch_size
        for sample in src:
            if skip:
                skip -= 1
                continue
            yield sample


class WorkerShuffle(wds.PipelineStage):
    """Buffer shuffle seeded by (seed, epoch, rank, worker): reproducible, yet different per worker and epoch.

    Args:
        bufsize: Samples held in the buffer.
        seed: Base seed.
        state: Where the epoch and the worker's role come from.
        rank: This process's rank.
    """

    def __init__(self, bufsize: int, seed: int | str, state: EpochState, rank: int) -> None:
        self.bufsize = bufsize
        self.seed = seed
        self.state = state
        self.rank = rank

    def run(self, src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        worker = self.state.worker_role()[0]
        rng = random.Random(f"{self.seed}-{self.rank}-{worker}-{self.state.epoch}")
        return wds.filters.shuffle(self.bufsize, initial=min(self.bufsize, 100), rng=rng)(src)


class ShardList(torch.utils.data.IterableDataset):
    """The given shard URLs in order, possibly none (a rank with no shard of a small split)."""

    def __init__(self, urls: list[str]) -> None:
        super().__init__()
        self.urls = urls

    def __iter__(self) -> Iterator[dict[str, str]]:
        return iter([{"url": url} for url in self.urls])


class EvalLoader(DataLoader):
    """An evaluation loader whose every skip reaches a batch, and that refuses a split with no good sample.

    A worker whose shards ran out with skips no batch carried sends them alone (``SKIPS_ONLY``);
    they are folded into a neighbouring batch, one batch being held back for that, so
    ``callbacks.DataHealth`` counts them. A split (of this rank) whose shards yield no sample
    at all raises ``NoGoodSamplesError``, rather than an evaluation that reports no metric.
    """

    def __init__(self, dataset: Any, what: str, urls: list[str], **kwargs: Any) -> None:
        super().__init__(dataset, batch_size=None, shuffle=False, **kwargs)
        self.what = what
        self.urls = urls

    def __iter__(self) -> Iterator[Any]:
        return self._folded(super().__iter__())

    def _folded(self, items: Iterator[Any]) -> Iterator[Any]:
        held, waiting = None, Counter()
        for item in items:
            if isinstance(item, dict) and item.get(SKIPS_ONLY):
                (waiting if held is None else held["skipped"]).update(item["skipped"])
                continue
            if waiting:
                item["skipped"] = dict(Counter(item["skipped"]) + waiting)
                waiting = Counter()
            if held is not None:
                yield {**held, "skipped": dict(held["skipped"])}
            held = item
            held["skipped"] = Counter(held["skipped"])
        if held is None and self.urls:
            raise NoGoodSamplesError(
                f"{self.what}: no good sample in {len(self.urls)} shard(s) {name_shards(self.urls)}; "
                f"skipped {sum(waiting.values())} ({describe_counts(waiting)})"
            )
        if held is not None:
            yield {**held, "skipped": dict(held["skipped"])}


class EpochLoader(DataLoader):
    """A DataLoader that tells its datamodule when an epoch starts and counts the batches it hands out.

    Lightning calls ``set_epoch`` only on samplers, and an iterable dataset has none; iterating
    the loader is the one moment both a Trainer and a plain loop go through.
    """

    def __init__(
        self, dataset: Any, on_epoch: Callable[[], int], on_batch: Callable[[], None], what: str, **kwargs: Any
    ) -> None:
        super().__init__(dataset, batch_size=None, shuffle=False, **kwargs)
        self._on_epoch = on_epoch
        self._on_batch = on_batch
        self.what = what

    def __iter__(self) -> Iterator[Any]:
        # Before the workers are told to start (or resume), so they read this epoch's seeds.
        taken = self._on_epoch()
        return self._counted(super().__iter__(), len(self) - taken)

    def _counted(self, batches: Iterator[Any], remaining: int) -> Iterator[Any]:
        # A resumed epoch ends where it would have, as Lightning's own batch count expects.
        taken = 0
        for batch, _ in zip(batches, range(remaining), strict=False):
            self._on_batch()
            taken += 1
            yield batch
        if remaining and not taken:
            # Shards read once (data.resampled false) that held too few good samples for a batch.
            raise NoGoodSamplesError(f"{self.what}: the training epoch yielded no batch; see the skip warnings")

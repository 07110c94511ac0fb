"""Counts, logs and summarises the samples that the data pipeline skipped."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch.distributed as dist
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

# Training's cumulative count of skipped samples, all reasons together.
TOTAL = "data/skipped/total"


class DataHealth(Callback):
    """Reads ``batch["skipped"]`` (``{reason: count}`` since the worker's previous batch).

    Logged metrics:

    - ``data/skipped/<reason>``: training, on step and at the end of every epoch, the cumulative
      count of *this rank* since the run started (resumes included); on one device the epoch-end
      value is the summary line's. No collective runs per step, and ranks may see different
      reasons, which a synchronised log could deadlock on; the logger shows rank 0's counts.
    - ``data/skipped/total``: the same, all reasons together; 0 while nothing was skipped.
    - ``<split>/data/skipped/<reason>``: validation and test, at epoch end, the epoch's count
      summed over all ranks.
    - ``data/mixture/<set>``: training from a mixture (``batch["sources"]``), on step, the share
      of this rank's samples in the epoch so far that came from each set, to check the weights.

    At the end of an epoch in which samples were skipped, one line sums all ranks, e.g.
    ``train epoch 3: skipped 12 samples (40 in all): bad_image 10, empty_caption 2``.
    """

    def __init__(self) -> None:
        self.train_total: Counter[str] = Counter()  # this rank's training skips since the run started
        self.epoch: dict[str, Counter[str]] = {split: Counter() for split in ("train", "val", "test")}
        self._restored: Counter[str] = Counter()
        self.sources: Counter[str] = Counter()  # training samples per mixture set, this epoch

    # ----------------------------------------------------------------------------- counting

    def _count(self, split: str, batch: Any) -> dict[str, int]:
        skipped = batch.get("skipped") if isinstance(batch, Mapping) else None
        if skipped:
            if split == "train":
                self.train_total.update(skipped)
            self.epoch[split].update(skipped)
        return skipped or {}

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._count("train", batch)
        for reason, count in sorted(self.train_total.items()):
            pl_module.log(f"data/skipped/{reason}", float(count), on_step=True, on_epoch=False, batch_size=1)
        # The total too, 0 on clean data: the dashboard's "skipped samples" chart never opens empty.
        pl_module.log(TOTAL, float(sum(self.train_total.values())), on_step=True, on_epoch=False, batch_size=1)
        sources = batch.get("sources") if isinstance(batch, Mapping) else None
        if sources:
            self.sources.update(sources)
            seen = sum(self.sources.values())
            for name, count in sorted(self.sources.items()):
                pl_module.log(f"data/mixture/{name}", count / seen, on_step=True, on_epoch=False, batch_size=1)

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not trainer.sanity_checking:
            self._count("val", batch)

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._count("test", batch)

    # ----------------------------------------------------------------------------- epoch ends

    @staticmethod
    def _sum_over_ranks(trainer: Trainer, *counters: Counter[str]) -> list[Counter[str]]:
        # One collective per epoch end; objects, because ranks may know different reasons.
        if trainer.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
            return [Counter(c) for c in counters]
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, [dict(c) for c in counters])
        totals: list[Counter[str]] = [Counter() for _ in counters]
        for parts in gathered:
            for total, part in zip(totals, parts, strict=True):
                total.update(part)
        return totals

    def _epoch_end(self, split: str, trainer: Trainer, pl_module: LightningModule) -> None:
        training = split == "train"
        epoch, *run = self._sum_over_ranks(trainer, self.epoch[split], *([self.train_total] if training else []))
        self.epoch[split] = Counter()
        if not training:
            for reason, count in sorted(epoch.items()):
                pl_module.log(f"{split}/data/skipped/{reason}", float(count), rank_zero_only=True)
        if not epoch:  # nothing skipped: nothing to say (the counts are logged when there are any)
            return
        line = f"{split} epoch {trainer.current_epoch}: skipped {sum(epoch.values())} samples"
        if training:
            line += f" ({sum(run[0].values())} in all)"
        line += ": " + ", ".join(f"{reason} {count}" for reason, count in sorted(epoch.items()))
        rank_zero_info(line)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.epoch["train"] = Counter()
        self.sources = Counter()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The step logs reach the logger every log_every_n_steps only: the skips of the batches
        # after the last logged step would miss it. Logged here too, the totals reach the logger
        # at the epoch's end, as the summary line prints them.
        for reason, count in sorted(self.train_total.items()):
            pl_module.log(f"data/skipped/{reason}", float(count), on_step=False, on_epoch=True, batch_size=1)
        pl_module.log(TOTAL, float(sum(self.train_total.values())), on_step=False, on_epoch=True, batch_size=1)
        self._epoch_end("train", trainer, pl_module)

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.epoch["val"] = Counter()

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._epoch_end("val", trainer, pl_module)

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.epoch["test"] = Counter()

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch_end("test", trainer, pl_module)

    # ----------------------------------------------------------------------------- resume

    def state_dict(self) -> dict[str, Any]:
        """The cumulative training counts of this rank (rank 0 writes the checkpoint)."""
        return {"train": dict(self.train_total)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the saved training counts until ``on_train_start`` knows the rank."""
        self._restored = Counter(state_dict.get("train", {}))

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The checkpoint holds rank 0's counts: restoring them on every rank would count them again.
        if trainer.global_rank == 0:
            self.train_total.update(self._restored)
        self._restored = Counter()

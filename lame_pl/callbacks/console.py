"""What a fit prints: a progress bar in optimiser steps, samples per second, and a model summary without
made-up figures. The command line adds the three to every run whose config names none of its own
(``lame_pl.cli.console_callbacks``).

- ``StepProgressBar``: Lightning's tqdm bar, counting the run's optimiser steps out of its budget
  (``max_steps``, or what ``max_epochs`` amounts to), named after the run (the logger's name and
  version), showing the training loss and its terms, the last validation loss and samples/s.
- ``SamplesPerSecond``: training samples per second over the last ``window`` batches, logged as
  ``throughput/samples_per_sec``, which the bar shows.
- ``ParameterSummary``: Lightning's model summary, without its FLOPs column and "Total FLOPs: 0"
  line when they were not measured (a module without ``example_input_array``, as ours are).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelSummary, TQDMProgressBar
from lightning.pytorch.callbacks.model_summary import log as summary_log
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.model_summary.model_summary import _format_summary_table

# The TensorBoard tag of the training throughput: all devices' samples per second.
SAMPLES_PER_SEC = "throughput/samples_per_sec"
# The training losses the bar shows: the loss, and its terms (train/loss/contrastive, train/loss/decoder).
_TRAIN_LOSS = "train/loss"


def run_name(trainer: Trainer) -> str:
    """The run as its logger names it (``name/version``, e.g. ``stage1``); "" without a logger."""
    logger = trainer.logger
    if logger is None:
        return ""
    version = logger.version
    if isinstance(version, int):
        version = f"version_{version}"
    return "/".join(str(part) for part in (logger.name, version) if part not in (None, ""))


class StepProgressBar(TQDMProgressBar):
    """A tqdm progress bar whose training bar counts optimiser steps out of the run's budget.

    Lightning's own bar counts the batches of each epoch, and with ``max_steps`` alone it reads
    "Epoch 0/-2" with the logger's version as ``v_num``. This bar reads e.g.
    ``stage1 epoch 0:  45%|████▌     | 45/100 [00:31<00:38, 1.44step/s, loss=3.47, loss/decoder=3.47,
    val/loss=3.45, samples/s=46.1]``: a resumed run starts at its step, and gradient accumulation
    counts one step per optimiser step, as ``max_steps`` does.
    """

    def __init__(self, refresh_rate: int = 1, process_position: int = 0) -> None:
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=False)
        self._run = ""

    def init_train_tqdm(self) -> Any:
        bar = super().init_train_tqdm()
        bar.unit = "step"
        return bar

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._run = run_name(trainer)
        bar = self.train_progress_bar
        # Infinite (neither max_steps nor max_epochs) is shown as a count without a total.
        bar.reset(total=convert_inf(trainer.estimated_stepping_batches))
        # The rate counts this run's steps only: a resumed run starts at its checkpoint's step.
        bar.initial = bar.n = trainer.global_step
        bar.refresh()

    def on_train_epoch_start(self, trainer: Trainer, *_: Any) -> None:
        # One bar for the whole run: Lightning's resets it to the epoch's batches here.
        prefix = f"{self._run} " if self._run else ""
        self.train_progress_bar.set_description(f"{prefix}epoch {trainer.current_epoch}")

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        bar = self.train_progress_bar
        step = trainer.global_step
        if bar is not None and step != bar.n and self._should_update(step, bar.total):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar too

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        """The training loss and its terms, the other metrics logged with ``prog_bar=True``, and samples/s.

        Training metrics drop their ``train/`` prefix (``loss``, ``loss/decoder``): the rest of
        each name is its TensorBoard tag's. No ``v_num``: the description names the run.
        """
        shown: dict[str, Any] = {}
        logged = trainer.callback_metrics
        # The loss, its terms, then the rest (val/loss...).
        terms = sorted(name for name in logged if name.startswith(_TRAIN_LOSS + "/"))
        names = [_TRAIN_LOSS] if _TRAIN_LOSS in trainer.progress_bar_metrics else []
        names += [*terms, *(name for name in trainer.progress_bar_metrics if name not in (_TRAIN_LOSS, *terms))]
        for name in names:
            value = trainer.progress_bar_metrics.get(name, logged.get(name))
            if isinstance(value, torch.Tensor):
                value = value.item()
            shown[name.removeprefix("train/")] = value
        rate = logged.get(SAMPLES_PER_SEC)
        if rate is not None:
            shown["samples/s"] = f"{float(rate):.1f}"
        return shown


def batch_size(batch: Any) -> int:
    """The samples in a batch: its keys for the project's batches (a dict, or GradCache's Mapping), else
    the first dimension Lightning finds."""
    if isinstance(batch, Mapping) and "keys" in batch:
        return len(batch["keys"])
    return extract_batch_size(batch)


class SamplesPerSecond(Callback):
    """Logs ``throughput/samples_per_sec``: training samples per second, all devices together.

    The rate over the last ``window`` training batches (fewer at the start: the first comes at the
    second batch, so that the first batch's start-up is not counted), each device's multiplied by
    the device count; the time validation and its callbacks take is left out. Lightning's
    ``ThroughputMonitor`` was not used: it logs validation throughput at the evaluation loop's
    batch index, left of the training curves, adds time and counters to ``train/``, warns when the
    module has no ``flops_per_batch``, and gives no rate before ``window`` batches.

    Args:
        window: how many training batches the rate is averaged over (at least 1).
    """

    def __init__(self, window: int = 10) -> None:
        if window < 1:
            raise ValueError(f"SamplesPerSecond window {window}: must be at least 1 batch")
        self.window = window
        self._marks: deque[tuple[float, int]] = deque(maxlen=window + 1)  # (training seconds, samples) after each batch
        self._start = self._paused = 0.0
        self._pause_start: float | None = None
        self._samples = 0

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._marks.clear()
        self._start, self._paused, self._samples = time.perf_counter(), 0.0, 0

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()  # the step's kernels are done, not just launched
        self._samples += batch_size(batch)
        self._marks.append((time.perf_counter() - self._start - self._paused, self._samples))
        (first_time, first_samples), (last_time, last_samples) = self._marks[0], self._marks[-1]
        if last_time > first_time:
            rate = (last_samples - first_samples) / (last_time - first_time) * trainer.world_size
            pl_module.log(SAMPLES_PER_SEC, rate, on_step=True, on_epoch=False, batch_size=1)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._pause_start = time.perf_counter()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._pause_start is not None:
            self._paused += time.perf_counter() - self._pause_start
            self._pause_start = None


class ParameterSummary(ModelSummary):
    """Lightning's model summary (logged as text), without FLOPs where none were counted.

    Lightning counts FLOPs by running ``example_input_array`` through the model; without one it
    prints a column of zeros and "Total FLOPs: 0", which reads as a measurement.
    """

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        if total_flops:
            ModelSummary.summarize(
                summary_data,
                total_parameters,
                trainable_parameters,
                model_size,
                total_training_modes,
                total_flops,
                **summarize_kwargs,
            )
            return
        columns = [column for column in summary_data if column[0] != "FLOPs"]
        table = _format_summary_table(
            total_parameters, trainable_parameters, model_size, total_training_modes, total_flops, *columns
        )
        lines = table.splitlines()
        if lines and lines[-1].rstrip().endswith("Total Flops"):
            lines.pop()
        summary_log.info("\n" + "\n".join(lines))  # where Lightning's summary goes

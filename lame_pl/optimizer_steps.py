"""How a training step's gradients reach the optimiser: GradCache's chunks add up in them, and a
non-finite step never does."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy

from lame_pl.gradcache import HostBatch
from lame_pl.sharding import average_unsharded_gradients

# Lightning notes that the module's transfer_batch_to_device (GradCache keeps a training batch on
# the host) wins over the data module's default one, at every run: that is the intent.
warnings.filterwarnings("ignore", message=r"You have overridden `transfer_batch_to_device` in `LightningModule` but")


class OptimizerSteps:
    """Mixin for ``LaMEModule``: the hooks between ``training_step`` and the optimiser.

    Reads the module's ``hparams.gradcache_chunk_size`` and its non-finite guard (``_nonfinite``,
    a ``lame_pl.nonfinite.NonFiniteGuard``).
    """

    _step_holds_gradients = False  # the GradCache step zeroed the gradients itself

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Leaves a training batch where it is under GradCache: its chunks go to the device one at a time.

        A batch of 128 rows at Qwen2-VL's largest images holds ~3 GiB of float32 pixels per side,
        more than the activations of a chunk of 8. It is wrapped in a ``HostBatch``, which DDP's
        forward does not move to the device either.
        """
        if self.hparams.get("gradcache_chunk_size") and self._trainer is not None and self.trainer.training:
            return HostBatch(batch)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def zero_grad_for_chunks(self, batch_idx: int) -> None:
        """Zeroes the gradients before GradCache accumulates its chunks' into them.

        Lightning zeroes them after ``training_step`` at the start of an accumulation cycle (the
        same test as Lightning's), which would wipe the chunks back-propagated inside it;
        ``optimizer_zero_grad`` then leaves them.
        """
        if self._trainer is None or batch_idx % self.trainer.accumulate_grad_batches:
            return
        for optimizer in self.trainer.optimizers:
            optimizer.zero_grad()
        self._step_holds_gradients = True

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        average_unsharded_gradients(self)  # FSDP2 only: the temperature's gradient
        # Here, not in training_step: the whole step's gradient exists (every micro-batch of an
        # accumulation cycle, every GradCache chunk). A non-finite step's gradients are dropped,
        # so the optimiser leaves the weights and its state alone (lame_pl.nonfinite).
        # What the optimiser holds: what the stage trains (lame_pl.optimization.param_groups).
        params = [(name, p) for name, p in self.named_parameters() if p.requires_grad]
        # Under a GradScaler an inf gradient is its overflow signal: it skips that step itself.
        scaler = getattr(self.trainer.precision_plugin, "scaler", None) if self._trainer is not None else None
        # DeepSpeed steps on its own gradient partitions (p.grad is not what it applies).
        deepspeed = self._trainer is not None and isinstance(self.trainer.strategy, DeepSpeedStrategy)
        self._nonfinite.check(params, self.global_step, check_gradients=scaler is None, can_skip=not deepspeed)
        self.log("train/nonfinite_steps", float(self._nonfinite.total), on_step=True, on_epoch=False)
        self.log("train/zero_gradient_steps", float(self._nonfinite.dead), on_step=True, on_epoch=False)

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: torch.optim.Optimizer) -> None:
        if self._step_holds_gradients:  # zeroed before the GradCache step's chunks
            self._step_holds_gradients = False
            return
        optimizer.zero_grad()

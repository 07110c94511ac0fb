"""Switching from one training stage to the next inside one run."""

from __future__ import annotations

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info


class StageSwitch(Callback):
    """Puts the module in ``to_stage`` at global step ``at_step`` and rebuilds the optimiser.

    The new optimiser (and its warm-up and schedule) starts fresh, over what the new stage
    trains, as a separate stage-2 run started with ``init_from`` would. The switch is saved in
    checkpoints, so a resumed run continues in the stage it had reached.

    Args:
        at_step: Global step at which to switch.
        to_stage: The stage to switch to.
    """

    def __init__(self, at_step: int, to_stage: int = 2) -> None:
        if at_step < 0:
            raise ValueError(f"StageSwitch.at_step must be >= 0, got {at_step}")
        if to_stage not in (1, 2):
            raise ValueError(f"StageSwitch.to_stage must be 1 or 2, got {to_stage}")
        self.at_step = at_step
        self.to_stage = to_stage

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step < self.at_step or pl_module.stage == self.to_stage:
            return
        if trainer.world_size > 1:
            # DDP registers its gradient hooks for the parameters that train when it wraps the
            # model; parameters unfrozen later would never be synchronised across ranks.
            raise RuntimeError(
                "StageSwitch cannot unfreeze parameters under multi-process training; run the next stage "
                "as its own run with --model.init_from PATH.ckpt"
            )
        rank_zero_info(f"step {trainer.global_step}: switching from stage {pl_module.stage} to stage {self.to_stage}")
        pl_module.set_stage(self.to_stage)
        trainer.strategy.setup_optimizers(trainer)

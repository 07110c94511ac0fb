"""Where a model's evaluation metrics sit on TensorBoard's step axis, and a validation at the end of training.

One home for both LightningModules (``LaMEModule``, ``CLIPAnchor``), which call these hooks from theirs.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.trainer.states import TrainerFn


class EvaluatedStep:
    """Mixin for a ``LightningModule``: test/validate metrics at the step of the weights they score.

    A ``lightning test --ckpt_path X`` run starts a new trainer at step 0, so its metrics would
    sit left of the training curves; logged with the checkpoint's ``global_step`` they sit at its
    right end, beside the validation curves of the same weights.
    """

    # The training step of the checkpoint whose weights the module holds; None once training moves
    # them on, or when they come from init_from or from initialisation.
    _weights_step: int | None = None

    def remember_checkpoint_step(self, checkpoint: dict[str, Any]) -> None:
        """Call from ``on_load_checkpoint``: these weights are those of the checkpoint's step."""
        self._weights_step = checkpoint.get("global_step")

    def forget_checkpoint_step(self) -> None:
        """Call from ``on_fit_start``: training moves the weights on from any loaded checkpoint."""
        self._weights_step = None

    @property
    def evaluated_step(self) -> int:
        """The training step of the weights a test or validate run scores, the x of its metrics.

        With ``--ckpt_path`` (or ``load_from_checkpoint``), the checkpoint's ``global_step``; else
        the trainer's own step: the fit it ran before, or 0 for a new trainer (weights from
        ``init_from`` or from initialisation).
        """
        if self._weights_step is not None:
            return self._weights_step
        return self.trainer.global_step if self._trainer is not None else 0

    def log_evaluated_step(self) -> None:
        """Call after logging a test or validate run's metrics: they then sit at ``evaluated_step``."""
        if self.trainer.state.fn in (TrainerFn.TESTING, TrainerFn.VALIDATING):
            # Lightning's logger connector takes a logged metric named "step" as the x of the others.
            self.log("step", float(self.evaluated_step), rank_zero_only=True)

    def validate_at_the_end(self) -> None:
        """Call from ``on_train_batch_end``: the last weights get a validation too.

        With ``max_steps`` not a multiple of ``val_check_interval`` the last scheduled validation
        ran before the end (560 of 600 in the demo). Lightning's loop validates after a batch that
        sets ``should_stop``, and the step loop then ends as ``max_steps`` would end it.
        """
        trainer = self.trainer
        if 0 < trainer.max_steps <= trainer.global_step and trainer.enable_validation:
            trainer.should_stop = True

"""The optimiser of a ``LaMEModule``: AdamW over what the stage trains, its schedule, and resuming it."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn


def param_groups(module: nn.Module) -> list[dict[str, Any]]:
    """The optimiser's parameter groups: what the stage trains, the decoder apart under ``decoder_lr``."""
    params = [p for p in module.parameters() if p.requires_grad]
    decoder_lr = module.hparams.get("decoder_lr")
    if decoder_lr is None:
        return [{"params": params}]
    # Named: LearningRateMonitor logs lr-AdamW/model and lr-AdamW/decoder.
    own = {id(p) for p in module.decoder.parameters()}
    groups = [
        {"params": [p for p in params if id(p) not in own], "name": "model"},
        {"params": [p for p in params if id(p) in own], "lr": decoder_lr, "name": "decoder"},
    ]
    return [group for group in groups if group["params"]]


def configure_adamw(module: Any) -> Any:
    """AdamW over what the stage in force trains, with warm-up and the configured schedule.

    Returns:
        What ``configure_optimizers`` returns: the optimiser, with a per-step scheduler unless
        the schedule is constant without warm-up.
    """
    hp = module.hparams
    # The fused kernel is ~4x faster than foreach on a CPU, but Lightning cannot clip a fused
    # optimiser's gradients under mixed precision, so AMP runs fall back to foreach.
    amp = module._trainer is not None and isinstance(module.trainer.precision_plugin, MixedPrecision)
    optimizer = torch.optim.AdamW(param_groups(module), lr=hp.lr, weight_decay=hp.weight_decay, fused=not amp)
    return with_schedule(module, optimizer)


def with_schedule(module: Any, optimizer: torch.optim.Optimizer) -> Any:
    """``optimizer`` under the module's ``warmup_steps`` and ``lr_schedule`` (transformers' schedulers),
    stepped every optimiser step over the steps left to train; the optimiser alone when the
    schedule is constant without warm-up."""
    hp = module.hparams
    if hp.lr_schedule == "constant" and hp.warmup_steps == 0:
        return optimizer
    from transformers import get_scheduler

    name = "constant_with_warmup" if hp.lr_schedule == "constant" else hp.lr_schedule
    remaining = max(1, int(module.trainer.estimated_stepping_batches) - module.global_step)
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=hp.warmup_steps, num_training_steps=remaining)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def check_resumable(module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Raises when the checkpoint's optimiser covers another trainable set than the stage in force.

    Such a checkpoint (one written before a stage froze what its losses cannot reach, or under
    another stage spec) would otherwise fail deep inside torch with a size mismatch.
    """
    saved = checkpoint.get("optimizer_states") or []
    if not saved or "param_groups" not in saved[0]:
        return
    count = sum(len(group["params"]) for group in saved[0]["param_groups"])
    trains = sum(1 for p in module.parameters() if p.requires_grad)
    if count != trains:
        raise ValueError(
            f"the checkpoint's optimiser holds {count} trainable tensors but stage {module.stage} trains "
            f"{trains} here (a checkpoint from an older version, or another stage spec): its optimiser "
            "cannot resume; start a new run from its weights with --model.init_args.init_from CKPT"
        )
    groups, wanted = len(saved[0]["param_groups"]), len(param_groups(module))
    if groups != wanted:
        raise ValueError(
            f"the checkpoint's optimiser has {groups} parameter group(s) but this run has {wanted}: "
            "model.decoder_lr was set or unset since it was written; resume with the checkpoint's "
            "decoder_lr, or start a new run from its weights with --model.init_args.init_from CKPT"
        )

"""The CLIP anchor: an open_clip dual encoder trained with open_clip's own loss on LaME's shards.

It logs the metric names LaME logs where they mean the same (``train/loss``,
``train/loss/contrastive``, ``train/temperature``, ``val/loss``, ``val/recall@1``,
``test/recall@1``, ``chance/...``), ranked by ``lame_pl.retrieval``, so that the two runs sit side
by side in TensorBoard and ``tools/show_metrics.py``.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning import LightningModule
from torch import nn

from lame_pl.clip_spec import CLIPSpec, build_clip
from lame_pl.distributed import world_size
from lame_pl.evaluated_step import EvaluatedStep
from lame_pl.losses import MAX_LOGIT_SCALE
from lame_pl.optimization import with_schedule
from lame_pl.retrieval_metric import SplitRetrieval

# Written into every checkpoint, so that the evaluators pick the CLIP encoder for it.
ENCODER_KIND_KEY = "encoder_kind"
ENCODER_KIND = "clip"


def fuse(parts: list[torch.Tensor]) -> torch.Tensor:
    """An input with an image and a text: the normalised sum of their normalised embeddings (a dual
    encoder has no joint input); one part alone is itself."""
    return F.normalize(sum(parts), dim=-1)


class CLIPAnchor(EvaluatedStep, LightningModule):
    """An open_clip dual encoder (random init or local weights) trained with ``open_clip.ClipLoss``.

    A side of a batch is ``{"image": (B, 3, S, S)}``, ``{"text": (B, L)}`` or both; a side with
    both is embedded as the normalised sum of its two normalised embeddings (score-level fusion:
    a dual encoder has no joint input).

    Args:
        backbone: The open_clip architecture, its changes and its weights.
        lr: Peak learning rate of AdamW.
        weight_decay: AdamW weight decay on matrices (gains, biases and the temperature get none,
            as in open_clip's training).
        warmup_steps: Linear warm-up steps.
        lr_schedule: Shape after warm-up.
        temperature: Start temperature; ``None`` keeps the model's own (CLIP's 0.07, or the weights file's).
        learnable_temperature: Learn the temperature (a log logit scale, capped at 100 as in CLIP).
        local_loss: open_clip's ``local_loss`` on several ranks: each rank's rows against every
            rank's, not the whole global matrix on every rank.
        gather_with_grad: open_clip's ``gather_with_grad``: the gathered rows carry gradients
            back to their rank (the full global-batch gradient).
    """

    def __init__(
        self,
        backbone: CLIPSpec,
        lr: float = 5e-4,
        weight_decay: float = 0.1,
        warmup_steps: int = 0,
        lr_schedule: Literal["constant", "cosine", "linear"] = "cosine",
        temperature: float | None = None,
        learnable_temperature: bool = True,
        local_loss: bool = True,
        gather_with_grad: bool = True,
    ) -> None:
        super().__init__()
        if temperature is not None and not temperature > 0:
            raise ValueError(f"model.temperature must be > 0 (or null), got {temperature}")
        if not lr > 0:
            raise ValueError(f"model.lr must be > 0, got {lr}")
        if warmup_steps < 0:
            raise ValueError(f"model.warmup_steps must be >= 0, got {warmup_steps}")
        self.save_hyperparameters()
        self.spec = backbone
        self.clip = build_clip(backbone)
        if temperature is not None:
            with torch.no_grad():
                self.clip.logit_scale.fill_(math.log(1.0 / temperature))
        self.clip.logit_scale.requires_grad_(learnable_temperature)
        self.criterion = self._loss(rank=0, world_size=1)
        self._local_criterion = self._loss(rank=0, world_size=1)  # evaluation: never gathers
        self.configure_metrics()

    def configure_metrics(self) -> None:
        """Whole-split retrieval of the validation and test splits, ranked as LaME ranks them."""
        self.retrieval = nn.ModuleDict({split: SplitRetrieval(split, self.embedding_dim) for split in ("val", "test")})

    def _loss(self, rank: int, world_size: int) -> Any:
        from open_clip import ClipLoss

        hp = self.hparams
        return ClipLoss(
            local_loss=hp.local_loss,
            gather_with_grad=hp.gather_with_grad,
            cache_labels=True,
            rank=rank,
            world_size=world_size,
        )

    def setup(self, stage: str) -> None:
        # The ranks are known only once the trainer has started its processes.
        self.criterion = self._loss(self.trainer.global_rank, self.trainer.world_size)

    @property
    def logit_scale(self) -> torch.Tensor:
        """``1 / temperature``, capped at 100 as in CLIP."""
        return self.clip.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    @property
    def embedding_dim(self) -> int:
        """Width of an embedding."""
        return int(self.spec.model_config()["embed_dim"])

    # ----------------------------------------------------------------------------- encoding

    def encode(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(B, D)`` L2-normalised embeddings of one side (``image``, ``text`` or both)."""
        parts = []
        if "image" in inputs:
            parts.append(self.clip.encode_image(inputs["image"], normalize=True))
        if "text" in inputs:
            parts.append(self.clip.encode_text(inputs["text"], normalize=True))
        if not parts:
            raise ValueError(f"a CLIP side needs 'image' or 'text'; got {sorted(inputs)}")
        return parts[0] if len(parts) == 1 else fuse(parts)

    def model_step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The loss of a batch (``ClipLoss``: both directions, gathered across ranks) and its embeddings."""
        query, target = self.encode(batch["query"]), self.encode(batch["target"])
        return self.criterion(query, target, self.logit_scale), query, target

    # ----------------------------------------------------------------------------- steps

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss, _, _ = self.model_step(batch)
        size = len(batch["keys"])
        # With local_loss each rank holds its own rows' loss; their mean is the global batch's.
        sync = world_size() > 1
        # ClipLoss is one term: the contrastive one, under LaME's name for it too.
        self.log("train/loss", loss, prog_bar=True, batch_size=size, sync_dist=sync)
        self.log("train/loss/contrastive", loss, batch_size=size, sync_dist=sync)
        self.log("train/temperature", 1.0 / self.logit_scale.detach(), batch_size=size)
        return loss

    def _eval_step(self, batch: dict[str, Any], split: str) -> dict[str, Any]:
        # Each rank's own rows only (as LaME's evaluation loss): ranks may hold different numbers
        # of evaluation batches and rows, which a gathering ClipLoss would wait on or mismatch.
        query, target = self.encode(batch["query"]), self.encode(batch["target"])
        loss = self._local_criterion(query, target, self.logit_scale)
        size = len(batch["keys"])
        for name in (f"{split}/loss", f"{split}/loss/contrastive"):
            self.log(name, loss, batch_size=size, on_step=False, on_epoch=True, sync_dist=True)
        self.retrieval[split].update(query, target)
        return {"query": query, "target": target, "keys": batch["keys"], "texts": batch.get("texts")}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Logs the loss and keeps the embeddings for whole-split retrieval."""
        return self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """As ``validation_step``, for the test split."""
        return self._eval_step(batch, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Embeddings of the sides a batch holds, with the samples' keys and texts (as ``LaMEModule``'s)."""
        out = {"keys": batch["keys"], "texts": batch.get("texts")}
        for side in ("query", "target"):
            if side in batch:
                out[side] = self.encode(batch[side])
        return out

    def _retrieval_epoch_end(self, split: str) -> None:
        metric = self.retrieval[split]  # every rank computes: the metric gathers
        try:
            self.log_dict(metric.compute(), rank_zero_only=True)
        finally:
            metric.reset()
        self.log_evaluated_step()

    def on_fit_start(self) -> None:
        self.forget_checkpoint_step()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.validate_at_the_end()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.remember_checkpoint_step(checkpoint)

    def on_validation_epoch_end(self) -> None:
        self._retrieval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._retrieval_epoch_end("test")

    # ----------------------------------------------------------------------------- optimiser

    def configure_optimizers(self) -> Any:
        """AdamW (decay on matrices only, as open_clip trains), warm-up and the configured schedule."""
        hp = self.hparams
        trainable = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        decay = [p for n, p in trainable if p.ndim >= 2 and "embedding" not in n]
        rest = [p for n, p in trainable if not (p.ndim >= 2 and "embedding" not in n)]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": rest, "weight_decay": 0.0}], lr=hp.lr
        )
        return with_schedule(self, optimizer)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[ENCODER_KIND_KEY] = ENCODER_KIND

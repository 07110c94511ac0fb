"""Embedding-space health on a fixed validation subset: is the space aligned, spread out, collapsing?"""

from __future__ import annotations

from typing import Any

from lightning import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from lame_pl.callbacks.space_stats import (
    alignment,
    effective_rank,
    positive_and_hardest_negative,
    std_ratio,
    uniformity,
)
from lame_pl.callbacks.validation_subset import ValidationSubsetCallback
from lame_pl.eval_output import DiagnosedModule, EvalOutput

SIDES = ("query", "target")


class EmbeddingHealth(ValidationSubsetCallback):
    """Logs statistics of the query and target embeddings of the first validation samples.

    Logged (``diag/…``, at each reported validation, on rank 0):

    - ``alignment``: mean ``||q - t||^2`` over positive pairs; ``uniformity/{query,target}``:
      ``log E exp(-2 ||x_i - x_j||^2)`` (Wang & Isola 2020).
    - ``cosine/positive``, ``cosine/hardest_negative`` (each query's most similar wrong target,
      within the subset) and ``cosine/gap`` between them.
    - ``std_ratio/{query,target}``: mean per-dimension std times ``sqrt(d)``: about 1 for a
      spread-out space, near 0 when it collapses; a warning is given, once, when it falls below
      ``collapse_threshold`` in a stage whose contrastive loss is in force (not in stage 1's
      warm-up, where nothing trains the embedding to spread out; the value is logged there too).
    - ``effective_rank/{query,target}`` (Roy & Vetterli 2007), between 1 and ``min(N, d)``.
    - ``norm/{query,target}``: mean norm of the vector that is L2-normalised into the embedding
      (the [EMBED] state after the optional projection).
    - ``temperature``: the contrastive temperature in force, ``1 / logit_scale``.

    Args:
        num_samples: Size of the fixed validation subset.
        every_n_epochs: Report on every n-th validation run.
        collapse_threshold: ``std_ratio`` below which the collapse warning is given.
    """

    def __init__(self, num_samples: int = 64, every_n_epochs: int = 1, collapse_threshold: float = 0.1) -> None:
        super().__init__(num_samples, every_n_epochs)
        if not 0 < collapse_threshold < 1:
            raise ValueError(f"EmbeddingHealth.collapse_threshold must lie in (0, 1), got {collapse_threshold!r}")
        self.collapse_threshold = collapse_threshold
        self.warned = False

    def collect(self, pl_module: DiagnosedModule, outputs: EvalOutput, batch: dict[str, Any]) -> None:
        columns = {}
        for side in SIDES:
            out = getattr(outputs, side)
            columns[side] = out.embedding.float()
            columns[f"{side}_norm"] = out.projected.float().norm(dim=-1)
        self.rows.add(**columns)

    def statistics(self, pl_module: DiagnosedModule) -> dict[str, float]:
        """The statistics of the collected subset, keyed by metric name."""
        query, target = self.rows.tensor("query"), self.rows.tensor("target")
        positive, hardest = positive_and_hardest_negative(query, target)
        metrics = {
            "diag/alignment": alignment(query, target),
            "diag/cosine/positive": positive,
            "diag/cosine/hardest_negative": hardest,
            "diag/cosine/gap": positive - hardest,
            "diag/temperature": float(1.0 / pl_module.logit_scale.detach()),
        }
        for side, x in (("query", query), ("target", target)):
            metrics[f"diag/uniformity/{side}"] = uniformity(x)
            metrics[f"diag/std_ratio/{side}"] = std_ratio(x)
            metrics[f"diag/effective_rank/{side}"] = effective_rank(x)
            metrics[f"diag/norm/{side}"] = float(self.rows.tensor(f"{side}_norm").mean())
        return metrics

    def report(self, trainer: Trainer, pl_module: LightningModule) -> None:
        metrics = self.statistics(pl_module)
        for name, value in metrics.items():
            pl_module.log(name, value, rank_zero_only=True)
        low = {side: metrics[f"diag/std_ratio/{side}"] for side in SIDES}
        low = {side: ratio for side, ratio in low.items() if ratio < self.collapse_threshold}
        # Only where InfoNCE trains the embedding: in a stage without it (stage 1's warm-up) nothing
        # spreads the embeddings out, and a collapsed space there says nothing about the run.
        spec = getattr(pl_module, "stage_spec", None)
        contrastive = spec is None or spec.contrastive_loss_weight > 0
        if low and contrastive and not self.warned:
            self.warned = True
            sides = ", ".join(f"{side} {ratio:.3f}" for side, ratio in low.items())
            rank_zero_warn(
                f"embedding collapse alarm at step {trainer.global_step}: per-dimension std x sqrt(d) is {sides}, "
                f"below {self.collapse_threshold} (about 1 for a spread-out space); the embeddings are "
                "converging to one point (this warning is given once)"
            )

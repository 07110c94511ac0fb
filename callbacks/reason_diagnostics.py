"""Reason-token diagnostics: do the K reason states carry distinct information, and does [EMBED] read them?"""

from __future__ import annotations

from typing import Any

import torch
from lightning import LightningModule, Trainer

from callbacks.attention_probe import embed_attention_shares, last_layer_attention
from callbacks.space_stats import mean_pairwise_cosine
from callbacks.validation_subset import ValidationSubsetCallback


class ReasonDiagnostics(ValidationSubsetCallback):
    """Logs what the K reason tokens do, on the queries of the first validation samples.

    Logged (``diag/…``):

    - ``reason/norm/mean`` and ``reason/norm/token{k}``: the norm of each reason state.
    - ``reason/pairwise_cosine``: the mean cosine between a query's K reason states (near 1:
      they have collapsed into one).
    - ``attention/{input,reason,embed}``: the share of [EMBED]'s last-layer attention (averaged
      over heads) that lands on the raw input, the reason tokens and [EMBED] itself; they sum to
      1, and with ``bottleneck_mask`` the input share is 0. Measured by a second, eager-attention
      forward of the subset's query batches (``attention: false`` skips it).
    - ``decoder_loss/stage{1,2}``: the decoder's reconstruction loss over the whole validation
      split (all ranks), under the name of the stage in force, so that the stages' curves part.

    Subset statistics come from rank 0; the decoder loss is summed over ranks (every rank joins).

    Args:
        num_samples: Size of the fixed validation subset.
        every_n_epochs: Report the subset statistics on every n-th validation run.
        attention: Measure the attention shares.
    """

    def __init__(self, num_samples: int = 64, every_n_epochs: int = 1, attention: bool = True) -> None:
        super().__init__(num_samples, every_n_epochs)
        self.attention = attention
        self._decoder_sum = 0.0
        self._decoder_count = 0

    # ----------------------------------------------------------------------------- subset

    def collect(self, pl_module: LightningModule, outputs: dict[str, Any], batch: dict[str, Any]) -> None:
        k = pl_module.encoder.num_reason_tokens
        columns: dict[str, torch.Tensor] = {"reason": outputs["query"].reason_states.float()}
        if self.attention:
            with last_layer_attention(pl_module.encoder.backbone) as records:
                pl_module.encode(batch["query"])
            for name, share in embed_attention_shares(records[-1], k).items():
                columns[f"attention_{name}"] = share
        if k == 0:
            del columns["reason"]
            if not self.attention:
                return
        self.rows.add(**columns)

    def statistics(self) -> dict[str, float]:
        """The statistics of the collected subset, keyed by metric name."""
        metrics: dict[str, float] = {}
        if "reason" in self.rows:
            norms = self.rows.tensor("reason").norm(dim=-1)  # (N, K)
            metrics["diag/reason/norm/mean"] = float(norms.mean())
            for k, value in enumerate(norms.mean(0).tolist()):
                metrics[f"diag/reason/norm/token{k}"] = value
            if norms.shape[1] >= 2:
                metrics["diag/reason/pairwise_cosine"] = mean_pairwise_cosine(self.rows.tensor("reason"))
        for name in ("input", "reason", "embed"):
            if f"attention_{name}" in self.rows:
                metrics[f"diag/attention/{name}"] = float(self.rows.tensor(f"attention_{name}").mean())
        return metrics

    def report(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for name, value in self.statistics().items():
            pl_module.log(name, value, rank_zero_only=True)

    # ----------------------------------------------------------------------------- decoder loss

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_validation_epoch_start(trainer, pl_module)
        self._decoder_sum, self._decoder_count = 0.0, 0

    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        super().on_validation_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        decoder = outputs.get("terms", {}).get("decoder") if isinstance(outputs, dict) else None
        if decoder is not None:
            rows = outputs.get("decoder_rows", len(outputs["keys"]))  # the term averages over labelled rows
            self._decoder_sum += float(decoder) * rows
            self._decoder_count += rows

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_validation_epoch_end(trainer, pl_module)
        if trainer.sanity_checking or getattr(pl_module, "decoder", None) is None:
            return
        # Every rank gets here once per validation run, so the reduction cannot be left waiting.
        totals = torch.tensor([self._decoder_sum, float(self._decoder_count)], device=pl_module.device)
        totals = trainer.strategy.reduce(totals, reduce_op="sum")
        if totals[1] > 0:
            pl_module.log(f"diag/decoder_loss/stage{pl_module.stage}", float(totals[0] / totals[1]), rank_zero_only=True)

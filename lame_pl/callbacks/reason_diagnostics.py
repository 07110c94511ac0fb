"""Reason-token diagnostics: do the K reason states carry distinct information, and does [EMBED] read them?"""

from __future__ import annotations

from typing import Any

import torch
from lightning import LightningModule, Trainer

from lame_pl.callbacks.attention_probe import embed_attention_shares, last_layer_attention
from lame_pl.callbacks.space_stats import mean_pairwise_cosine
from lame_pl.callbacks.tensorboard_writer import logged_step, summary_writer
from lame_pl.callbacks.validation_subset import ValidationSubsetCallback
from lame_pl.eval_output import DiagnosedModule, EvalOutput


class ReasonDiagnostics(ValidationSubsetCallback):
    """Logs what the K reason tokens do, on the queries of the first validation samples.

    Logged (``diag/…``):

    - ``reason/norm/mean`` and ``reason/norm/token{k}``: the norm of each reason state.
    - ``reason/pairwise_cosine``: the mean cosine between a query's K reason states (near 1:
      they have collapsed into one).
    - ``attention/{input,reason,embed}``: the share of [EMBED]'s last-layer attention (averaged
      over heads) that lands on the raw input, the reason tokens and [EMBED] itself; they sum to
      1, and with ``bottleneck_mask`` the input share is 0. Measured by a second, eager-attention
      forward of the subset's query batches (``attention: false`` skips it), in the encode mode
      in force: under ``explicit_cot`` the middle share is ``attention/generated``, the text it
      wrote (``lame_pl.modes.TokenLayout``).
    - ``decoder_loss/stage{1,2}``: the decoder's reconstruction loss over the whole validation
      split (all ranks), under the name of the stage in force, so that the stages' curves part.
    - ``latent_text/word_f1`` and ``latent_text/chance_word_f1``: the latent decoder's greedy
      text from the reason states of the first ``num_texts`` labelled queries, its word overlap
      with each query's own label, and with the other queries' labels (chance); the texts
      themselves go to TensorBoard's Text tab (``diag/latent_text``) beside their labels.
    - ``latent_text/information``: over the subset's labelled queries, the decoder's loss with
      each row's reason states taken from another row, minus its loss with the row's own (nats
      per token): what the reason states tell the decoder beyond the labels' common form. About 0
      when the decoder reads nothing from them, whatever its loss.

    Subset statistics come from rank 0; the decoder loss is summed over ranks (every rank joins).

    Args:
        num_samples: Size of the fixed validation subset.
        every_n_epochs: Report the subset statistics on every n-th validation run.
        attention: Measure the attention shares.
        num_texts: Queries whose latent text is decoded and logged (0: none).
        max_text_tokens: Most tokens of each decoded text.
    """

    def __init__(
        self,
        num_samples: int = 64,
        every_n_epochs: int = 1,
        attention: bool = True,
        num_texts: int = 8,
        max_text_tokens: int = 32,
    ) -> None:
        super().__init__(num_samples, every_n_epochs)
        if not isinstance(num_texts, int) or num_texts < 0 or num_texts == 1:
            raise ValueError(
                f"ReasonDiagnostics.num_texts must be 0 or an integer >= 2 (chance compares rows), got {num_texts!r}"
            )
        if not isinstance(max_text_tokens, int) or max_text_tokens < 1:
            raise ValueError(f"ReasonDiagnostics.max_text_tokens must be an integer >= 1, got {max_text_tokens!r}")
        self.attention = attention
        self.num_texts = num_texts
        self.max_text_tokens = max_text_tokens
        self._tokenizer = None
        self._decoder_sum = 0.0
        self._decoder_count = 0
        self._information = [0.0, 0.0, 0]  # loss sums with own and with other rows' states, tokens

    # ----------------------------------------------------------------------------- subset

    def collect(self, pl_module: DiagnosedModule, outputs: EvalOutput, batch: dict[str, Any]) -> None:
        states = outputs.query.reason_states
        columns: dict[str, torch.Tensor] = {"reason": states.float()}
        if self.attention:
            with last_layer_attention(pl_module.encoder.backbone) as records:
                probed = pl_module.encode(batch["query"])
            layout = pl_module.encoder.settings.layout(probed)
            for name, share in embed_attention_shares(records[-1], layout).items():
                columns[f"attention_{name}"] = share
        if states.shape[1] == 0:  # K = 0, or explicit_cot: no reason states
            del columns["reason"]
            if not self.attention:
                return
        elif self.num_texts and getattr(pl_module, "decoder", None) is not None and "decoder" in batch:
            columns["label"] = self._labels(pl_module, batch["decoder"])
            self._add_information(pl_module, states, batch["decoder"])
        self.rows.add(**columns)

    def _add_information(
        self, pl_module: DiagnosedModule, states: torch.Tensor, decoder_batch: dict[str, torch.Tensor]
    ) -> None:
        """Adds the decoder's loss on the rows that enter the subset, with their own states and rolled by one."""
        room = self.rows.room
        states = states[:room]
        if states.shape[0] < 2:
            return
        rows = {name: value[:room] for name, value in decoder_batch.items()}
        own = pl_module.decoder(states, **rows)
        tokens = own.num_tokens
        if tokens == 0:
            return
        other = pl_module.decoder(states.roll(1, dims=0), **rows)
        self._information[0] += float(pl_module.criterion.decoder(own)) * tokens
        self._information[1] += float(pl_module.criterion.decoder(other)) * tokens
        self._information[2] += tokens

    def _labels(self, pl_module: DiagnosedModule, decoder_batch: dict[str, torch.Tensor]) -> list[str | None]:
        """Each row's decoder label as text (what the decoder is trained to write); ``None`` where unlabelled."""
        if self._tokenizer is None:
            from lame_pl.backbone import build_processor

            self._tokenizer = build_processor(pl_module.backbone_spec).tokenizer
        labelled = decoder_batch.get("labelled")
        labels = []
        for row, (ids, mask) in enumerate(
            zip(decoder_batch["input_ids"], decoder_batch["attention_mask"], strict=True)
        ):
            if labelled is not None and not bool(labelled[row]):
                labels.append(None)
            else:
                labels.append(self._tokenizer.decode(ids[mask.bool()].tolist(), skip_special_tokens=True).strip())
        return labels

    def latent_texts(self, pl_module: DiagnosedModule) -> tuple[list[str], list[str]]:
        """The decoder's greedy texts for the first ``num_texts`` labelled rows, and their labels."""
        from lame_pl.latent_text import decode_reason_states

        if "label" not in self.rows:
            return [], []
        labels = self.rows.values("label")
        rows = [i for i, label in enumerate(labels) if label][: self.num_texts]
        if len(rows) < 2:
            return [], []
        states = self.rows.tensor("reason")[rows].to(pl_module.device)
        decoder = pl_module.decoder
        dtype = next(decoder.parameters()).dtype
        texts = decode_reason_states(decoder, self._tokenizer, states.to(dtype), self.max_text_tokens)
        return texts, [labels[i] for i in rows]

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
        for name in ("input", "reason", "generated", "embed"):
            if f"attention_{name}" in self.rows:
                metrics[f"diag/attention/{name}"] = float(self.rows.tensor(f"attention_{name}").mean())
        return metrics

    def report(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for name, value in self.statistics().items():
            pl_module.log(name, value, rank_zero_only=True)
        own, other, tokens = self._information
        if tokens:
            pl_module.log("diag/latent_text/information", (other - own) / tokens, rank_zero_only=True)
        texts, labels = self.latent_texts(pl_module)
        if not texts:
            return
        from lame_pl.latent_text import overlap_against_chance

        for name, value in overlap_against_chance(texts, labels).items():
            pl_module.log(f"diag/latent_text/{name}", value, rank_zero_only=True)
        writer = summary_writer(trainer, type(self).__name__)
        if writer is not None:

            def cell(text: str) -> str:
                return text.replace("|", "\\|").replace("\n", " ") or "(empty)"

            table = "| label | decoded from the reason states |\n|---|---|\n" + "\n".join(
                f"| {cell(label)} | {cell(text)} |" for text, label in zip(texts, labels, strict=True)
            )
            writer.add_text("diag/latent_text", table, logged_step(trainer))

    # ----------------------------------------------------------------------------- decoder loss

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_validation_epoch_start(trainer, pl_module)
        self._decoder_sum, self._decoder_count = 0.0, 0
        self._information = [0.0, 0.0, 0]

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        super().on_validation_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        decoder = outputs.terms.get("decoder") if isinstance(outputs, EvalOutput) else None
        if decoder is not None:
            rows = outputs.decoder_rows  # the term averages over labelled rows
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
            pl_module.log(
                f"diag/decoder_loss/stage{pl_module.stage}", float(totals[0] / totals[1]), rank_zero_only=True
            )

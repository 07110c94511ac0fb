"""Saves what ``lightning predict`` computes: each sample's embeddings, key and text, as shards."""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lame_pl.embeddings_folder import (
    EMBEDDINGS_FORMAT,
    SIDES,
    SUMMARY_FILE,
    ShardInfo,
    scan_shards,
    shard_stem,
    write_shard,
)

# Lightning looks for the batch indices of a prediction writer's loader and warns that an iterable
# dataset (the WebDataset loaders) has none; this writer orders rows by rank and row, not by them.
warnings.filterwarnings("ignore", message=r"Couldn't infer the batch indices fetched from your dataloader")

_EXAMPLES = 10  # skipped keys named in the summary


class EmbeddingWriter(BasePredictionWriter):
    """Writes the predict split's embeddings into a folder of shards (format: ``lame_pl.embeddings_folder``).

    Each rank writes ``rank{R:03d}-{first_row:09d}.safetensors`` (float32 ``query`` and/or
    ``target``) and a ``.jsonl`` of ``{"key", "text"}`` beside it, one shard per
    ``rows_per_shard`` rows, so memory holds one shard, not the split (the trainer is told not
    to keep the predictions too). Items the data left out as unreadable are recorded in the
    shard metadata and counted; at the end ``embeddings.json`` sums the run up and one line says
    how many rows were written, kept and skipped. Read the folder with
    ``lame_pl.embeddings_folder.load_embeddings``.

    Without ``resume``, the shards of an earlier run in the folder are removed first (other files
    are left alone). With ``resume``, whole shards are kept and their items (written or skipped)
    are not computed again, where the data module can leave items out
    (``skip_predicted(keys)``: ``datamodules.CorpusDataModule``); new shards continue each
    rank's row numbers. Broken or unfinished shards are removed and redone. A WebDataset split
    (``ImageTextDataModule``, the test split) streams and cannot skip rows: resume warns and
    recomputes everything.

    Args:
        path: The output folder.
        rows_per_shard: Rows after which a shard is written (a shard ends at a batch boundary,
            so it may hold a little more; the last one of a rank fewer).
        resume: Keep the whole shards of an earlier run and compute only the missing items. The
            shards must come from the same checkpoint (file, size and modification time), encode
            mode, prompt layout and corpus content, or the run stops naming what differs.
        checkpoint: The checkpoint the predict run embeds with, recorded in every shard (and so
            in an index built from them); the CLI fills it from ``--ckpt_path``. Resuming needs it.
    """

    def __init__(
        self,
        path: str = "runs/embeddings",
        rows_per_shard: int = 65536,
        resume: bool = False,
        checkpoint: str | None = None,
    ) -> None:
        super().__init__(write_interval="batch")
        if rows_per_shard < 1:
            raise ValueError(f"EmbeddingWriter.rows_per_shard must be >= 1, got {rows_per_shard}")
        self.path = Path(path)
        self.rows_per_shard = rows_per_shard
        self.resume = resume
        self.checkpoint = checkpoint
        self._model: dict[str, Any] = {}
        self._reset()

    def _reset(self) -> None:
        self._keys: list[str] = []
        self._texts: list[str | None] = []
        self._sides: dict[str, list[torch.Tensor]] = {}
        self._shard_skipped: list[str] = []  # keys skipped since the last shard, recorded in the next
        self._first_row = 0
        self._computed = 0
        self._skip_count = 0  # this rank, this run: keyed (corpus) and unkeyed (shard pipeline) skips
        self._skip_examples: list[str] = []
        self._kept_rows = 0
        self._kept_skipped: list[str] = []
        self._info: dict[str, Any] = {}

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Before the predict loader is built: clean the folder, or find what a resumed run may skip."""
        if stage != "predict":
            return
        self._reset()
        # The shards are the output; keeping every batch's embeddings in memory too would hold
        # the whole corpus, which sharding exists to avoid.
        trainer.predict_loop.return_predictions = False
        datamodule = trainer.datamodule
        info = getattr(datamodule, "corpus_info", None)
        self._info = dict(info) if isinstance(info, Mapping) else {}
        self._model = model_identity(pl_module, self.checkpoint)
        skip = getattr(datamodule, "skip_predicted", None) if self.resume else None
        if skip is not None and not self.checkpoint:
            raise ValueError(
                "EmbeddingWriter.resume needs the checkpoint the rows are embedded with: run predict with "
                "--ckpt_path, or give EmbeddingWriter(checkpoint=...)"
            )
        if self.path.exists() and not self.path.is_dir():
            raise NotADirectoryError(f"EmbeddingWriter.path {self.path} is a file, not a folder")
        # Read once (every shard's JSONL): checked, cleaned and resumed from. Cleaning removes
        # only broken files when resuming, so the whole shards read here stay as they are.
        whole, broken = scan_shards(self.path)
        if skip is not None:
            self._check_same_corpus(whole)
        if trainer.is_global_zero:
            self._clean(whole, broken, keep=skip is not None, datamodule=datamodule)
        trainer.strategy.barrier("embedding_writer_clean")
        if skip is None:
            rank_zero_info(f"EmbeddingWriter: writing the predict split's embeddings to {self.path}/")
            return
        mine = [s for s in whole if s.rank == trainer.global_rank]
        self._first_row = max((s.end_row for s in mine), default=0)
        self._kept_rows = sum(len(s.keys) for s in whole)
        self._kept_skipped = [k for s in whole for k in s.skipped]
        left_out = skip({k for s in whole for k in s.keys} | set(self._kept_skipped))
        items = self._info.get("items")
        if not whole:
            rank_zero_info(f"EmbeddingWriter: writing embeddings to {self.path}/ (resume: no earlier shard there)")
            return
        rank_zero_info(
            f"EmbeddingWriter: resuming in {self.path}/: {len(whole)} whole shard(s) with "
            f"{self._kept_rows} rows kept, {left_out} item(s) not computed again"
            + (f", {items - left_out} to compute" if isinstance(items, int) else "")
        )
        if isinstance(items, int) and items == left_out:  # Lightning skips the loop and its hooks
            self._finish(trainer, pl_module)

    def _corpus_metadata(self) -> dict[str, str]:
        """What each shard records: the model that embedded it and, for a user's corpus, the corpus."""
        metadata = {"model": json.dumps(self._model, sort_keys=True)}
        if "corpus" not in self._info:
            return metadata
        return {
            **metadata,
            "corpus": str(self._info["corpus"]),
            "source": str(self._info.get("source") or ""),
            "instruction": str(self._info.get("instruction") or ""),
            "content": str(self._info.get("content") or ""),
            "max_text_length": str(self._info.get("max_text_length") or ""),
        }

    def _check_same_corpus(self, whole: list[ShardInfo]) -> None:
        """A resumed run adds to shards of the same corpus, embedded the same way by the same model,
        or fails naming what differs."""
        wanted = self._corpus_metadata()
        for shard in whole:
            differs = [key for key in wanted if shard.metadata.get(key, "") != wanted[key]]
            if differs:
                found = {key: shard.metadata.get(key, "(none)") for key in differs}
                here = {key: wanted[key] for key in differs}
                raise ValueError(
                    f"EmbeddingWriter.resume: {shard.path} was embedded with other {', '.join(differs)} "
                    f"({found} here: {here}); give another path or resume false"
                )

    def _clean(self, whole: list[ShardInfo], broken: list[Path], keep: bool, datamodule: Any) -> None:
        if self.resume and not keep and whole:
            rank_zero_warn(
                f"EmbeddingWriter.resume: {type(datamodule).__name__} streams its rows and cannot "
                f"skip those already written; recomputing all of them into {self.path}/"
            )
        stale = broken + ([] if keep else [p for s in whole for p in (s.path, s.path.with_suffix(".jsonl"))])
        for path in stale:  # a smaller rerun must not leave rows of the last one behind
            path.unlink(missing_ok=True)
        if stale:
            what = "broken or unfinished" if keep else "earlier run's"
            rank_zero_info(f"EmbeddingWriter: removed {len(stale)} file(s) of the {what} shards in {self.path}/")

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        keys = list(prediction["keys"])
        texts = prediction.get("texts")
        self._keys += keys
        self._texts += list(texts) if texts is not None else [None] * len(keys)
        for side in SIDES:
            if side in prediction:
                self._sides.setdefault(side, []).append(prediction[side].detach().float().cpu())
        if isinstance(batch, Mapping):
            skipped_keys = list(batch.get("skipped_keys") or [])
            self._shard_skipped += skipped_keys
            self._skip_examples += skipped_keys[: max(0, _EXAMPLES - len(self._skip_examples))]
            self._skip_count += sum((batch.get("skipped") or {}).values())  # {reason: count}, keyed or not
        if len(self._keys) >= self.rows_per_shard:
            self._flush(trainer.global_rank)

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._flush(trainer.global_rank)
        self._finish(trainer, pl_module)

    def _finish(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Sums the run up over ranks: ``embeddings.json`` and one line."""
        # The strategy's device: this may run in setup, before the module is moved there.
        counts = torch.tensor([float(self._computed), float(self._skip_count)], device=trainer.strategy.root_device)
        if trainer.world_size > 1:
            counts = trainer.strategy.reduce(counts, reduce_op="sum")
        if not trainer.is_global_zero:
            return
        computed, skipped_now = int(counts[0]), int(counts[1])
        skipped = skipped_now + len(self._kept_skipped)
        rows = computed + self._kept_rows
        examples = (self._kept_skipped + self._skip_examples)[:_EXAMPLES]
        blank = int(self._info.get("blank_lines") or 0)
        summary = {
            "format": EMBEDDINGS_FORMAT,
            "rows": rows,
            "computed": computed,
            "resumed": self._kept_rows,
            "skipped": skipped,
            "skipped_examples": examples,
            "blank_lines": blank,
            **{k: v for k, v in self._info.items() if k != "blank_lines"},
        }
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / SUMMARY_FILE).write_text(
            json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        if rows == 0:
            rank_zero_warn(f"EmbeddingWriter: the predict split is empty; nothing written to {self.path}")
            return
        line = f"EmbeddingWriter: {rows} rows in {self.path}/ ({computed} computed, {self._kept_rows} kept)"
        if blank:
            line += f"; {blank} blank line(s) left out"
        if skipped:
            rank_zero_warn(
                f"{line}; skipped {skipped} unreadable item(s), e.g. {', '.join(examples[:3])} "
                f"(all counted in {self.path / SUMMARY_FILE})"
            )
        else:
            rank_zero_info(line)

    def _flush(self, rank: int) -> None:
        if not self._keys:
            return
        tensors = {side: torch.cat(parts) for side, parts in self._sides.items()}
        metadata = {"skipped": json.dumps(self._shard_skipped, ensure_ascii=False), **self._corpus_metadata()}
        write_shard(self.path, shard_stem(rank, self._first_row), self._keys, self._texts, tensors, metadata)
        self._first_row += len(self._keys)
        self._computed += len(self._keys)
        self._keys, self._texts, self._sides, self._shard_skipped = [], [], {}, []


def model_identity(pl_module: LightningModule, checkpoint: str | None) -> dict[str, Any]:
    """What the embeddings depend on besides the data: the checkpoint file and how it encodes."""
    from lame_pl.prompt import LAYOUT_VERSION

    identity: dict[str, Any] = {"module": type(pl_module).__name__, "layout": LAYOUT_VERSION, "checkpoint": None}
    if checkpoint:
        path = Path(checkpoint).resolve()
        stat = path.stat()
        identity.update(checkpoint=str(path), checkpoint_file=f"{stat.st_size}:{stat.st_mtime_ns}")
    encoder = getattr(pl_module, "encoder", None)
    if encoder is not None:
        identity.update(encode_mode=str(encoder.encode_mode), num_reason_tokens=int(encoder.num_reason_tokens))
    return identity

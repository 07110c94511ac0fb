"""The LightningModule: LaME's two training stages as switchable phases of one module."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from lightning import LightningModule
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lame_pl.backbone import (
    BackboneSpec,
    DecoderSpec,
    backbone_files,
    build_backbone,
    build_decoder,
    enable_activation_checkpointing,
)
from lame_pl.checkpoint import BACKBONE_FILES, DECODER_FILES, DECODER_OUTPUT_IDS, STAGE_KEY
from lame_pl.decoder import LatentDecoder
from lame_pl.distributed import global_count, world_size
from lame_pl.eval_output import EvalOutput
from lame_pl.evaluated_step import EvaluatedStep
from lame_pl.gradcache import gradcache_step
from lame_pl.init_from import load_init_weights
from lame_pl.losses import MAX_LOGIT_SCALE, LaMELoss
from lame_pl.model import EncoderOutput, build_encoder, text_config
from lame_pl.modes import EncodeMode, EncodeSettings
from lame_pl.nonfinite import NONFINITE_KEY, ZERO_GRADIENT_KEY, NonFiniteGuard, check_finite_weights
from lame_pl.optimization import check_resumable, configure_adamw
from lame_pl.optimizer_steps import OptimizerSteps
from lame_pl.restoring import RestoredFromFile, is_restoring
from lame_pl.retrieval_metric import SplitRetrieval
from lame_pl.row_chunks import first_row
from lame_pl.sharding import check_evaluation, check_strategy, lockstep, shard, uniform_submodules
from lame_pl.stages import Stage1Spec, Stage2Spec, StageSpec, apply_stage
from lame_pl.trainable import low_precision_trainable, trainable_summary


class LaMEModule(OptimizerSteps, RestoredFromFile, EvaluatedStep, LightningModule):
    """LaME: a Qwen-VL encoder with K reason tokens, [EMBED] pooling and a latent decoder.

    Args:
        backbone: Where the vision-language backbone comes from (a local path or a preset).
        decoder: The latent decoder; ``None`` trains [EMBED] contrastively without it.
        num_reason_tokens: K, the number of learnable reason tokens; 0 is the discriminative baseline.
        bottleneck_mask: Let [EMBED] attend to the reason tokens only.
        embed_dim: Width of an optional linear projection of [EMBED].
        stage: The stage this run starts in: 1 (bottleneck warm-up) or 2 (joint training).
        stage1: What stage 1 trains and its loss weights; a partial spec keeps stage 1's defaults
            for the rest (the paper's warm-up: backbone frozen, decoder loss only); ``None`` is
            those defaults.
        stage2: What stage 2 trains and its loss weights; a partial spec keeps stage 2's defaults
            for the rest (the language model trains, contrastive + decoder loss); ``None`` is
            those defaults.
        temperature: InfoNCE temperature (its start value when learnable).
        learnable_temperature: Learn the temperature (as a log logit scale, capped at 100).
        lr: Peak learning rate of AdamW.
        decoder_lr: Peak learning rate of the latent decoder (projector and LM), in its own
            AdamW parameter group under the same schedule; ``None`` is ``lr``. A decoder trained
            from scratch beside a slowly tuned encoder may need a larger one to learn to read the
            reason states at all (the demo's does: ``configs/demo/base.yaml``).
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warm-up steps at the start of each stage's optimiser.
        lr_schedule: Shape after warm-up.
        init_from: A checkpoint whose weights (not optimiser) start this run, e.g. stage 1's
            ``last.ckpt`` for a stage-2 run.
        gradient_checkpointing: Recompute the backbone's and decoder's activations in the
            backward pass, trading compute for memory (large batches on real backbones).
        encode_mode: ``discriminative`` (K must be 0), ``lame``, ``latent_sequential`` or
            ``explicit_cot`` (inference only; a decoder is kept but unused); ``None`` is ``lame``
            when K > 0, else ``discriminative``. See ``lame_pl.modes``. Given with
            ``--ckpt_path``, it wins over the checkpoint's own (``lame_pl.cli``).
        cot_tokens: T, the tokens ``explicit_cot`` generates before [EMBED] (it stops a row
            early at the tokenizer's end-of-text tokens).
        gradcache_chunk_size: Train with GradCache (``lame_pl.gradcache``): encode each side of
            a batch in chunks of this many rows, for the gradient of the full (global) batch's
            loss at the activation memory of one chunk, for one extra forward pass when the
            stage has a contrastive loss. ``None`` encodes each side in one piece.
        max_nonfinite_steps: A step whose loss or gradient norm is not finite is skipped (no
            weight or optimiser state changes) and counted (``train/nonfinite_steps``), as is one
            whose gradient is all zero with a non-zero loss (``train/zero_gradient_steps``); this
            many skipped in a row stop the run (``lame_pl.nonfinite``).
    """

    def __init__(
        self,
        backbone: BackboneSpec,
        decoder: DecoderSpec | None = None,
        num_reason_tokens: int = 8,
        bottleneck_mask: bool = False,
        embed_dim: int | None = None,
        stage: int = 1,
        stage1: Stage1Spec | None = Stage1Spec(),  # noqa: B008 (frozen: safe to share)
        stage2: Stage2Spec | None = Stage2Spec(),  # noqa: B008
        temperature: float = 0.02,
        learnable_temperature: bool = False,
        lr: float = 5e-5,
        decoder_lr: float | None = None,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_schedule: Literal["constant", "cosine", "linear"] = "constant",
        init_from: str | None = None,
        gradient_checkpointing: bool = False,
        encode_mode: EncodeMode | None = None,
        cot_tokens: int | None = None,
        gradcache_chunk_size: int | None = None,
        max_nonfinite_steps: int = 5,
    ) -> None:
        super().__init__()
        if stage not in (1, 2):
            raise ValueError(f"model.stage must be 1 or 2, got {stage!r}")
        # The mode's settings, checked once here (named as config keys); encoder.settings from then on.
        settings = EncodeSettings.resolve(encode_mode, num_reason_tokens, bottleneck_mask, cot_tokens, owner="model.")
        if decoder is not None and num_reason_tokens == 0:
            raise ValueError(
                "model.decoder is set but model.num_reason_tokens is 0: the decoder reads the reason states"
            )
        if gradcache_chunk_size is not None and gradcache_chunk_size < 1:
            raise ValueError(f"model.gradcache_chunk_size must be >= 1 (or null), got {gradcache_chunk_size}")
        if not temperature > 0:
            raise ValueError(f"model.temperature must be > 0, got {temperature}")
        if 1.0 / temperature > MAX_LOGIT_SCALE:
            # The logit scale is capped (logit_scale): such a run would train at 0.01, not as configured.
            raise ValueError(
                f"model.temperature {temperature} is below {1 / MAX_LOGIT_SCALE}, "
                f"the floor set by the logit scale's cap of {MAX_LOGIT_SCALE:g}"
            )
        if isinstance(max_nonfinite_steps, bool) or not isinstance(max_nonfinite_steps, int) or max_nonfinite_steps < 1:
            raise ValueError(f"model.max_nonfinite_steps must be an integer >= 1, got {max_nonfinite_steps!r}")
        if decoder_lr is not None and not decoder_lr > 0:
            raise ValueError(f"model.decoder_lr must be > 0 (or null for model.lr), got {decoder_lr}")
        if decoder_lr is not None and decoder is None:
            raise ValueError("model.decoder_lr is set but model.decoder is null: there is no decoder to train")
        if init_from is not None and not Path(init_from).is_file():
            raise FileNotFoundError(f"model.init_from {init_from!r} is not a file")
        self.save_hyperparameters()
        # Under LightningCLI, hparams hold the raw config (dicts), so keep the typed specs here.
        self.backbone_spec, self.decoder_spec = backbone, decoder
        # None (older checkpoints' hyper-parameters, `stage2: null`) is the stage's defaults.
        self.stages: dict[int, StageSpec] = {1: stage1 or Stage1Spec(), 2: stage2 or Stage2Spec()}
        self.stage = stage
        self._summarised_stage: int | None = None
        self.configure_models(settings)
        self.configure_losses()
        self.configure_metrics()
        self._nonfinite = NonFiniteGuard(max_nonfinite_steps)
        if init_from is not None:
            load_init_weights(self, init_from)
        self.set_stage(stage)

    # ----------------------------------------------------------------------------- building

    def configure_models(self, settings: EncodeSettings) -> None:
        """Builds the encoder (backbone + latent tokens), the decoder and the logit scale."""
        hp = self.hparams
        pretrained = not is_restoring()
        backbone = build_backbone(self.backbone_spec, pretrained=pretrained)
        self.encoder = build_encoder(backbone, embed_dim=hp.embed_dim, settings=settings)
        self.decoder = None
        if self.decoder_spec is not None:
            language_model = build_decoder(self.decoder_spec, self.backbone_spec.attn_implementation, pretrained)
            self.decoder = LatentDecoder(
                language_model, input_dim=text_config(backbone).hidden_size, output_ids=self.decoder_spec.output_ids()
            )
        if hp.gradient_checkpointing:
            enable_activation_checkpointing(backbone)
            if self.decoder is not None:
                enable_activation_checkpointing(self.decoder.language_model)
        # from_pretrained returns modules in eval mode; the module trains unless Lightning says otherwise.
        self.encoder.train()
        if self.decoder is not None:
            self.decoder.train()
        # Shape (1,), not a 0-d scalar: FSDP and DeepSpeed refuse 0-d parameters.
        log_scale = torch.tensor([math.log(1.0 / hp.temperature)])
        self.log_logit_scale = nn.Parameter(log_scale, requires_grad=hp.learnable_temperature)
        self.register_load_state_dict_pre_hook(_scalar_logit_scale_to_vector)

    def configure_model(self) -> None:
        """Shards the module with FSDP2 under Lightning's ``ModelParallelStrategy`` (``lame_pl.sharding``)."""
        shard(self)

    def setup(self, stage: str) -> None:
        check_strategy(self.trainer.strategy, self.hparams.get("gradcache_chunk_size"))
        uniform_submodules(self)
        self._restrict_decoder_labels()

    def on_fit_start(self) -> None:
        # Again after a --ckpt_path restore, whose stored output ids win over the vocabulary file's;
        # the training loader is made after this hook.
        self._restrict_decoder_labels()
        self.forget_checkpoint_step()

    def _restrict_decoder_labels(self) -> None:
        """Gives a restricted decoder's output ids to the data module, which then leaves a row whose
        label needs another token out of the decoder loss, and counts it (``decoder_unseen_token``)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.decoder is None or not self.decoder.restricted:
            return
        if hasattr(getattr(datamodule, "collator", None), "set_output_ids"):
            datamodule.set_decoder_output_ids(self.decoder.output_ids.tolist())

    def on_validation_start(self) -> None:
        check_evaluation(self, "validation")

    def on_test_start(self) -> None:
        check_evaluation(self, "test")

    def on_predict_start(self) -> None:
        check_evaluation(self, "predict")

    def configure_losses(self) -> None:
        """The loss object: InfoNCE across ranks and the decoder's cross-entropy, as named terms."""
        self.criterion = LaMELoss()

    def configure_metrics(self) -> None:
        """Whole-split retrieval of the validation and test splits, one metric object each."""
        self.retrieval = nn.ModuleDict({s: SplitRetrieval(s, self.encoder.embedding_dim) for s in ("val", "test")})

    @property
    def has_reason_states(self) -> bool:
        """Whether encoding yields reason states (K > 0, not ``explicit_cot``, which generates text instead)."""
        return self.encoder.settings.has_reason_states

    @property
    def decodes(self) -> bool:
        """Whether the decoder has reason states to read."""
        return self.decoder is not None and self.has_reason_states

    @property
    def logit_scale(self) -> torch.Tensor:
        """``1 / temperature``, capped at 100 as in CLIP."""
        return self.log_logit_scale.exp().clamp(max=MAX_LOGIT_SCALE).squeeze(0)

    @property
    def stage_spec(self) -> StageSpec:
        """The spec of the stage in force."""
        return self.stages[self.stage]

    def set_stage(self, stage: int) -> None:
        """Puts the module in ``stage``: freezes and unfreezes parameters (the optimiser is not rebuilt).

        The backbone trains as the stage's spec says; every other part trains only where one
        of the stage's losses reaches it, so that no trainable parameter goes without a
        gradient (DDP refuses those).
        """
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage!r}")
        spec = self.stages[stage]
        if self.decoder is None and spec.contrastive_loss_weight == 0:
            raise ValueError(
                f"stage {stage} trains only the decoder loss (contrastive_loss_weight=0) but model.decoder is not set"
            )
        contrastive = spec.contrastive_loss_weight > 0
        # explicit_cot has no reason states (and does not train): nothing reaches the decoder.
        uses_reason = self.has_reason_states
        apply_stage(self.encoder.backbone, spec)
        # The reason vectors reach the decoder through the reason states and InfoNCE through
        # [EMBED], which attends to them.
        self.encoder.reason_embeddings.requires_grad_(uses_reason)
        # [EMBED] is the last position under a causal mask: no reason state sees it, so only
        # InfoNCE reaches it, its projection and the temperature.
        self.encoder.embed_embedding.requires_grad_(contrastive)
        self.encoder.projection.requires_grad_(contrastive)
        self.log_logit_scale.requires_grad_(contrastive and self.hparams.learnable_temperature)
        if self.decoder is not None:
            self.decoder.requires_grad_(uses_reason and spec.decoder_loss_weight > 0)
        self.stage = stage

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.validate_at_the_end()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Once at the start and once after each stage switch (callbacks.StageSwitch).
        if self._summarised_stage != self.stage:
            self._summarised_stage = self.stage
            rank_zero_info(trainable_summary(self, f"stage {self.stage}"))
            low = low_precision_trainable(self)
            if low:
                rank_zero_warn(
                    f"stage {self.stage} trains parameters stored in low precision ({low}): AdamW updates smaller "
                    "than their resolution are lost; load what trains in full in float32 (backbone.dtype, "
                    "decoder.dtype) under precision bf16-mixed, or adapt the language model with lora (float32 "
                    "adapters on low-precision weights)"
                )

    def configure_optimizers(self) -> Any:
        """AdamW over what the stage in force trains, with warm-up and the configured schedule."""
        return configure_adamw(self)

    # ----------------------------------------------------------------------------- steps

    def encode(self, inputs: dict[str, torch.Tensor]) -> EncoderOutput:
        """Encodes one side of a batch (processor outputs) into embeddings and reason states."""
        return self.encoder(**inputs)

    def model_step(self, batch: dict[str, Any], split: str) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict]:
        """The step shared by train, val and test: encode, compute each loss term, weight them.

        In training, a term whose weight is 0 is skipped; in evaluation every term is computed
        so that it can be watched, and the embeddings are returned for retrieval metrics.
        """
        spec = self.stage_spec
        training = split == "train"
        query = self.encode(batch["query"])
        outputs = {"query": query}
        target = negatives = predicted = None
        if not training or spec.contrastive_loss_weight > 0:
            target = self.encode(batch["target"])
            outputs["target"] = target
            has_negatives = "negative" in batch
            # Under FSDP2 and ZeRO-3, a rank without hard negatives runs a forward too (adding
            # nothing) when another rank encodes some: each forward gathers shards on every rank.
            in_step = training and lockstep(self, {"negative": int(has_negatives)})["negative"]
            if has_negatives:
                negatives = self.encode(batch["negative"]).embedding
            elif in_step:
                idle = first_row(batch["query"], self.encoder.spatial_merge_size)
                negatives = self.encode(idle).embedding[:0]
        if self.decodes and (not training or spec.decoder_loss_weight > 0):
            predicted = self.decoder(query.reason_states, **batch["decoder"])
        # Training gathers across ranks; evaluation ranks each rank's batch alone (whole-split
        # retrieval is measured apart).
        terms = self.criterion(
            query.embedding,
            None if target is None else target.embedding,
            negatives,
            self.logit_scale,
            predicted,
            gather=training,
        )
        return self.weighted(terms), terms, outputs

    def weighted(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """The loss: the terms weighted by the stage spec in force."""
        spec = self.stage_spec
        weights = {"contrastive": spec.contrastive_loss_weight, "decoder": spec.decoder_loss_weight}
        return sum(weights[name] * value for name, value in terms.items())

    def _log_losses(
        self, split: str, loss: torch.Tensor, terms: dict[str, torch.Tensor], batch_size: int, decoder_rows: int
    ) -> None:
        # Training logs each step the global batch's terms: on each rank a term is its share of
        # the global mean scaled by the world size (lame_pl.losses), so their average over ranks
        # is that mean. Evaluation logs the epoch mean, averaged over ranks; the decoder term is
        # a mean over labelled rows, so its epoch mean weighs batches by those (NaN for a split
        # without any labelled row: there is nothing to reconstruct).
        per_step = split == "train"
        several = world_size() > 1
        options = dict(on_step=per_step, on_epoch=not per_step, sync_dist=not per_step or several)
        self.log(f"{split}/loss", loss, prog_bar=True, batch_size=batch_size, **options)
        for name, value in terms.items():
            rows = decoder_rows if name == "decoder" else batch_size
            if per_step and name == "decoder" and several:  # the same decision on every rank
                rows = int(global_count(rows, self.device))
            if per_step and rows == 0:  # no labelled row: the term is a placeholder 0, not a loss
                continue
            self.log(f"{split}/loss/{name}", value, batch_size=rows, **options)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        chunk = self.hparams.get("gradcache_chunk_size")
        if chunk:
            self.zero_grad_for_chunks(batch_idx)
            loss, terms = gradcache_step(self, batch, chunk)
        else:
            loss, terms, _ = self.model_step(batch, "train")
        self._nonfinite.watch(loss, terms)
        batch_size, rows = len(batch["keys"]), decoder_rows(batch)
        self._log_losses("train", loss, terms, batch_size, rows)
        self.log("train/temperature", 1.0 / self.logit_scale.detach(), batch_size=batch_size)
        self.log("train/stage", float(self.stage), batch_size=batch_size)
        if "decoder" in batch:
            self.log(
                "train/decoder/labelled_fraction", rows / batch_size, batch_size=batch_size, sync_dist=world_size() > 1
            )
        return loss

    def _eval_step(self, batch: dict[str, Any], split: str) -> EvalOutput:
        loss, terms, outputs = self.model_step(batch, split)
        rows = decoder_rows(batch)
        self._log_losses(split, loss, terms, len(batch["keys"]), rows)
        self.retrieval[split].update(outputs["query"].embedding, outputs["target"].embedding)
        return EvalOutput(
            outputs["query"],
            outputs["target"],
            batch["keys"],
            batch.get("texts"),
            {name: value.detach() for name, value in terms.items()},
            rows,
        )

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> EvalOutput:
        """Logs the losses, keeps the embeddings for whole-split retrieval and returns what callbacks read."""
        return self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> EvalOutput:
        """As ``validation_step``, for the test split."""
        return self._eval_step(batch, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Embeddings of the sides a batch holds, with the samples' keys and texts.

        A split of pairs has both sides; a user's corpus (``datamodules.CorpusDataModule``) one,
        ``query`` for images and ``target`` for texts, and none in a batch whose every image was
        unreadable. ``callbacks.EmbeddingWriter`` writes them to disk; without a prediction
        writer the first batch warns, naming it, since the embeddings would only live in this
        process's memory.

        Returns:
            ``{"keys", "texts"}`` and ``"query"``/``"target"`` for the sides in the batch: the
            embeddings are ``(B, D)`` L2-normalised; ``texts`` are the targets' texts (a
            corpus's lines or image paths), or ``None``.
        """
        if batch_idx == 0 and self._trainer is not None:
            from lightning.pytorch.callbacks import BasePredictionWriter

            if not any(isinstance(c, BasePredictionWriter) for c in self.trainer.callbacks):
                rank_zero_warn(
                    "predict writes no embeddings: add a writer, e.g. --config configs/demo/predict.yaml "
                    "or --trainer.callbacks+=callbacks.EmbeddingWriter --trainer.callbacks.path=DIR"
                )
        out = {"keys": batch["keys"], "texts": batch.get("texts")}
        for side in ("query", "target"):
            if side in batch:
                out[side] = self.encode(batch[side]).embedding
        return out

    # ----------------------------------------------------------------------------- retrieval

    def _retrieval_epoch_end(self, split: str) -> None:
        # Every rank computes (the metric gathers), also one that had no batch.
        metric = self.retrieval[split]
        try:
            self.log_dict(metric.compute(), rank_zero_only=True)
        finally:
            metric.reset()
        self.log_evaluated_step()

    def on_validation_epoch_end(self) -> None:
        self._retrieval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._retrieval_epoch_end("test")

    # ----------------------------------------------------------------------------- checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A checkpoint of non-finite weights would overwrite good ones (last.ckpt): refuse it.
        check_finite_weights(self, self.global_step)
        checkpoint[STAGE_KEY] = self.stage
        checkpoint[NONFINITE_KEY] = self._nonfinite.total
        checkpoint[ZERO_GRADIENT_KEY] = self._nonfinite.dead
        if self.backbone_spec.path is not None:
            # The backbone folder's configs and processor files (not its weights: the state dict
            # holds the trained ones), so that embedding with this file needs no backbone.path.
            checkpoint[BACKBONE_FILES] = backbone_files(self.backbone_spec.path)
        if self.decoder_spec is not None and self.decoder_spec.path is not None:
            checkpoint[DECODER_FILES] = backbone_files(self.decoder_spec.path)  # likewise for decoder.path

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Runs before the weights load and before the optimiser is built, so a run resumed in
        # stage 2 gets stage 2's trainable set (and LoRA adapters) back.
        stage = checkpoint.get(STAGE_KEY, self.stage)
        if stage != self.stage:
            rank_zero_info(f"resuming in stage {stage}, the stage saved in the checkpoint")
        self.set_stage(stage)
        # The counts go on across a resume.
        self._nonfinite.total, self._nonfinite.dead = (
            checkpoint.get(NONFINITE_KEY, 0),
            checkpoint.get(ZERO_GRADIENT_KEY, 0),
        )
        self.remember_checkpoint_step(checkpoint)
        state = checkpoint.get("state_dict")
        if state is not None and self.decoder is not None and self.decoder.restricted:
            # Checkpoints written before the output ids were kept in the weights: those of the
            # vocabulary file this module was built with.
            state.setdefault(DECODER_OUTPUT_IDS, self.decoder.output_ids)
        # Only a resumed fit restores the optimiser; test, predict and the evaluators do not.
        if self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING:
            check_resumable(self, checkpoint)


def decoder_rows(batch: Mapping[str, Any]) -> int:
    """How many rows of ``batch`` carry a decoder label (all of them when the collator says nothing)."""
    labelled = batch.get("decoder", {}).get("labelled")
    return len(batch["keys"]) if labelled is None else int(labelled.sum())


def _scalar_logit_scale_to_vector(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Checkpoints written before the temperature had shape (1,) hold it as a 0-d tensor."""
    key = prefix + "log_logit_scale"
    if key in state_dict and state_dict[key].dim() == 0:
        state_dict[key] = state_dict[key].reshape(1)

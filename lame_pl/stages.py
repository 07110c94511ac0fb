"""What each training stage trains, and how the backbone is frozen or adapted for it.

Each stage has its own spec type whose defaults are that stage's (``Stage1Spec``,
``Stage2Spec``), so that a partial spec (``stage2: {lora: {r: 16}}``) keeps the rest of its
own stage's recipe instead of another stage's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import nn

# The linear layers of a Qwen2 / Qwen2.5 / Qwen3 language model block. VLM2Vec-V2 names more
# (qkv_proj, gate_up_proj, out_proj: other families' spellings) that match nothing in Qwen2-VL.
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True, kw_only=True)
class LoraSpec:
    """LoRA (or DoRA) adapters on the backbone's language model, through ``peft``.

    The defaults are VLM2Vec-V2's Qwen2-VL-2B recipe: ``--lora_r 16`` in
    ``experiments/public/train/train_v2-qwen2vl-2B.sh``; alpha 64 and dropout 0.1 from
    ``src/arguments.py``; DoRA and gaussian initialisation from the ``LoraConfig`` in
    ``src/model/model.py``. Adapter weights are kept in float32 whatever the backbone's dtype
    (as ``peft.get_peft_model`` does), so that small updates are not rounded away.

    Args:
        r: Rank of the adapters.
        alpha: Scaling numerator (``alpha / r``).
        dropout: Dropout on the adapter input.
        use_dora: Weight-decomposed adapters (DoRA): a trained magnitude per output row on top
            of the low-rank direction update.
        init: ``gaussian`` (A drawn with std ``1/r``) or ``kaiming`` (peft's default); B starts
            at zero either way, so an adapted model starts equal to its base.
        target_modules: Names of the linear layers that get adapters.
    """

    r: int = 16
    alpha: int = 64
    dropout: float = 0.1
    use_dora: bool = True
    init: Literal["gaussian", "kaiming"] = "gaussian"
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ValueError(
                f"lora: need r >= 1, alpha > 0 and 0 <= dropout < 1, got r={self.r}, alpha={self.alpha}, "
                f"dropout={self.dropout}"
            )
        if not self.target_modules:
            raise ValueError("lora.target_modules is empty: no layer would get an adapter")


@dataclass(frozen=True, kw_only=True)
class StageSpec:
    """One training stage: which parts of the backbone train, how, and the loss weights.

    Use ``Stage1Spec`` or ``Stage2Spec``, whose defaults are that stage's; this base class has
    no defaults for the fields in which the stages differ, so that it cannot stand in for a
    stage with the other stage's recipe.

    What else trains follows from the losses (``LaMEModule.set_stage``): a parameter that no
    loss of the stage reaches is frozen.

    Args:
        train_vision_tower: Train the vision encoder and its merger.
        train_language_model: Train the backbone's language model: in full, or through
            ``lora`` adapters when that is set.
        lora: Train the language model through LoRA/DoRA adapters instead of its full weights
            (needs ``train_language_model``). Once a stage has added adapters, later stages
            must use them too.
        contrastive_loss_weight: Weight of InfoNCE on [EMBED]; 0 skips the target pass in training
            and freezes what only InfoNCE reaches ([EMBED], its projection, the temperature).
        decoder_loss_weight: Weight (λ) of the decoder's reconstruction cross-entropy; 0 freezes
            the decoder and its projector.
    """

    # How errors name the stage (a class attribute, not a field).
    where: ClassVar[str] = "a stage"

    train_vision_tower: bool = False
    train_language_model: bool
    lora: LoraSpec | None = None
    contrastive_loss_weight: float
    decoder_loss_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.contrastive_loss_weight < 0 or self.decoder_loss_weight < 0:
            raise ValueError(
                f"{self.where}: loss weights must be >= 0, got contrastive_loss_weight="
                f"{self.contrastive_loss_weight}, decoder_loss_weight={self.decoder_loss_weight}"
            )
        if self.contrastive_loss_weight == 0 and self.decoder_loss_weight == 0:
            raise ValueError(f"{self.where} has both loss weights at 0: it would train nothing")
        if self.lora is not None and not self.train_language_model:
            raise ValueError(
                f"{self.where} sets lora but train_language_model is false: lora says how the language model "
                f"trains, so set train_language_model: true, or drop lora to keep it frozen"
            )


@dataclass(frozen=True, kw_only=True)
class Stage1Spec(StageSpec):
    """Stage 1, the bottleneck warm-up (the paper's): backbone frozen, decoder loss only."""

    where: ClassVar[str] = "model.stage1"

    train_language_model: bool = False
    contrastive_loss_weight: float = 0.0


@dataclass(frozen=True, kw_only=True)
class Stage2Spec(StageSpec):
    """Stage 2, joint training (the paper's): the language model trains, InfoNCE joins the decoder loss."""

    where: ClassVar[str] = "model.stage2"

    train_language_model: bool = True
    contrastive_loss_weight: float = 1.0


# Allowed in torch.load(weights_only=True), like the specs in lame_pl.backbone: checkpoints of
# modules built in Python keep these in their hyper-parameters.
torch.serialization.add_safe_globals([LoraSpec, StageSpec, Stage1Spec, Stage2Spec])


def add_lora(language_model: nn.Module, spec: LoraSpec) -> None:
    """Injects LoRA/DoRA adapters into ``language_model`` in place (module paths gain ``base_layer``).

    The adapters are cast to float32 on a low-precision base, as ``peft.get_peft_model`` does
    by default (``inject_adapter_in_model`` leaves them in the base's dtype).
    """
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import cast_adapter_dtype

    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        use_dora=spec.use_dora,
        init_lora_weights="gaussian" if spec.init == "gaussian" else True,
        target_modules=list(spec.target_modules),
    )
    inject_adapter_in_model(config, language_model)
    if not has_lora(language_model):
        raise ValueError(f"lora.target_modules {spec.target_modules} match no layer of the language model")
    cast_adapter_dtype(language_model, adapter_name="default")


def has_lora(module: nn.Module) -> bool:
    """Whether LoRA adapters were already injected into ``module``."""
    return any("lora_" in name for name, _ in module.named_parameters())


def apply_stage(backbone: nn.Module, spec: StageSpec) -> None:
    """Freezes the backbone, then unfreezes (or adapts) what ``spec`` trains."""
    backbone.requires_grad_(False)
    backbone.visual.requires_grad_(spec.train_vision_tower)
    language_model = backbone.language_model
    if spec.lora is not None:
        if not has_lora(language_model):
            add_lora(language_model, spec.lora)
        for name, param in language_model.named_parameters():
            param.requires_grad_("lora_" in name)
    elif has_lora(language_model):
        raise ValueError(
            "the language model carries LoRA adapters from an earlier stage, but this stage does not use "
            "LoRA; stages with LoRA cannot be followed by stages without it"
        )
    else:
        language_model.requires_grad_(spec.train_language_model)

"""What each training stage trains, and how the backbone is frozen or adapted for it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraSpec:
    """LoRA adapters on the backbone's language model (through ``peft``).

    Args:
        r: Rank of the adapters.
        alpha: Scaling numerator (``alpha / r``).
        dropout: Dropout on the adapter input.
        target_modules: Names of the linear layers that get adapters.
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))


@dataclass
class StageSpec:
    """One training stage: which parts of the backbone train, and the loss weights.

    The reason/[EMBED] vectors, the embedding projection, the decoder's projector and the
    decoder always train; the backbone's parts train only where a stage says so.

    Args:
        train_vision_tower: Train the vision encoder and its merger.
        train_language_model: Train the backbone's language model in full.
        lora: Train LoRA adapters on the language model instead (mutually exclusive with
            ``train_language_model``).
        contrastive_loss_weight: Weight of InfoNCE on [EMBED]; 0 skips the target pass in training.
        decoder_loss_weight: Weight (λ) of the decoder's reconstruction cross-entropy.
    """

    train_vision_tower: bool = False
    train_language_model: bool = False
    lora: LoraSpec | None = None
    contrastive_loss_weight: float = 0.0
    decoder_loss_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.lora is not None and self.train_language_model:
            raise ValueError("a stage sets both lora and train_language_model; choose one")
        if self.contrastive_loss_weight < 0 or self.decoder_loss_weight < 0:
            raise ValueError(
                f"loss weights must be >= 0, got contrastive_loss_weight={self.contrastive_loss_weight}, "
                f"decoder_loss_weight={self.decoder_loss_weight}"
            )
        if self.contrastive_loss_weight == 0 and self.decoder_loss_weight == 0:
            raise ValueError("a stage has both loss weights at 0: it would train nothing")


# Allowed in torch.load(weights_only=True), like the specs in lame_pl.backbone.
torch.serialization.add_safe_globals([LoraSpec, StageSpec])


def default_stages() -> dict[int, StageSpec]:
    """The paper's recipe: warm up the bottleneck on a frozen backbone, then train jointly."""
    return {
        1: StageSpec(contrastive_loss_weight=0.0, decoder_loss_weight=1.0),
        2: StageSpec(train_language_model=True, contrastive_loss_weight=1.0, decoder_loss_weight=1.0),
    }


def add_lora(language_model: nn.Module, spec: LoraSpec) -> None:
    """Injects LoRA adapters into ``language_model`` in place (module paths gain ``base_layer``)."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(
        r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=list(spec.target_modules)
    )
    inject_adapter_in_model(config, language_model)


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

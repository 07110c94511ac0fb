"""What an evaluation step hands the callbacks: the contract between ``LaMEModule`` and them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from lame_pl.modes import EncoderOutput

if TYPE_CHECKING:
    from lame_pl.decoder import LatentDecoder
    from lame_pl.losses import LaMELoss
    from lame_pl.model import LaMEEncoder
    from lame_pl.stages import StageSpec


@dataclass(frozen=True)
class EvalOutput:
    """What ``LaMEModule.validation_step`` and ``test_step`` return for one batch.

    Callbacks (``callbacks.EmbeddingHealth``, ``ReasonDiagnostics``, ``SimilarityHeatmap``,
    ``EmbeddingProjector``) read these fields and nothing else of the step.

    Attributes:
        query: The query side's encoder output (embedding, pre-normalisation vector, [EMBED]
            state, reason states).
        target: The target side's.
        keys: The samples' keys, one per row.
        texts: The targets' texts, when the batch has them.
        terms: Each loss term of the batch, detached (``contrastive``, ``decoder``).
        decoder_rows: How many rows the decoder term averages over (those with a decoder label).
    """

    query: EncoderOutput
    target: EncoderOutput
    keys: list[str]
    texts: list[str] | None
    terms: dict[str, torch.Tensor]
    decoder_rows: int


@runtime_checkable
class DiagnosedModule(Protocol):
    """What the diagnostics callbacks read of the module beside its ``EvalOutput`` (``LaMEModule`` has it).

    Attributes:
        encoder: The encoder (its backbone, and its mode settings: ``encoder.settings``).
        decoder: The latent decoder, or ``None``.
        criterion: The loss object (the decoder's cross-entropy).
        backbone_spec: Where the backbone and its processor come from.
        stage: The stage in force, 1 or 2.
        stage_spec: That stage's spec (its loss weights).
        logit_scale: ``1 / temperature``.
    """

    encoder: LaMEEncoder
    decoder: LatentDecoder | None
    criterion: LaMELoss
    backbone_spec: Any
    stage: int

    @property
    def stage_spec(self) -> StageSpec: ...

    @property
    def logit_scale(self) -> torch.Tensor: ...

    def encode(self, inputs: dict[str, torch.Tensor]) -> EncoderOutput:
        """Encodes one side of a batch."""
        ...

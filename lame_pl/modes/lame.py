"""``lame``: K learnable reason tokens and [EMBED] in the same single pass as the input."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from lame_pl.modes.common import full_pass, pooled

if TYPE_CHECKING:
    from lame_pl.model import LaMEEncoder
    from lame_pl.modes.common import EncoderOutput


def encode_lame(encoder: LaMEEncoder, inputs: dict[str, Any]) -> EncoderOutput:
    """``[input][REASON]×K[EMBED]`` in one pass (with the bottleneck mask if the encoder has it)."""
    latent = torch.cat([encoder.reason_embeddings, encoder.embed_embedding])
    hidden, _, _ = full_pass(encoder, inputs, appended=latent, bottleneck=encoder.settings.bottleneck_mask)
    embed_state = hidden[:, -1]
    reason_states = hidden[:, encoder.settings.layout().spans(hidden.shape[1])["reason"]]
    return pooled(encoder, embed_state, reason_states)

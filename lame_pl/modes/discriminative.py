"""``discriminative``: one pass over the input and [EMBED], no reason tokens (VLM2Vec-style)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lame_pl.modes.common import EncoderOutput, check_left_padded, full_pass, pool

if TYPE_CHECKING:
    from lame_pl.model import LaMEEncoder


def encode_discriminative(encoder: LaMEEncoder, inputs: dict[str, Any]) -> EncoderOutput:
    """``[input][EMBED]`` in one pass; the embedding is [EMBED]'s final state."""
    check_left_padded(inputs["attention_mask"])
    hidden, _, _ = full_pass(encoder, inputs, appended=encoder.embed_embedding)
    embed_state = hidden[:, -1]
    return EncoderOutput(pool(encoder, embed_state), embed_state, hidden[:, :0])

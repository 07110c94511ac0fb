"""``discriminative``: one pass over the input and [EMBED], no reason tokens (VLM2Vec-style)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lame_pl.modes.common import full_pass, pooled

if TYPE_CHECKING:
    from lame_pl.model import LaMEEncoder
    from lame_pl.modes.common import EncoderOutput


def encode_discriminative(encoder: LaMEEncoder, inputs: dict[str, Any]) -> EncoderOutput:
    """``[input][EMBED]`` in one pass; the embedding is [EMBED]'s final state."""
    hidden, _, _ = full_pass(encoder, inputs, appended=encoder.embed_embedding)
    embed_state = hidden[:, -1]
    return pooled(encoder, embed_state, hidden[:, :0])

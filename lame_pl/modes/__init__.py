"""The four encode modes, one small module each, on one backbone and one set of weights.

========================  ================================================================
``discriminative``        ``[input][EMBED]``, one pass (K must be 0)
``lame``                  ``[input][REASON]×K[EMBED]``, one pass
``latent_sequential``     one pass, K fed-back latent steps over the KV cache, then [EMBED]
``explicit_cot``          one pass, T greedy text tokens over the KV cache, then [EMBED]
========================  ================================================================
"""

from __future__ import annotations

from collections.abc import Callable

from lame_pl.modes.common import EncoderOutput, text_config
from lame_pl.modes.discriminative import encode_discriminative
from lame_pl.modes.explicit_cot import encode_explicit_cot, hf_generation_model, tied_logits
from lame_pl.modes.lame import encode_lame
from lame_pl.modes.latent_sequential import encode_latent_sequential
from lame_pl.modes.settings import MODES, EncodeMode, EncodeSettings, TokenLayout, check_left_padded

ENCODERS: dict[str, Callable[..., EncoderOutput]] = {
    "discriminative": encode_discriminative,
    "lame": encode_lame,
    "latent_sequential": encode_latent_sequential,
    "explicit_cot": encode_explicit_cot,
}
__all__ = [
    "ENCODERS",
    "MODES",
    "EncodeMode",
    "EncodeSettings",
    "EncoderOutput",
    "TokenLayout",
    "check_left_padded",
    "encode_discriminative",
    "encode_explicit_cot",
    "encode_lame",
    "encode_latent_sequential",
    "hf_generation_model",
    "text_config",
    "tied_logits",
]

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
from typing import Literal

from lame_pl.modes.common import EncoderOutput, text_config
from lame_pl.modes.discriminative import encode_discriminative
from lame_pl.modes.explicit_cot import encode_explicit_cot, hf_generation_model, tied_logits
from lame_pl.modes.lame import encode_lame
from lame_pl.modes.latent_sequential import encode_latent_sequential

EncodeMode = Literal["discriminative", "lame", "latent_sequential", "explicit_cot"]

ENCODERS: dict[str, Callable[..., EncoderOutput]] = {
    "discriminative": encode_discriminative,
    "lame": encode_lame,
    "latent_sequential": encode_latent_sequential,
    "explicit_cot": encode_explicit_cot,
}


def resolve_mode(
    encode_mode: str | None, num_reason_tokens: int, bottleneck_mask: bool = False, cot_tokens: int | None = None
) -> str:
    """The mode in force, after checking that it fits the other settings.

    ``None`` means ``lame`` when K > 0 and ``discriminative`` when K = 0 (what configs without
    an ``encode_mode`` have always meant).

    Raises:
        ValueError: Naming the setting that does not fit the mode.
    """
    if encode_mode is None:
        encode_mode = "lame" if num_reason_tokens > 0 else "discriminative"
    if encode_mode not in ENCODERS:
        raise ValueError(f"encode_mode {encode_mode!r} is unknown; choose one of {sorted(ENCODERS)}")
    if num_reason_tokens < 0:
        raise ValueError(f"num_reason_tokens must be >= 0, got {num_reason_tokens}")
    if encode_mode == "discriminative" and num_reason_tokens != 0:
        raise ValueError(
            f"encode_mode 'discriminative' has no reason tokens, but num_reason_tokens is {num_reason_tokens}; "
            "set num_reason_tokens to 0"
        )
    if encode_mode in ("lame", "latent_sequential") and num_reason_tokens == 0:
        raise ValueError(f"encode_mode {encode_mode!r} needs num_reason_tokens > 0, got 0")
    if bottleneck_mask and encode_mode != "lame":
        raise ValueError(f"bottleneck_mask applies to encode_mode 'lame' only, not {encode_mode!r}")
    if encode_mode == "explicit_cot":
        if cot_tokens is None or cot_tokens < 1:
            raise ValueError(f"encode_mode 'explicit_cot' needs cot_tokens >= 1 (tokens to generate), got {cot_tokens}")
    elif cot_tokens is not None:
        raise ValueError(f"cot_tokens is set ({cot_tokens}) but only encode_mode 'explicit_cot' generates tokens")
    return encode_mode


__all__ = [
    "ENCODERS",
    "EncodeMode",
    "EncoderOutput",
    "encode_discriminative",
    "encode_explicit_cot",
    "encode_lame",
    "encode_latent_sequential",
    "hf_generation_model",
    "resolve_mode",
    "text_config",
    "tied_logits",
]

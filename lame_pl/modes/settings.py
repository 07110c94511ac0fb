"""An encode mode's settings, checked in one place, and the token layout each mode produces.

Every mode ends a left-padded sequence the same way: ``[input][middle]×n[EMBED]``, where the
middle positions are the K reason tokens (``lame``, ``latent_sequential``), the T generated
tokens (``explicit_cot``) or nothing (``discriminative``). ``TokenLayout`` says where those
spans sit; the bottleneck mask, the reason states' slice and the attention probe all read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:
    import torch

    from lame_pl.modes.common import EncoderOutput

EncodeMode = Literal["discriminative", "lame", "latent_sequential", "explicit_cot"]
MODES: tuple[str, ...] = get_args(EncodeMode)


@dataclass(frozen=True)
class TokenLayout:
    """Where a mode's positions sit at the end of a sequence of ``length`` positions.

    Attributes:
        middle: How many positions lie between the input and [EMBED] (the last position).
        middle_name: What they are: ``"reason"`` (K reason tokens or fed-back latent steps) or
            ``"generated"`` (``explicit_cot``'s text tokens, padding included where a row stopped).
    """

    middle: int
    middle_name: Literal["reason", "generated"] = "reason"

    def spans(self, length: int) -> dict[str, slice]:
        """``{"input", middle_name, "embed"}``: the positions of each span in a sequence of ``length``."""
        first = length - self.middle - 1
        if first < 0:
            raise ValueError(
                f"a sequence of {length} positions cannot hold {self.middle} {self.middle_name} positions and [EMBED]"
            )
        return {
            "input": slice(0, first),
            self.middle_name: slice(first, length - 1),
            "embed": slice(length - 1, length),
        }


@dataclass(frozen=True)
class EncodeSettings:
    """The encode mode in force and the settings it needs, valid by construction (``resolve``).

    Attributes:
        mode: ``discriminative``, ``lame``, ``latent_sequential`` or ``explicit_cot``.
        num_reason_tokens: K (0 for ``discriminative``; ``explicit_cot`` ignores the vectors).
        bottleneck_mask: [EMBED] attends only to the reason tokens (``lame`` only).
        cot_tokens: T, the tokens ``explicit_cot`` generates (``None`` in every other mode).
    """

    mode: EncodeMode
    num_reason_tokens: int
    bottleneck_mask: bool = False
    cot_tokens: int | None = None

    @classmethod
    def resolve(
        cls,
        encode_mode: str | None,
        num_reason_tokens: int,
        bottleneck_mask: bool = False,
        cot_tokens: int | None = None,
        owner: str = "",
    ) -> EncodeSettings:
        """Checks the settings against each other; the one place they are checked.

        ``encode_mode=None`` means ``lame`` when K > 0 and ``discriminative`` when K = 0 (what
        configs without an ``encode_mode`` have always meant).

        Args:
            encode_mode: The mode asked for, or ``None``.
            num_reason_tokens: K.
            bottleneck_mask: Whether [EMBED] may see only the reason tokens.
            cot_tokens: T for ``explicit_cot``.
            owner: Prefix of the settings' names in messages (``"model."`` for a config's keys).

        Raises:
            ValueError: Naming the setting that does not fit.
        """
        k, t, mask = f"{owner}num_reason_tokens", f"{owner}cot_tokens", f"{owner}bottleneck_mask"
        if isinstance(num_reason_tokens, bool) or not isinstance(num_reason_tokens, int) or num_reason_tokens < 0:
            raise ValueError(f"{k} must be >= 0, got {num_reason_tokens!r}")
        if encode_mode is None:
            encode_mode = "lame" if num_reason_tokens > 0 else "discriminative"
        if encode_mode not in MODES:
            raise ValueError(f"{owner}encode_mode {encode_mode!r} is unknown; choose one of {sorted(MODES)}")
        if bottleneck_mask and num_reason_tokens == 0:
            raise ValueError(f"{mask}=True needs {k} > 0: [EMBED] would see nothing")
        if encode_mode == "discriminative" and num_reason_tokens != 0:
            raise ValueError(
                f"encode_mode 'discriminative' has no reason tokens, but {k} is {num_reason_tokens}; set {k} to 0"
            )
        if encode_mode in ("lame", "latent_sequential") and num_reason_tokens == 0:
            raise ValueError(f"encode_mode {encode_mode!r} needs {k} > 0, got 0")
        if bottleneck_mask and encode_mode != "lame":
            raise ValueError(f"{mask} applies to encode_mode 'lame' only, not {encode_mode!r}")
        if encode_mode == "explicit_cot":
            if isinstance(cot_tokens, bool) or not isinstance(cot_tokens, int) or cot_tokens < 1:
                raise ValueError(f"encode_mode 'explicit_cot' needs {t} >= 1 (tokens to generate), got {cot_tokens}")
        elif cot_tokens is not None:
            raise ValueError(f"{t} is set ({cot_tokens}) but only encode_mode 'explicit_cot' generates tokens")
        return cls(encode_mode, num_reason_tokens, bool(bottleneck_mask), cot_tokens)

    def with_mode(self, encode_mode: str, cot_tokens: int | None = None) -> EncodeSettings:
        """The same model encoding in another mode (checked against its K and bottleneck mask)."""
        return self.resolve(encode_mode, self.num_reason_tokens, self.bottleneck_mask, cot_tokens)

    @property
    def has_reason_states(self) -> bool:
        """Whether encoding yields reason states (K > 0, not ``explicit_cot``, which generates text instead)."""
        return self.num_reason_tokens > 0 and self.mode != "explicit_cot"

    def layout(self, output: EncoderOutput | None = None) -> TokenLayout:
        """The layout of this mode's sequences; ``explicit_cot``'s needs the ``output`` (how many tokens it generated)."""
        if self.mode != "explicit_cot":
            return TokenLayout(self.num_reason_tokens if self.has_reason_states else 0, "reason")
        if output is None or output.generated_ids is None:
            raise ValueError("explicit_cot's layout depends on how many tokens it generated: pass its EncoderOutput")
        return TokenLayout(output.generated_ids.shape[1], "generated")


def check_left_padded(attention_mask: torch.Tensor) -> None:
    """Raises unless every row ends with a real token (appended tokens must line up across rows)."""
    if not bool(attention_mask[:, -1].all()):
        raise ValueError(
            "encoder inputs must be left-padded (attention_mask[:, -1] all ones); "
            "set the tokenizer's padding_side='left'"
        )

"""An encode mode's settings, checked in one place, and the token layout each mode produces.

Every mode ends a left-padded sequence the same way: ``[input][middle × n][EMBED]``, where the
n middle positions are the K reason tokens (``lame``, ``latent_sequential``), the T generated
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


def settings_problem(mode: str, k: int, bottleneck_mask: bool, cot_tokens: int | None, owner: str = "") -> str | None:
    """What is wrong with these mode settings, in one line naming the setting; ``None`` when they fit.

    Args:
        mode: The encode mode (``None`` already replaced by its default).
        k: K, the number of reason tokens.
        bottleneck_mask: Whether [EMBED] may see only the reason tokens.
        cot_tokens: T for ``explicit_cot``.
        owner: Prefix of the settings' names (``"model."`` for a config's keys).
    """
    name_k, name_t, name_mask, name_mode = (
        f"{owner}{n}" for n in ("num_reason_tokens", "cot_tokens", "bottleneck_mask", "encode_mode")
    )
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        return f"{name_k} must be an integer >= 0, got {k!r}"
    if mode not in MODES:
        return f"{name_mode} {mode!r} is unknown; choose one of {sorted(MODES)}"
    if bottleneck_mask and k == 0:
        return f"{name_mask}=True needs {name_k} > 0: [EMBED] would see nothing"
    if mode == "discriminative" and k != 0:
        return f"{name_mode} 'discriminative' has no reason tokens, but {name_k} is {k}; set {name_k} to 0"
    if mode in ("lame", "latent_sequential") and k == 0:
        return f"{name_mode} {mode!r} needs {name_k} > 0, got 0"
    if bottleneck_mask and mode != "lame":
        return f"{name_mask} applies to {name_mode} 'lame' only, not {mode!r}"
    if mode == "explicit_cot":
        if isinstance(cot_tokens, bool) or not isinstance(cot_tokens, int) or cot_tokens < 1:
            return f"{name_mode} 'explicit_cot' needs {name_t} >= 1 (tokens to generate), got {cot_tokens}"
    elif cot_tokens is not None:
        return f"{name_t} is set ({cot_tokens}) but only {name_mode} 'explicit_cot' generates tokens"
    return None


@dataclass(frozen=True)
class EncodeSettings:
    """The encode mode in force and the settings it needs, checked when built (``settings_problem``).

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

    def __post_init__(self) -> None:
        problem = settings_problem(self.mode, self.num_reason_tokens, self.bottleneck_mask, self.cot_tokens)
        if problem:
            raise ValueError(problem)

    @classmethod
    def resolve(
        cls,
        encode_mode: str | None,
        num_reason_tokens: int,
        bottleneck_mask: bool = False,
        cot_tokens: int | None = None,
        owner: str = "",
    ) -> EncodeSettings:
        """The settings a config asks for: ``encode_mode=None`` filled in, errors named as ``owner``'s keys.

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
        if encode_mode is None and isinstance(num_reason_tokens, int):
            encode_mode = "lame" if num_reason_tokens > 0 else "discriminative"
        problem = settings_problem(encode_mode, num_reason_tokens, bool(bottleneck_mask), cot_tokens, owner)
        if problem:
            raise ValueError(problem)
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

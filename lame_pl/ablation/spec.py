"""What an ablation compares: its rows (an encode mode and K), the task kinds, the configs it trains with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lame_pl.modes import EncodeSettings

# The ablation runs from a checkout: its configs and tools/make_shards.py are the repository's.
ROOT = Path(__file__).resolve().parents[2]

CONFIG = ROOT / "configs" / "ablation" / "train.yaml"
WARMUP_CONFIG = ROOT / "configs" / "ablation" / "warmup.yaml"
DEFAULT_ROWS = "discriminative:0,lame:1,lame:4,lame:8,lame:16,latent_sequential:8"
TASKS = "caption,count,relation,binding"
KS = (1, 5)


@dataclass(frozen=True)
class Row:
    """One line of the table: an encode mode and its number of reason tokens (or latent steps)."""

    mode: str
    k: int

    @property
    def name(self) -> str:
        """The row's folder name, e.g. ``lame-k8``."""
        return f"{self.mode}-k{self.k}"


def parse_rows(text: str) -> list[Row]:
    """``"discriminative:0,lame:8"`` -> rows.

    Raises:
        ValueError: For an item that is not ``mode:K``, ``explicit_cot`` (it generates text and
            does not train), settings the mode refuses (``lame_pl.modes.EncodeSettings``), or a
            repeated row; the message names it.
    """
    rows = []
    for item in (part.strip() for part in text.split(",")):
        mode, sep, k_text = item.partition(":")
        if not sep or not k_text.strip().lstrip("-").isdigit():
            raise ValueError(f"row {item!r} is not MODE:K (e.g. lame:8)")
        k = int(k_text)
        if mode == "explicit_cot":
            raise ValueError(f"row {item!r}: explicit_cot generates text and cannot be trained")
        try:
            EncodeSettings(mode, k)
        except ValueError as err:
            raise ValueError(f"row {item!r}: {err}") from None
        row = Row(mode, k)
        if row in rows:
            raise ValueError(f"row {item!r} is given twice")
        rows.append(row)
    return rows

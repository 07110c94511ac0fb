"""What an ablation compares: its rows (an encode mode and K), the task kinds, the configs it trains with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# The ablation runs from a checkout: its configs and tools/make_shards.py are the repository's.
ROOT = Path(__file__).resolve().parents[2]

CONFIG = ROOT / "configs" / "ablation" / "train.yaml"
WARMUP_CONFIG = ROOT / "configs" / "ablation" / "warmup.yaml"
MODES = ("discriminative", "lame", "latent_sequential", "explicit_cot")
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
        ValueError: For an item that is not ``mode:K``, an unknown mode, a negative K, K>0 with
            ``discriminative``, K=0 with another mode, or a repeated row; the message names it.
    """
    rows = []
    for item in (part.strip() for part in text.split(",")):
        mode, sep, k_text = item.partition(":")
        if not sep or not k_text.strip().lstrip("-").isdigit():
            raise ValueError(f"row {item!r} is not MODE:K (e.g. lame:8)")
        k = int(k_text)
        if mode not in MODES:
            raise ValueError(f"row {item!r}: unknown mode {mode!r}; choose from {', '.join(MODES)}")
        if k < 0 or (mode == "discriminative") != (k == 0):
            raise ValueError(f"row {item!r}: discriminative takes K=0 and every other mode K>0")
        row = Row(mode, k)
        if row in rows:
            raise ValueError(f"row {item!r} is given twice")
        rows.append(row)
    return rows

"""Reading the latent thoughts: the text the latent decoder writes from K reason states.

The decoder is trained to regenerate the target's text from the reason states alone, so its
greedy output shows what the bottleneck carries. ``callbacks.ReasonDiagnostics`` logs a few such
texts at each validation and ``LaMEEmbedder.explain`` returns them for any input.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import torch

from lame_pl.prompt import END_OF_TEXT


def decode_reason_states(decoder: Any, tokenizer: Any, reason_states: torch.Tensor, max_tokens: int = 32) -> list[str]:
    """Each row's greedy text from its ``(K, H)`` reason states (``lame_pl.decoder.LatentDecoder.generate``)."""
    stop_id = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    ids = decoder.generate(reason_states, max_tokens=max_tokens, stop_id=stop_id)
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]


def _words(text: str) -> Counter[str]:
    return Counter(re.findall(r"\w+", text.lower()))


def word_f1(predicted: str, reference: str) -> float:
    """F1 of the words two texts share (bags of lower-cased words; 0 when either is empty)."""
    ours, theirs = _words(predicted), _words(reference)
    common = sum((ours & theirs).values())
    if common == 0:
        return 0.0
    precision, recall = common / sum(ours.values()), common / sum(theirs.values())
    return 2 * precision * recall / (precision + recall)


def overlap_rows(texts: list[str], references: list[str]) -> list[tuple[float, float]]:
    """Per row: word F1 of the text with its own reference, and its mean with the other rows' (chance).

    Chance pairs every text with every other row's reference, so a decoder that writes the
    same text for every input scores as much against chance as against its own references.
    """
    n = len(texts)
    if n != len(references) or n < 2:
        raise ValueError(f"need as many texts as references, at least 2; got {n} and {len(references)}")
    return [
        (word_f1(texts[i], references[i]), sum(word_f1(texts[i], references[j]) for j in range(n) if j != i) / (n - 1))
        for i in range(n)
    ]


def overlap_against_chance(texts: list[str], references: list[str]) -> dict[str, float]:
    """Mean word F1 of each text with its own reference (``word_f1``) and with the others' (``chance_word_f1``)."""
    rows = overlap_rows(texts, references)
    return {"word_f1": sum(own for own, _ in rows) / len(rows), "chance_word_f1": sum(c for _, c in rows) / len(rows)}

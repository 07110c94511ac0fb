"""Splitting texts that carry their task instruction into (instruction, text).

MMEB-train merges the instruction into each side's text, after Phi-3-V's image placeholder:
``"<|image_1|>\\nRepresent the given image with the following question: What is shown?\\n"``.
The latent decoder is trained on a target's *text*, so the instruction has to come off; and no
table of the peer's instruction strings is copied here. The instruction is instead read off the
data, per subset and side (query; target and negatives together):

1. Every text is cleaned: the image placeholder removed, surrounding whitespace stripped.
2. If every text of the side is the same and there are at least two rows, the whole text is the
   instruction: the side is a constant prompt (ImageNet's query "Represent the given image for
   classification", a text-to-image target "Represent the given image.").
3. Otherwise the instruction is the longest common prefix of the texts, cut back to the last
   clause mark (``:`` ``.`` ``?`` ``!``) that ends a word. Most MMEB-train instructions that
   precede a row's own text end in such a mark; in a handful of rows a shared start without one
   is chance ("A man ..."), not an instruction, and is left in the text. Shared word for word by
   at least ``TEMPLATE_ROWS`` rows, though, it is a template (MSCOCO grounding's
   ``Select the portion of the image that isolates the object labeled as "bus"``), cut back to
   the last whole word. Splitting loses nothing in the prompt (instruction and text are joined
   by the space they were split at), and a start every row shares tells the decoder nothing.
4. A subset of a single row cannot tell its instruction from its text; it needs the instruction
   given explicitly.

What the rule cannot see: a common start that runs past the instruction and ends in a clause
mark ("... for image retrieval: Q:" in VisDial) is removed with it, and in a subset of fewer
than ``TEMPLATE_ROWS`` rows an instruction without a clause mark stays in the text. The rule assumes one
instruction per subset and side, as in MMEB-train's ``original`` split (VLM2Vec-V2's); its
``diverse_instruction`` split paraphrases them per row, and they would stay in the texts.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

CLAUSE_END = frozenset(":.?!")
# A start shared word for word by this many rows of a subset is a template, not chance, even
# without a clause mark (MSCOCO grounding: '... isolates the object labeled as "bus"').
TEMPLATE_ROWS = 50


class AmbiguousInstruction(ValueError):
    """The texts do not show where the instruction ends (a single row)."""


def infer_instruction(texts: Sequence[str]) -> str:
    """The instruction that every one of ``texts`` (already cleaned) starts with; ``""`` if none.

    Raises:
        AmbiguousInstruction: For a single non-empty text.
    """
    if not texts:
        return ""
    low, high = min(texts), max(texts)
    if low == high:  # every text the same
        if len(texts) >= 2 or not low:
            return low
        raise AmbiguousInstruction("a single row does not show where its instruction ends")
    # The common prefix of the smallest and largest string is the common prefix of them all.
    prefix = os.path.commonprefix([low, high])
    for end in range(len(prefix), 0, -1):
        if prefix[end - 1] in CLAUSE_END and _ends_word(prefix, end, texts):
            return prefix[:end].strip()
    if len(texts) >= TEMPLATE_ROWS:
        for end in range(len(prefix), 0, -1):
            if not prefix[end - 1].isspace() and _ends_word(prefix, end, texts):
                return prefix[:end].strip()
    return ""


def _ends_word(prefix: str, end: int, texts: Sequence[str]) -> bool:
    """Whether position ``end`` of the common prefix is followed by whitespace, or the end, in every text."""
    if end < len(prefix):  # inside the prefix every text has the same next character
        return prefix[end].isspace()
    return all(len(text) == end or text[end].isspace() for text in texts)


def split_instruction(text: str, instruction: str) -> str | None:
    """The text after ``instruction`` (both cleaned), or None when ``text`` does not start with it.

    The instruction must end at a word boundary of ``text``: ``"Represent the given image"`` is
    not the start of ``"Represent the given images ..."``.
    """
    if not instruction:
        return text
    if not text.startswith(instruction):
        return None
    rest = text[len(instruction) :]
    if rest and not rest[0].isspace() and instruction[-1].isalnum():
        return None
    return rest.strip()

"""Splitting a constant instruction off MMEB-train texts (lame_pl.data.instruction_split).

``make_shards.py mmeb-train`` (tests/test_mmeb_train.py) reads each subset's query and target
instructions off its rows with these functions; the texts here are MMEB-train's own.
"""

from __future__ import annotations

import pytest

from lame_pl.data.instruction_split import TEMPLATE_ROWS, AmbiguousInstruction, infer_instruction, split_instruction
from lame_pl.instructions import strip_mmeb_placeholder as clean_text

QA_INST = "Represent the given image with the following question:"
IMAGE_INST = "Represent the given image."
CLS_INST = "Represent the given image for classification"


def test_clean_text_drops_the_image_placeholder() -> None:
    assert clean_text("<|image_1|>\nRepresent the given image.\n") == "Represent the given image."


def test_infer_instruction_cuts_the_common_prefix_at_a_clause_mark() -> None:
    texts = [f"{QA_INST} What is shown?", f"{QA_INST} Where is this?", f"{QA_INST} Which one?"]
    # The common prefix runs into "Wh", and past the colon; the instruction ends at the colon.
    assert infer_instruction(texts) == QA_INST


def test_infer_instruction_of_a_constant_side_is_the_whole_text() -> None:
    assert infer_instruction([IMAGE_INST, IMAGE_INST]) == IMAGE_INST
    assert infer_instruction([CLS_INST] * 3) == CLS_INST  # no clause mark needed: nothing follows
    assert infer_instruction(["", ""]) == ""
    assert infer_instruction([]) == ""


def test_infer_instruction_ignores_a_shared_start_by_chance() -> None:
    # Captions that all begin "A man" share no instruction: no clause mark ends the common start.
    assert infer_instruction(["A man speaks at a rally.", "A man walks his dog."]) == ""
    assert infer_instruction(["tench", "tiger shark"]) == ""


def test_infer_instruction_needs_the_clause_mark_to_end_a_word() -> None:
    # "3." ends no word (3.5 / 3.9): the instruction is the "Q:" before it.
    assert infer_instruction(["Q: 3.5 apples", "Q: 3.9 pears"]) == "Q:"
    # At the end of the common prefix every text must have a space (or end) after the mark.
    assert infer_instruction(["Answer: yes", "Answer:no"]) == ""
    assert infer_instruction(["Represent it: a", "Represent it:"]) == "Represent it:"


def test_infer_instruction_of_a_single_row_is_ambiguous() -> None:
    with pytest.raises(AmbiguousInstruction):
        infer_instruction([f"{QA_INST} What is shown?"])
    assert infer_instruction([""]) == ""


def test_split_instruction() -> None:
    assert split_instruction(f"{QA_INST} What is shown?", QA_INST) == "What is shown?"
    assert split_instruction(IMAGE_INST, IMAGE_INST) == ""
    assert split_instruction("a cat", "") == "a cat"
    assert split_instruction("Something else entirely", QA_INST) is None
    # An instruction must end at a word boundary of the text.
    assert split_instruction("Represent the given images of cats", "Represent the given image") is None
    assert split_instruction("query:What is it", "query:") == "What is it"


def test_a_template_start_without_a_clause_mark_is_split_off_in_a_large_subset() -> None:
    """MSCOCO grounding's queries: with `decoder_label: target_or_query_text` the query text is a
    decoder label, so the template must not stay in it; a handful of rows is still read as chance."""
    template = "Select the portion of the image that isolates the object labeled as"
    labels = [f'"{word} {i}"' for i, word in enumerate(["bus", "hot dog", "cat"] * TEMPLATE_ROWS)][:TEMPLATE_ROWS]
    texts = [f"{template} {label}" for label in labels]
    assert infer_instruction(texts) == template
    assert split_instruction(texts[1], template) == labels[1]
    assert infer_instruction(texts[:3]) == ""

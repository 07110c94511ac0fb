"""The one prompt layout (lame_pl.prompt) and the collators built on it: instructions, labels, clipping."""

from __future__ import annotations

import random
import re

import pytest
import torch
from conftest import random_image

from lame_pl.datamodules.collate import InstructionCollator, PairCollator
from lame_pl.prompt import PromptProcessor, Side, render

VS, VE, IMG, VID = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"


def side(**fields) -> dict:
    """A decoded instruction-pair side (lame_pl.data.instruction_pairs.DecodeInstructionPairs' shape)."""
    return {"instruction": "", "text": "", "images": [], "video": None, **fields}


def decoded(processor, inputs: dict, row: int) -> str:
    """Row ``row`` of processor inputs as text, padding dropped and each run of vision pads shown once."""
    ids = inputs["input_ids"][row][inputs["attention_mask"][row].bool()]
    text = processor.tokenizer.decode(ids)
    return re.sub(r"(<\|(image|video)_pad\|>)+", r"\1", text)


def test_render_puts_media_first_then_instruction_space_text_and_a_closing_newline():
    assert render("Find the caption:", "a red circle", 1) == f"{VS}{IMG}{VE}\nFind the caption: a red circle\n"
    assert render("Find the caption:", "", 2) == f"{VS}{IMG}{VE}{VS}{IMG}{VE}\nFind the caption:\n"
    assert render("", "a red circle", 0) == "a red circle\n"
    assert render("Answer:", "two plus two") == "Answer: two plus two\n"
    assert render("", "", 1) == f"{VS}{IMG}{VE}\n"
    assert render("Describe.", "", 1, has_video=True) == f"{VS}{IMG}{VE}{VS}{VID}{VE}\nDescribe.\n"
    with pytest.raises(ValueError, match="nothing to encode"):
        render("", "")


def test_instruction_never_runs_into_its_text(processor):
    prompts = PromptProcessor(processor, max_text_length=64)
    rng = random.Random(0)
    inputs = prompts(
        [
            Side("Find the answer to the given query:", "What is shown?", (random_image(rng),)),
            Side("Represent the sentence", "two cats"),
        ]
    )
    assert decoded(processor, inputs, 0) == f"{VS}{IMG}{VE}\nFind the answer to the given query: What is shown?\n"
    assert decoded(processor, inputs, 1) == "Represent the sentence two cats\n"


def test_clipping_cuts_text_and_instruction_apart_and_never_vision_tokens(processor):
    prompts = PromptProcessor(processor, max_text_length=3)
    rng = random.Random(1)
    inputs = prompts([Side("one two three four five", "six seven eight nine ten", (random_image(rng),))])
    assert decoded(processor, inputs, 0) == f"{VS}{IMG}{VE}\none two three six seven eight\n"
    image_tokens = int(inputs["image_grid_thw"].prod()) // processor.image_processor.merge_size**2
    assert int((inputs["mm_token_type_ids"] == 1).sum()) == image_tokens
    clip = PromptProcessor(processor, max_text_length=2).clip
    word = "antidisestablishmentarianism"
    ids = processor.tokenizer(word, add_special_tokens=False)["input_ids"]
    assert len(ids) > 2 and clip(word) == processor.tokenizer.decode(ids[:2])
    assert clip("ab") == "ab" and clip("a cat") == "a cat"  # at most 2 tokens: kept whole


def test_vision_special_tokens_in_text_are_refused(processor):
    prompts = PromptProcessor(processor, max_text_length=8)
    with pytest.raises(ValueError, match=r"contains the special token <\|image_pad\|>"):
        prompts([Side("", "look <|image_pad|> here")])
    with pytest.raises(ValueError, match="max_text_length must be >= 1"):
        PromptProcessor(processor, max_text_length=0)


def test_rows_are_left_padded_and_media_keys_appear_only_when_used(processor):
    prompts = PromptProcessor(processor, max_text_length=16)
    text_only = prompts([Side("", "short"), Side("an instruction", "a much longer text than the first")])
    assert set(text_only) == {"input_ids", "attention_mask", "mm_token_type_ids"}
    assert bool(text_only["attention_mask"][:, -1].all()) and not bool(text_only["attention_mask"][0, 0])
    assert all(v.dtype == torch.long for v in text_only.values())


def _instruction_samples(rng: random.Random) -> list[dict]:
    image = random_image(rng)
    return [
        # own instructions on every side; the negative has none: it takes its sample's target instruction
        {
            "key": "a",
            "query": side(instruction="Find the caption:", images=[image]),
            "target": side(instruction="Represent the caption:", text="a red square"),
            "negatives": [side(text="a blue circle"), side(instruction="Own:", text="a dot")],
        },
        # no instruction anywhere: the datamodule defaults; the target has no text
        {
            "key": "b",
            "query": side(text="a green triangle"),
            "target": side(images=[image]),
            "negatives": [side(images=[image])],
        },
        # neither side has text: nothing to regenerate
        {"key": "c", "query": side(images=[image]), "target": side(images=[image]), "negatives": []},
    ]


def test_instruction_collator_uses_each_sides_instruction_with_defaults(processor):
    collate = InstructionCollator(processor, query_instruction="QDEF", target_instruction="TDEF")
    batch = collate(_instruction_samples(random.Random(2)))
    q, t, n = batch["query"], batch["target"], batch["negative"]
    assert decoded(processor, q, 0) == f"{VS}{IMG}{VE}\nFind the caption:\n"
    assert decoded(processor, q, 1) == "QDEF a green triangle\n"
    assert decoded(processor, t, 0) == "Represent the caption: a red square\n"
    assert decoded(processor, t, 1) == f"{VS}{IMG}{VE}\nTDEF\n"
    assert decoded(processor, n, 0) == "Represent the caption: a blue circle\n"
    assert decoded(processor, n, 1) == "Own: a dot\n"
    assert decoded(processor, n, 2) == f"{VS}{IMG}{VE}\nTDEF\n"
    assert n["image_grid_thw"].shape == (1, 3) and t["image_grid_thw"].shape == (2, 3)
    assert batch["texts"] == ["a red square", "", ""]


def _labels(processor, decoder: dict) -> list[str]:
    out = []
    for ids, mask in zip(decoder["input_ids"], decoder["attention_mask"], strict=True):
        out.append(processor.tokenizer.decode(ids[mask.bool()]))
    return out


def test_decoder_labels_mark_rows_without_text_and_never_hold_instructions(processor):
    samples = _instruction_samples(random.Random(3))
    plain = InstructionCollator(processor, "QDEF", "TDEF")(samples)["decoder"]
    assert set(plain) == {"input_ids", "attention_mask", "labelled"}
    assert plain["labelled"].dtype == torch.bool and plain["labelled"].tolist() == [True, False, False]
    assert _labels(processor, plain) == ["a red square<|endoftext|>", "<|endoftext|>", "<|endoftext|>"]
    fallback = InstructionCollator(processor, "QDEF", "TDEF", decoder_label="target_or_query_text")(samples)["decoder"]
    assert fallback["labelled"].tolist() == [True, True, False]
    assert _labels(processor, fallback) == [
        "a red square<|endoftext|>",
        "a green triangle<|endoftext|>",
        "<|endoftext|>",
    ]
    with pytest.raises(ValueError, match="decoder_label must be one of target_text, target_or_query_text; got 'query'"):
        InstructionCollator(processor, decoder_label="query")


def test_instruction_collator_names_a_side_in_the_old_shape(processor):
    rng = random.Random(4)
    old = {
        "key": "x",
        "query": {"instruction": "", "text": "hi", "image": None},
        "target": {"text": "there", "image": random_image(rng)},
        "negatives": [],
    }
    with pytest.raises(ValueError, match=r"sample side lacks \['images', 'video'\]"):
        InstructionCollator(processor)([old])


def test_pair_collator_uses_the_same_layout_and_labels_every_caption(processor):
    rng = random.Random(5)
    collate = PairCollator(processor, query_instruction="Find the caption.", target_instruction="Caption:")
    batch = collate([{"key": "k", "image": random_image(rng), "text": "two blue squares"}])
    assert decoded(processor, batch["query"], 0) == f"{VS}{IMG}{VE}\nFind the caption.\n"
    assert decoded(processor, batch["target"], 0) == "Caption: two blue squares\n"
    assert batch["decoder"]["labelled"].tolist() == [True]
    assert _labels(processor, batch["decoder"]) == ["two blue squares<|endoftext|>"]
    # The same sides through the prompt processor give the very same tensors.
    image = random_image(random.Random(6))
    batch = collate([{"key": "k", "image": image, "text": "x"}])
    same = PromptProcessor(processor, 64)([Side("Find the caption.", "", (image,))])
    assert all(torch.equal(batch["query"][k], same[k]) for k in same) and set(batch["query"]) == set(same)


def test_datamodule_passes_decoder_label_on_and_refuses_an_unknown_one(tiny_spec):
    from lame_pl.datamodules import InstructionPairDataModule

    dm = InstructionPairDataModule(tiny_spec, decoder_label="target_or_query_text")
    assert dm.collator.decoder_label == "target_or_query_text"
    assert InstructionPairDataModule(tiny_spec).collator.decoder_label == "target_text"
    with pytest.raises(
        ValueError,
        match=r"^data\.decoder_label must be one of target_text, target_or_query_text; "
        r"got 'caption'$",
    ):
        InstructionPairDataModule(tiny_spec, decoder_label="caption")

"""Reading the latent thoughts: greedy decoding from reason states, its word overlap, LaMEEmbedder.explain."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import load_tool
from test_embedder import _train

from lame_pl import LaMEModule
from lame_pl.backbone import build_decoder, qwen2_tokenizer
from lame_pl.decoder import LatentDecoder
from lame_pl.latent_text import decode_reason_states, overlap_against_chance, word_f1
from lame_pl.prompt import END_OF_TEXT

explain = load_tool("explain")


@pytest.fixture(scope="module")
def decoder(tiny_decoder) -> LatentDecoder:
    torch.manual_seed(0)
    ids = qwen2_tokenizer()("a red circle at the top left two blue squares")["input_ids"]
    return LatentDecoder(build_decoder(tiny_decoder), input_dim=16, output_ids=ids).eval()


def test_greedy_tokens_are_the_argmax_of_the_teacher_forced_pass(decoder):
    """Fed back its own tokens, the decoder's forward pass predicts each of them (the argmax at each position)."""
    states = torch.randn(3, 2, 16)
    rows = decoder.generate(states, max_tokens=6)
    assert [len(row) for row in rows] == [6, 6, 6]
    ids = torch.tensor(rows)
    predicted = decoder(states, ids, torch.ones_like(ids))
    assert predicted.logits.argmax(dim=-1).tolist() == predicted.targets.tolist()
    assert set(ids.flatten().tolist()) <= set(decoder.output_ids.tolist())  # ids of the whole vocabulary


def test_a_row_ends_at_the_stop_token(decoder):
    states = torch.randn(4, 2, 16)
    free = decoder.generate(states, max_tokens=5)
    stop = free[0][1]  # a token of row 0: row 0 stops before it (at its first occurrence)
    stopped = decoder.generate(states, max_tokens=5, stop_id=stop)
    assert len(stopped[0]) <= 1
    for got, full in zip(stopped, free, strict=True):
        assert got == (full[: full.index(stop)] if stop in full else full)
    with pytest.raises(ValueError, match="max_tokens"):
        decoder.generate(states, max_tokens=0)


def test_decoded_texts_are_the_tokenizers_text_of_the_ids(decoder):
    tokenizer = qwen2_tokenizer()
    states = torch.randn(2, 2, 16)
    texts = decode_reason_states(decoder, tokenizer, states, max_tokens=4)
    stop = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    rows = decoder.generate(states, max_tokens=4, stop_id=stop)
    assert texts == [tokenizer.decode(row, skip_special_tokens=True).strip() for row in rows]


def test_word_f1_and_chance():
    assert word_f1("a red circle", "A red circle!") == 1.0
    assert word_f1("a red circle", "two blue squares") == 0.0
    assert word_f1("red red circle", "red circle square") == pytest.approx(2 * (2 / 3) * (2 / 3) / (4 / 3))
    assert word_f1("", "red") == 0.0
    # Each text matches its own reference: own 1, chance 0. The same text everywhere: own == chance.
    scores = overlap_against_chance(["red circle", "blue square"], ["red circle", "blue square"])
    assert scores == {"word_f1": 1.0, "chance_word_f1": 0.0}
    same = overlap_against_chance(["red circle"] * 3, ["red circle", "red square", "blue square"])
    assert same["word_f1"] == pytest.approx(same["chance_word_f1"])
    with pytest.raises(ValueError, match="at least 2"):
        overlap_against_chance(["a"], ["a"])


def test_explain_tool_scores_a_split_against_chance(tmp_path, tiny_spec, tiny_decoder, make_batch, synthetic_shards):
    """tools/explain.py on a tiny checkpoint and tiny shards: the JSON holds every text and consistent scores."""
    shards = synthetic_shards(8, 4, 12, 8)  # test_search's: 12 test scenes, 5 read here
    module = LaMEModule(tiny_spec, tiny_decoder, num_reason_tokens=2, stage=1)
    checkpoint = _train(module, make_batch(4), tmp_path / "m.ckpt")
    out = tmp_path / "explain.json"
    assert (
        explain.main(
            [
                "--checkpoint",
                str(checkpoint),
                "--shards",
                str(shards / "test"),
                "-n",
                "5",
                "--max-tokens",
                "4",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert report["count"] == 5 and len(report["rows"]) == 5
    assert report["difference"] == pytest.approx(report["word_f1"] - report["chance_word_f1"])
    assert 1 <= report["distinct_texts"] <= 5 and report["difference_se"] >= 0
    with pytest.raises(SystemExit, match="holds no .tar shard"):
        explain.main(["--checkpoint", str(checkpoint), "--shards", str(tmp_path / "nowhere")])

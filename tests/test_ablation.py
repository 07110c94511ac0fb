"""tools/ablate_modes.py (lame_pl.ablation): rows, per-kind scoring from embeddings, and a tiny run end to end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lame_pl.ablation.cli import main as ablate_modes
from lame_pl.ablation.scoring import kind_metrics
from lame_pl.ablation.spec import DEFAULT_ROWS, Row, parse_rows
from lame_pl.embeddings_folder import load_embeddings

ROOT = Path(__file__).resolve().parents[1]

TINY = [
    "model.init_args.backbone.preset=tiny",
    "model.init_args.backbone.min_pixels=3136",
    "model.init_args.backbone.max_pixels=3136",
    "model.init_args.decoder.preset=tiny",
    "data.init_args.batch_size=8",
    "data.init_args.num_workers=0",
    "trainer.enable_progress_bar=false",
]


def test_rows_parse_and_bad_rows_are_named():
    assert parse_rows(DEFAULT_ROWS) == [
        Row("discriminative", 0),
        Row("lame", 1),
        Row("lame", 4),
        Row("lame", 8),
        Row("lame", 16),
        Row("latent_sequential", 8),
    ]
    for text, message in [
        ("lame", "not MODE:K"),
        ("lame:x", "not MODE:K"),
        ("plume:8", "encode_mode 'plume' is unknown"),
        ("discriminative:4", "set num_reason_tokens to 0"),
        ("lame:0", "needs num_reason_tokens > 0"),
        ("explicit_cot:2", "cannot be trained"),
        ("lame:8,lame:8", "twice"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_rows(text)


def _records() -> dict[str, dict]:
    """Two binding pairs and one count group of four, as read_test_records returns them."""
    records = {}
    for g, (a, b) in enumerate(
        [
            ("a red circle and a blue square", "a blue circle and a red square"),
            ("a green circle and a red diamond", "a red circle and a green diamond"),
        ]
    ):
        for member, text in enumerate((a, b)):
            records[f"binding-{g:06d}-{member}"] = {
                "kind": "binding",
                "group": f"binding-{g:06d}",
                "member": member,
                "candidates": [a, b],
                "text": text,
            }
    counts = ["one red shape", "two red shapes", "three red shapes", "four red shapes"]
    for member, text in enumerate(counts):
        records[f"count-000000-{member}"] = {
            "kind": "count",
            "group": "count-000000",
            "member": member,
            "candidates": counts,
            "text": text,
        }
    return records


def test_kind_metrics_perfect_and_fooled_by_the_hard_negative():
    records = _records()
    keys = list(records)
    target = F.normalize(torch.randn(len(keys), 16), dim=-1)
    perfect = kind_metrics({"keys": keys, "query": target.clone(), "target": target}, records)
    assert perfect["all/recall@1"] == perfect["binding/hard@1"] == perfect["count/hard@1"] == 1.0
    assert perfect["binding/candidates"] == 4 and perfect["count/candidates"] == 4
    assert perfect["chance/binding/hard@1"] == 0.5 and perfect["chance/count/hard@1"] == 0.25
    assert perfect["chance/binding/recall@1"] == 0.25 and perfect["chance/binding/recall@5"] == 1.0
    assert perfect["chance/all/hard@1"] == pytest.approx((4 * 0.5 + 4 * 0.25) / 8)
    # Every binding query lands on its pair's other statement: bag-of-attributes matching.
    swapped = target.clone()
    for i in range(4):
        swapped[i] = target[i ^ 1]
    fooled = kind_metrics({"keys": keys, "query": swapped, "target": target}, records)
    assert fooled["binding/hard@1"] == 0.0 and fooled["binding/recall@1"] == 0.0
    assert fooled["count/hard@1"] == 1.0 and fooled["all/hard@1"] == 0.5


def test_kind_metrics_names_a_key_missing_from_the_shards():
    records = _records()
    keys = [*records, "binding-000099-0"]
    emb = F.normalize(torch.randn(len(keys), 8), dim=-1)
    with pytest.raises(ValueError, match="binding-000099-0"):
        kind_metrics({"keys": keys, "query": emb, "target": emb}, records)


def test_bad_arguments_exit_with_a_message(capsys):
    for argv, message in [
        (["--rows", "plume:8"], "'plume' is unknown"),
        (["--steps", "0"], "--steps"),
        (["--steps", "10", "--stage1-steps", "10"], "--stage1-steps"),
        (["--set", "--trainer.max_steps=3"], "KEY=VALUE"),
    ]:
        with pytest.raises(SystemExit) as error:
            ablate_modes(argv)
        assert error.value.code == 2 and message in capsys.readouterr().err


@pytest.fixture
def _restore_threads():
    """--threads sets torch's thread count for the whole process; give the other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(module_tmp) -> Path:
    """The compositional set's folder, written by the first test that runs and reused by the other (same sizes)."""
    return module_tmp("ablation_data") / "data"


SIZES = ["--train", "32", "--val", "8", "--test", "32", "--image-size", "56"]


def _tiny_run(rows: str, data: Path, out: Path, *options: str) -> list[str]:
    """The ablation's arguments for ``rows`` on the tiny preset, one timing repeat on one thread."""
    tiny = [a for item in TINY for a in ("--set", item)]
    return ["--rows", rows, *options, "--data", str(data), "--out", str(out), *SIZES, "--repeats", "1",
            "--threads", "1", *tiny]  # fmt: skip


def test_two_rows_end_to_end_on_the_tiny_preset(data, tmp_path, monkeypatch, capsys, _restore_threads):
    """Writes the set, trains two rows through the CLI for a few steps, predicts, scores and times."""
    monkeypatch.setattr(sys, "argv", ["ablate_modes.py"])
    out = tmp_path / "runs"
    argv = _tiny_run("discriminative:0,lame:2", data, out, "--steps", "2")
    assert ablate_modes(argv) == 0
    saved = json.loads((out / "results.json").read_text())
    rows = saved["results"]
    assert [(r["mode"], r["k"]) for r in rows] == [("discriminative", 0), ("lame", 2)]
    for r in rows:
        for kind in ("all", "caption", "count", "relation", "binding"):
            assert 0.0 <= r[f"{kind}/recall@1"] <= r[f"{kind}/recall@5"] <= 1.0
            assert 0.0 <= r[f"{kind}/hard@1"] <= 1.0
        assert r["count/queries"] == 8 and r["chance/count/hard@1"] == 0.25
        assert r["encode_ms_per_sample"] > 0 and r["encode_batch"] == 8
        assert (out / f"{r['mode']}-k{r['k']}" / "checkpoints" / "last.ckpt").is_file()
        embeddings = load_embeddings(out / f"{r['mode']}-k{r['k']}" / "test_embeddings")
        assert len(embeddings.keys) == 32
    # The two rows really differ in their model: K=0 has no decoder, K=2 has one.
    k0 = torch.load(out / "discriminative-k0" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    k2 = torch.load(out / "lame-k2" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert not any(k.startswith("decoder.") for k in k0) and any(k.startswith("decoder.") for k in k2)
    assert k2["encoder.reason_embeddings"].shape[0] == 2
    table = (out / "results.md").read_text()
    assert "| discriminative | 0 |" in table and "| lame | 2 |" in table and "| chance |" in table
    # --reuse scores the saved runs again without training: the same figures, timed afresh.
    capsys.readouterr()
    assert ablate_modes([*argv, "--reuse"]) == 0
    assert "reusing" in capsys.readouterr().out  # the data set, then each row
    again = json.loads((out / "results.json").read_text())["results"]
    assert all(r["reused"] for r in again) and "reused" not in rows[0]
    assert [r["all/hard@1"] for r in again] == [r["all/hard@1"] for r in rows]
    assert all(r["encode_ms_per_sample"] > 0 for r in again)


def test_stage1_warmup_then_stage2_from_its_weights(data, tmp_path, monkeypatch, _restore_threads):
    """--stage1-steps: a decoder-only warm-up, then stage 2 started from it, the steps adding up to --steps."""
    monkeypatch.setattr(sys, "argv", ["ablate_modes.py"])
    out = tmp_path / "runs"
    assert ablate_modes(_tiny_run("lame:2", data, out, "--steps", "3", "--stage1-steps", "1")) == 0
    warm = torch.load(out / "lame-k2" / "stage1" / "last.ckpt", weights_only=True)
    joint = torch.load(out / "lame-k2" / "checkpoints" / "last.ckpt", weights_only=True)
    assert warm["global_step"] == 1 and warm["lame_stage"] == 1
    assert joint["global_step"] == 2 and joint["lame_stage"] == 2
    assert joint["hyper_parameters"]["init_from"] == str(out / "lame-k2" / "stage1" / "last.ckpt")
    assert "(after 1 decoder-only steps for K>0)" in (out / "results.md").read_text()

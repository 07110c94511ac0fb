"""Predict -> index -> search: the index's recall@k equals the module's own, and bad files fail by name."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_tool

from lame_pl.cli import build_cli
from lame_pl.embeddings_folder import EmbeddingsError, load_embeddings
from lame_pl.index import (
    SearchIndex,
    build_index,
    gold_ranks_from_hits,
    index_embeddings,
    index_recall,
    load_index,
    normalised,
)
from lame_pl.retrieval import gold_ranks, metrics_from_ranks

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "tests" / "conf" / "tiny.yaml"
TEST_SAMPLES = 12


index_tool, search_tool = load_tool("index"), load_tool("search")


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    """LightningCLI warns when both sys.argv and ``args`` are given."""
    monkeypatch.setattr(sys, "argv", ["lightning"])


@pytest.fixture(scope="module")
def shards(synthetic_shards) -> Path:
    return synthetic_shards(8, 4, TEST_SAMPLES, 8)


def data_args(shards: Path) -> list[str]:
    return [f"--data.init_args.{split}_shards={shards / split}" for split in ("train", "val", "test")]


@pytest.fixture(scope="module")
def run(shards, module_tmp) -> dict[str, Path]:
    """One step of fit, then ``lightning test`` (module metrics) and ``lightning predict`` on its checkpoint."""
    tmp = module_tmp("run")
    sys.argv = ["lightning"]
    build_cli(
        [
            "fit",
            f"--config={CONF}",
            *data_args(shards),
            "--trainer.max_steps=1",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp}",
            "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
            f"--trainer.callbacks.dirpath={tmp / 'ckpt'}",
            "--trainer.callbacks.save_last=true",
        ]
    )
    ckpt = tmp / "ckpt" / "last.ckpt"
    common = [
        f"--config={CONF}",
        *data_args(shards),
        f"--ckpt_path={ckpt}",
        "--trainer.logger=false",
        f"--trainer.default_root_dir={tmp}",
    ]
    metrics = tmp / "test_metrics.json"
    build_cli(["test", *common, "--trainer.callbacks+=callbacks.MetricsFile", f"--trainer.callbacks.path={metrics}"])
    embeddings = tmp / "embeddings"
    # 4 rows a shard (the batch size): three shards, read back in order.
    build_cli(
        [
            "predict",
            *common,
            "--trainer.callbacks+=callbacks.EmbeddingWriter",
            f"--trainer.callbacks.path={embeddings}",
            "--trainer.callbacks.rows_per_shard=4",
        ]
    )
    return {"ckpt": ckpt, "metrics": metrics, "embeddings": embeddings, "tmp": tmp}


def test_predict_writes_keys_texts_and_both_sides_in_shards(run, shards):
    saved = load_embeddings(run["embeddings"])
    assert len(list(run["embeddings"].glob("rank000-*.safetensors"))) == TEST_SAMPLES // 4
    assert len(saved.keys) == len(set(saved.keys)) == TEST_SAMPLES
    assert saved.query.shape == saved.target.shape and saved.query.shape[0] == TEST_SAMPLES
    assert torch.allclose(saved.target.norm(dim=-1), torch.ones(TEST_SAMPLES), atol=1e-4)
    # Each row's text is the caption stored with its key in the test shards.
    import webdataset as wds

    captions = {
        s["__key__"]: s["txt"].decode().strip()
        for s in wds.WebDataset(sorted(str(p) for p in (shards / "test").glob("*.tar")), shardshuffle=False)
    }
    assert {k: t.strip() for k, t in zip(saved.keys, saved.texts, strict=True)} == captions


def test_index_recall_equals_the_modules_recall_on_the_test_split(run, capsys):
    module = json.loads(run["metrics"].read_text())
    out = run["tmp"] / "index"
    index_tool.main(["--embeddings", str(run["embeddings"]), "--out", str(out)])
    capsys.readouterr()
    search_tool.main(["--index", str(out), "--queries", str(run["embeddings"]), "-k", "3", "--json"])
    result = json.loads(capsys.readouterr().out)
    for k in (1, 5, 10):  # the module logs float32: equal there means the same count of hits
        assert float(np.float32(result["metrics"][f"recall@{k}"])) == module[f"test/recall@{k}"], k
    # The hits are the targets ranked by dot product, best first, with their keys and texts.
    saved = load_embeddings(run["embeddings"])
    best = (saved.query @ saved.target.T).argmax(1)
    first = [q["hits"][0] for q in result["queries"]]
    assert [h["key"] for h in first] == [saved.keys[i] for i in best]
    assert [h["text"] for h in first] == [saved.texts[i] for i in best]
    assert all(len(q["hits"]) == 3 for q in result["queries"])
    assert all(q["hits"][0]["score"] >= q["hits"][1]["score"] >= q["hits"][2]["score"] for q in result["queries"])


def test_a_free_text_query_is_embedded_by_the_checkpoint(run, capsys):
    out = run["tmp"] / "index"
    if not out.is_dir():
        index_tool.main(["--embeddings", str(run["embeddings"]), "--out", str(out)])
    saved = load_embeddings(run["embeddings"])
    text = saved.texts[0]
    capsys.readouterr()
    search_tool.main(["--index", str(out), "--checkpoint", str(run["ckpt"]), "--text", text, "-k", "2", "--json"])
    hits = json.loads(capsys.readouterr().out)["queries"][0]["hits"]
    # A caption embedded as a target embeds like the indexed target of the same caption.
    assert hits[0]["text"] == text and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    # Without --checkpoint, the index's own (index.json names it); another file is refused.
    search_tool.main(["--index", str(out), "--text", text, "-k", "2", "--json"])
    assert json.loads(capsys.readouterr().out)["queries"][0]["hits"] == hits
    other = run["tmp"] / "other.ckpt"
    other.write_bytes(b"not this one")
    with pytest.raises(SystemExit, match=r"--checkpoint .*other.ckpt is not the checkpoint that embedded"):
        search_tool.main(["--index", str(out), "--checkpoint", str(other), "--text", text])


def test_a_bare_predict_warns_that_it_writes_nothing(shards, tmp_path):
    with pytest.warns(UserWarning, match="predict writes no embeddings: add a writer"):
        build_cli(
            [
                "predict",
                f"--config={CONF}",
                *data_args(shards),
                "--trainer.logger=false",
                f"--trainer.default_root_dir={tmp_path}",
            ]
        )


def test_index_ranks_ties_against_the_query_as_the_module_does():
    """Exact ties (repeated candidates, equal coordinates): the index's recall equals gold_ranks'."""
    dim = 6
    basis = torch.eye(dim)
    candidates = torch.cat([basis, basis[:3]])  # rows 6..8 repeat rows 0..2: exact ties
    rng = np.random.default_rng(0)
    query = torch.zeros(40, dim)
    gold = torch.zeros(40, dtype=torch.long)
    for i, row in enumerate(query):  # one to three equal top coordinates; the gold scores the top
        top = rng.choice(dim, size=int(rng.integers(1, 4)), replace=False)
        row[top] = 1.0
        gold[i] = int(top[0]) + (dim if top[0] < 3 and rng.random() < 0.5 else 0)
    gold[::5] = torch.from_numpy(rng.integers(0, candidates.shape[0], size=8))  # and some golds anywhere
    q, c = torch.from_numpy(normalised(query)), torch.from_numpy(normalised(candidates))
    expected = metrics_from_ranks(gold_ranks(q, c, gold), ks=(1, 2, 5))
    index = SearchIndex(build_index(c), [str(i) for i in range(len(c))], [None] * len(c), {})
    scores, ids = index.search(q, 6)
    ranks = gold_ranks_from_hits(scores, ids, gold.numpy())
    assert metrics_from_ranks(ranks, ks=(1, 2, 5))["recall@1"] == expected["recall@1"]
    got = index_recall(index, q, [str(int(g)) for g in gold], ks=(1, 2, 5))
    assert got == {f"recall@{k}": expected[f"recall@{k}"] for k in (1, 2, 5)}
    # The ties matter here: breaking them by id (FAISS's order) would recall more at 1.
    assert 0 < expected["recall@1"] < float(np.mean(ids[:, 0] == gold.numpy())) and expected["recall@1"] < 1
    index.keys[1] = "0"
    with pytest.raises(EmbeddingsError, match="the index holds key '0' more than once"):
        index_recall(index, q, [str(int(g)) for g in gold])


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_kinds_find_exact_neighbours_on_a_small_set(kind):
    vectors = torch.nn.functional.normalize(torch.randn(64, 16), dim=-1)
    from lame_pl.embeddings_folder import Embeddings

    index = index_embeddings(Embeddings([str(i) for i in range(64)], [None] * 64, vectors, vectors), kind=kind, nlist=4)
    if kind == "ivf":
        index.index.nprobe = 4  # every list: exact
    _, ids = index.search(vectors, 1)
    assert (ids[:, 0] == np.arange(64)).mean() == 1.0


def test_missing_or_corrupt_embeddings_fail_naming_the_path(run, tmp_path):
    with pytest.raises(EmbeddingsError, match=f"^{tmp_path / 'none'}: no such embeddings folder"):
        load_embeddings(tmp_path / "none")
    copy = tmp_path / "emb"
    copy.mkdir()
    for f in run["embeddings"].iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    shard = sorted(copy.glob("*.safetensors"))[1]
    shard.write_bytes(b"not a safetensors file")
    with pytest.raises(EmbeddingsError) as error:
        load_embeddings(copy)
    assert str(error.value).startswith(f"{shard}: not a readable safetensors file") and "\n" not in str(error.value)
    shard.unlink()
    (copy / "rank000-000000000.jsonl").unlink()
    with pytest.raises(EmbeddingsError, match=f"^{copy / 'rank000-000000000.jsonl'}: missing"):
        load_embeddings(copy)
    with pytest.raises(SystemExit) as done:
        index_tool.main(["--embeddings", str(tmp_path / "none"), "--out", str(tmp_path / "i")])
    assert (
        str(done.value.code)
        == f"error: {tmp_path / 'none'}: no such embeddings folder (write one with lightning predict)"
    )


def test_missing_or_corrupt_index_fails_naming_the_path(run, tmp_path):
    out = tmp_path / "index"
    index_tool.main(["--embeddings", str(run["embeddings"]), "--out", str(out)])
    assert load_index(out).index.ntotal == TEST_SAMPLES
    (out / "index.faiss").write_bytes(b"garbage")
    with pytest.raises(EmbeddingsError) as error:
        load_index(out)
    assert str(error.value).startswith(f"{out / 'index.faiss'}: not a readable FAISS index")
    assert "\n" not in str(error.value)
    with pytest.raises(SystemExit) as done:
        search_tool.main(["--index", str(tmp_path / "nowhere"), "--queries", str(run["embeddings"])])
    assert (
        str(done.value.code) == f"error: {tmp_path / 'nowhere'}: no such index folder (build one with tools/index.py)"
    )


@pytest.mark.slow  # two DDP launches, ~40 s on 2 cores
def test_two_process_predict_shards_by_rank_and_recall_still_equals_the_modules(run, shards, tmp_path):
    """Two ranks read uneven test shards (8 and 4 rows): rows read back in rank order rank as the module's."""
    lightning = Path(sys.executable).with_name("lightning")
    common = [
        f"--config={CONF}",
        *data_args(shards),
        f"--ckpt_path={run['ckpt']}",
        "--trainer.logger=false",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
    ]
    metrics, embeddings = tmp_path / "metrics.json", tmp_path / "embeddings"
    for args in (
        ["test", "--trainer.callbacks+=callbacks.MetricsFile", f"--trainer.callbacks.path={metrics}"],
        ["predict", "--trainer.callbacks+=callbacks.EmbeddingWriter", f"--trainer.callbacks.path={embeddings}"],
    ):
        done = subprocess.run(
            [str(lightning), args[0], *common, *args[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in embeddings.glob("*.safetensors")) == [
        "rank000-000000000.safetensors",
        "rank001-000000000.safetensors",
    ]
    saved = load_embeddings(embeddings)
    assert len(set(saved.keys)) == TEST_SAMPLES
    module = json.loads(metrics.read_text())
    got = index_recall(index_embeddings(saved), saved.query, saved.keys)
    for k in (1, 5, 10):
        assert float(np.float32(got[f"recall@{k}"])) == module[f"test/recall@{k}"], k

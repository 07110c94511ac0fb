"""The benchmarks' own scoring (``official``) against references, and the file/reader mismatches that are no longer silent."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from eval_fakes import WordEncoder, one_line_error, word_png

from lame_pl.evaluation.mmeb import load_mmeb_tasks
from lame_pl.evaluation.mrmr import load_mrmr_tasks
from lame_pl.evaluation.official import score_official
from lame_pl.evaluation.run import main

pytrec_eval = pytest.importorskip("pytrec_eval")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def embed(items) -> torch.Tensor:
    return WordEncoder().encode(items)


def write_mrmr_hard(root: Path) -> Path:
    """Ties, a zero and a duplicate qrel, a zero-only query, a query without qrels, a missing document."""
    k = root / "knowledge"
    word_png("dog", k / "dog.png")
    write_jsonl(
        k / "corpus.jsonl",
        [
            {"id": "c1", "text": "cat", "modality": "text"},
            {"id": "c2", "text": "cat", "modality": "text"},  # ties with c1 for every query
            {"id": "c10", "text": "cat fish", "modality": "text"},
            {"id": "c3", "text": "dog", "modality": "text"},
            {"id": "c4", "text": "red", "image": "dog.png", "image 1": "dog.png", "modality": "image,text"},
        ],
    )
    write_jsonl(
        k / "query.jsonl",
        [
            {"id": "q1", "text": "cat", "modality": "text"},
            {"id": "q2", "text": "dog", "modality": "text"},
            {"id": "q3", "text": "fish", "modality": "text"},
            {"id": "q4", "text": "red", "modality": "text"},
            {"id": "q5", "text": "blue", "modality": "text"},  # no qrel row at all: not scored by either
        ],
    )
    write_jsonl(
        k / "qrels.jsonl",
        [
            {"query_id": "q1", "corpus_id": "c2", "score": 1},
            {"query_id": "q1", "corpus_id": "c10", "score": 2},
            {"query_id": "q1", "corpus_id": "c2", "score": 3},  # repeated pair: MRMR keeps the last row
            {"query_id": "q2", "corpus_id": "c3", "score": 1},
            {"query_id": "q2", "corpus_id": "gone", "score": 1},  # not in the corpus
            {"query_id": "q2", "corpus_id": "c1", "score": 0},  # grade 0
            {"query_id": "q3", "corpus_id": "c1", "score": 0},  # every grade 0: MRMR scores it 0
            {"query_id": "q4", "corpus_id": "c4", "score": 1},
        ],
    )
    return root


def test_official_mrmr_equals_pytrec_eval(tmp_path, capsys):
    (task,) = load_mrmr_tasks(write_mrmr_hard(tmp_path / "mrmr"))
    view = task.official
    q, c = embed(view.queries), embed(view.candidates)
    ours = score_official(view, q, c, ks=(1, 3, 10))
    # The reference: MRMR's qrels (last row wins, 0 kept) and a run of every document's score.
    qrels = {"q1": {"c2": 3, "c10": 2}, "q2": {"c3": 1, "gone": 1, "c1": 0}, "q3": {"c1": 0}, "q4": {"c4": 1}}
    ids = ["c1", "c2", "c10", "c3", "c4"]
    scores = (q @ c.T).tolist()
    run = {qid: {d: float(s) for d, s in zip(ids, row, strict=True)} for qid, row in zip(qrels, scores, strict=True)}
    reference = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.1,3,10", "recall.1,3,10"}).evaluate(run)
    assert ours["num_queries"] == len(reference) == 4  # q3 (grades all 0) counts, q5 (no qrel) does not
    for k in (1, 3, 10):
        assert ours[f"ndcg@{k}"] == pytest.approx(np.mean([r[f"ndcg_cut_{k}"] for r in reference.values()]))
        assert ours[f"recall@{k}"] == pytest.approx(np.mean([r[f"recall_{k}"] for r in reference.values()]))
    # c1 and c2 tie for q1; trec_eval puts the larger id first, so c2 (grade 3) is at rank 1.
    assert reference["q1"]["ndcg_cut_1"] == 1.0 and ours["ndcg@1"] > 0
    # MRMR embeds the 'image' column only: c4's 'image 1' is not part of its official item.
    assert len(view.candidates[4].images) == 1 and len(task.candidates[4].images) == 2
    err = capsys.readouterr().err
    assert "1 of 6 documents the qrels name are not in the corpus" in err


def test_official_visdoc_equals_pytrec_eval_in_vlm2vec_order(tmp_path):
    root = tmp_path / "mmeb"
    task_dir = root / "visdoc" / "ViDoRe_arxivqa"
    words = {"d1": "cat", "d2": "dog", "d3": "bird", "d4": "dog"}
    for doc, word in words.items():
        word_png(word, root / "visdoc-tasks" / "ViDoRe_arxivqa" / f"{doc}.png")
    write_jsonl(task_dir / "corpus.jsonl", [{"corpus-id": d} for d in ("d3", "d4", "d2", "d1")])
    write_jsonl(
        task_dir / "queries.jsonl",
        [{"query-id": "q1", "query": "dog"}, {"query-id": "q2", "query": "cat"}, {"query-id": "q3", "query": "fish"}],
    )
    write_jsonl(
        task_dir / "qrels.jsonl",
        [
            {"query-id": "q1", "corpus-id": "d2", "score": 1},
            {"query-id": "q1", "corpus-id": "d2", "score": 2},
            {"query-id": "q1", "corpus-id": "d3", "score": 0},
            {"query-id": "q2", "corpus-id": "d4", "score": 1},  # d4 ties with d2, d3 at 0 for "cat"
            {"query-id": "q3", "corpus-id": "d1", "score": 0},  # no positive qrel: VLM2Vec stops; left out
        ],
    )
    (task,) = load_mmeb_tasks(root, log=lambda m: None)
    view = task.official
    q, c = embed(view.queries), embed(view.candidates)
    ours = score_official(view, q, c, ks=(1, 3))
    # VLM2Vec's candidate order: the named documents first (d2, d4), then the corpus (d3, d1).
    ids = ["d3", "d4", "d2", "d1"]
    assert [ids[i] for i in view.order] == ["d2", "d4", "d3", "d1"]
    # Its argsort order, handed to trec_eval as strictly decreasing scores: only the grades decide.
    ranked = np.argsort(-(q.numpy() @ c.numpy()[view.order].T), axis=1)
    run = {
        qid: {ids[view.order[j]]: float(-pos) for pos, j in enumerate(row)}
        for qid, row in zip(("q1", "q2"), ranked, strict=True)
    }
    qrels = {"q1": {"d2": 2}, "q2": {"d4": 1}}  # VLM2Vec keeps the highest positive grade
    reference = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.1,3", "recall.1,3"}).evaluate(run)
    for k in (1, 3):
        assert ours[f"ndcg@{k}"] == pytest.approx(np.mean([r[f"ndcg_cut_{k}"] for r in reference.values()]))
        assert ours[f"recall@{k}"] == pytest.approx(np.mean([r[f"recall_{k}"] for r in reference.values()]))
    assert ours["ndcg@1"] == 0.5  # q2's gold d4 ties at 0 with d3 and d1 and comes first in VLM2Vec's order
    assert ours["num_queries"] == 2


def vlm2vec_hit(cand_names: list[str], label: str, scores: np.ndarray, k: int) -> float:
    """Our transcription of VLM2Vec's local ranking and RankingMetrics.hit_at_k for one query row."""
    ranked = np.argsort(-scores)
    prediction = [cand_names[i] for i in ranked]
    return 1.0 if set(prediction[:k]) & {label} else 0.0


def test_official_mmeb_image_equals_a_transcription_of_vlm2vec(tmp_path):
    root = tmp_path / "mmeb"
    for word in ("cat", "dog", "fish"):
        word_png(word, root / "image-tasks" / "ImageNet-1K" / f"{word}.png")
    rows = [
        ("cat", ["cat", "dog", "bird"]),
        ("dog", ["bird", "dog", "cat"]),
        ("fish", ["cat", "dog", "bird"]),
        ("cat", ["dog", "cat", "cat"]),
        ("fish", ["dog", "bird", "dog", "cat"]),
    ]
    write_jsonl(
        root / "image" / "ImageNet-1K.jsonl",
        [
            {
                "qry_inst": "",
                "qry_text": "",
                "qry_img_path": f"ImageNet-1K/{w}.png",
                "tgt_inst": "",
                "tgt_text": names,
                "tgt_img_path": [""] * len(names),
            }
            for w, names in rows
        ],
    )
    (task,) = load_mmeb_tasks(root, log=lambda m: None)
    q, c = embed(task.queries), embed(task.candidates)
    ours = score_official(task.official, q, c, ks=(1, 2))
    # VLM2Vec embeds one candidate per name (its text) and ranks each list as given.
    by_name = dict(zip(["cat", "dog", "bird"], embed([task.candidates[i] for i in range(3)]).numpy(), strict=True))
    for k in (1, 2):
        expected = np.mean(
            [
                vlm2vec_hit(names, names[0], np.array([by_name[n] for n in names]) @ q[i].numpy(), k)
                for i, (_, names) in enumerate(rows)
            ]
        )
        assert ours[f"hit@{k}"] == pytest.approx(expected)
    assert ours["hit@1"] == 0.6  # the all-tie fish rows keep numpy's order: gold first in row 3, a rival in row 5


def run_mrmr(root: Path, out: Path, *extra: str) -> dict:
    return main(
        "mrmr",
        ["--checkpoint", "x.ckpt", "--data-root", str(root), "--output-dir", str(out), *extra],
        encoder=WordEncoder(),
    )


def test_summary_holds_both_scorings(tmp_path, capsys):
    summary = run_mrmr(write_mrmr_hard(tmp_path / "mrmr"), tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    record = saved["tasks"][0]
    assert (
        record["main_score"] == summary["overall"]["score"] and record["strict_score"] == summary["overall"]["strict"]
    )
    assert record["num_queries"] == 4 and record["strict"]["num_queries"] == 3
    assert record["scorer"].startswith("trec_eval")
    assert "official  strict" in capsys.readouterr().out


def test_mismatches_between_files_and_reader_are_errors(tmp_path):
    # qrels ids with a prefix the corpus does not have: an oracle would score 0 without a word.
    root = write_mrmr_hard(tmp_path / "a")
    write_jsonl(root / "knowledge" / "qrels.jsonl", [{"query_id": "q1", "corpus_id": "corpus-test-c1", "score": 1}])
    message = one_line_error(run_mrmr, root, tmp_path / "o1")
    assert "task MRMR-knowledge" in message and "qrels.jsonl" in message and "'corpus-id' names no document" in message
    # an image column spelt otherwise than the layout
    root = write_mrmr_hard(tmp_path / "b")
    write_jsonl(root / "knowledge" / "query.jsonl", [{"id": "q1", "text": "cat", "image_1": "dog.png"}])
    message = one_line_error(run_mrmr, root, tmp_path / "o2")
    assert "query.jsonl row 0: column 'image_1'" in message and "'image 1'" in message and "MRMR-knowledge" in message
    # both spellings of an id column, disagreeing
    root = write_mrmr_hard(tmp_path / "c")
    write_jsonl(
        root / "knowledge" / "qrels.jsonl", [{"query_id": "q1", "query-id": "q2", "corpus_id": "c1", "score": 1}]
    )
    message = one_line_error(run_mrmr, root, tmp_path / "o3")
    assert "qrels.jsonl row 0: two spellings" in message and "'query_id'" in message and "MRMR-knowledge" in message
    # MMEB: a visual-document qrel naming no corpus row, and a misspelt media field
    root = tmp_path / "mmeb"
    word_png("cat", root / "visdoc-tasks" / "ViDoRe_arxivqa" / "d1.png")
    write_jsonl(root / "visdoc" / "ViDoRe_arxivqa" / "corpus.jsonl", [{"corpus-id": "d1"}])
    write_jsonl(root / "visdoc" / "ViDoRe_arxivqa" / "queries.jsonl", [{"query-id": "q1", "query": "cat"}])
    write_jsonl(
        root / "visdoc" / "ViDoRe_arxivqa" / "qrels.jsonl", [{"query-id": "q1", "corpus-id": "doc-d1", "score": 1}]
    )
    with pytest.raises(ValueError, match=r"task ViDoRe_arxivqa: .*qrels.jsonl: column 'corpus-id' names 1 of 1"):
        load_mmeb_tasks(root, log=lambda m: None)
    (root / "visdoc").rename(tmp_path / "unused")
    write_jsonl(
        root / "image" / "ImageNet-1K.jsonl",
        [{"qry_inst": "", "qry_text": "", "qry_image_path": "x.png", "tgt_text": ["cat"]}],
    )
    with pytest.raises(ValueError, match=r"task ImageNet-1K: .*column 'qry_image_path' .*'qry_img_path'"):
        load_mmeb_tasks(root, log=lambda m: None)

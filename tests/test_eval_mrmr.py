"""The MRMR evaluator on small fixtures in the MRMR layout, with exact known answers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from eval_fakes import WordEncoder, one_line_error, word_png

from lame_pl.evaluation.mrmr import QUERY_INSTRUCTIONS, load_mrmr_tasks
from lame_pl.evaluation.run import main


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_mrmr(root: Path) -> Path:
    # knowledge: qrels columns with underscores, graded; an image query; pin_p extra documents.
    k = root / "knowledge"
    word_png("cat", k / "images" / "q_cat.png")
    word_png("dog", k / "images" / "doc_dog.png")
    write_jsonl(
        k / "corpus.jsonl",
        [
            {"id": "c1", "text": "cat facts", "modality": "text"},
            {"id": "c2", "text": "about a", "image": "images/doc_dog.png", "modality": "image,text"},
            {"id": "c3", "text": "cat cat and fish", "modality": "text"},
        ],
    )
    write_jsonl(k / "pin_p.jsonl", [{"id": "c1", "text": "bird", "modality": "text"}])  # same id, kept apart
    write_jsonl(
        k / "query.jsonl",
        [
            {"id": "k1", "text": "what is this?", "image": "images/q_cat.png", "modality": "image,text"},
            {"id": "k2", "text": "bird", "modality": "text"},
        ],
    )
    write_jsonl(
        k / "qrels.jsonl",
        [
            {"query_id": "k1", "corpus_id": "c1", "score": 1},
            {"query_id": "k1", "corpus_id": "c3", "score": 2},
            {"query_id": "k2", "corpus_id": "c2", "score": 1},
        ],
    )
    # negation: hyphenated qrels columns; main score recall@1.
    n = root / "negation"
    for word in ("red", "blue"):
        word_png(word, n / "img" / f"{word}.png")
    write_jsonl(n / "corpus.jsonl", [{"id": "t1", "text": "red"}, {"id": "t2", "text": "blue"}])
    write_jsonl(
        n / "query.jsonl",
        [{"id": "n1", "text": "", "image": "img/red.png"}, {"id": "n2", "text": "", "image": "img/blue.png"}],
    )
    write_jsonl(
        n / "qrels.jsonl",
        [{"query-id": "n1", "corpus-id": "t1", "score": 1}, {"query-id": "n2", "corpus-id": "t1", "score": 1}],
    )
    return root


# k1 (a cat image): c1 ("cat facts", cosine 1) before c3 ("cat cat and fish", cosine 2/sqrt(5)), so
# grades 1, 2 where the ideal is 2, 1.
K1 = (1 / math.log2(2) + 2 / math.log2(3)) / (2 / math.log2(2) + 1 / math.log2(3))
# k2 ("bird"): the pin_p document "bird" ranks first, its gold c2 (a dog) ties at 0 with c1 and c3
# and goes after them: rank 3 of 0..3.
K2 = (1 / math.log2(5)) / 1.0


def run(root: Path, out: Path, *extra: str, encoder=None) -> dict:
    args = ["--checkpoint", "unused.ckpt", "--data-root", str(root), "--output-dir", str(out), *extra]
    return main("mrmr", args, encoder=encoder or WordEncoder())


def test_known_answers(tmp_path, capsys):
    summary = run(write_mrmr(tmp_path / "mrmr"), tmp_path / "out")
    by_task = {t["task"]: t for t in summary["tasks"]}
    assert list(by_task) == ["knowledge", "negation"]
    assert by_task["knowledge"]["main_metric"] == "ndcg@10"
    assert by_task["knowledge"]["strict_score"] == pytest.approx((K1 + K2) / 2)
    assert by_task["knowledge"]["num_candidates"] == 4  # three documents and one pin_p
    assert by_task["negation"]["main_metric"] == "recall@1"
    assert by_task["negation"]["strict_score"] == 0.5  # n1 finds t1; n2 finds t2, whose gold is t1
    assert summary["overall"]["strict"] == pytest.approx(((K1 + K2) / 2 + 0.5) / 2)
    assert (tmp_path / "out" / "mrmr" / "negation_score.json").is_file()
    table = capsys.readouterr().out
    assert "knowledge" in table and "recall@1" in table and "(mean of 2 tasks)" in table


def test_query_instructions_and_images(tmp_path):
    tasks = {t.name: t for t in load_mrmr_tasks(write_mrmr(tmp_path / "mrmr"))}
    query = tasks["knowledge"].queries[0]
    assert query.instruction == QUERY_INSTRUCTIONS["knowledge"]
    assert query.images[0].endswith("images/q_cat.png")
    assert tasks["knowledge"].candidates[0].instruction == ""


def test_parquet_with_inline_image_bytes(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    root = tmp_path / "mrmr"
    folder = root / "design"
    folder.mkdir(parents=True)
    image = {"bytes": word_png("red"), "path": "red.png"}
    pq.write_table(
        pa.Table.from_pylist([{"id": "d1", "text": "", "image": image}, {"id": "d2", "text": "blue", "image": None}]),
        folder / "corpus.parquet",
    )
    pq.write_table(pa.Table.from_pylist([{"id": "q1", "text": "red", "image": None}]), folder / "query.parquet")
    (folder / "qrels").mkdir()
    pq.write_table(
        pa.Table.from_pylist([{"query-id": "q1", "corpus-id": "d1", "score": 1}]),
        folder / "qrels" / "test-00000-of-00001.parquet",
    )
    summary = run(root, tmp_path / "out")
    assert summary["tasks"][0]["task"] == "design" and summary["tasks"][0]["strict_score"] == 1.0


def test_cache_means_a_rerun_only_scores(tmp_path):
    root = write_mrmr(tmp_path / "mrmr")
    run(root, tmp_path / "out", "--cache-dir", str(tmp_path / "cache"))
    again = WordEncoder()
    summary = run(root, tmp_path / "out2", "--cache-dir", str(tmp_path / "cache"), encoder=again)
    assert again.encoded == [] and summary["tasks"][1]["strict_score"] == 0.5


def bad(root: Path, tmp_path: Path, *extra: str) -> str:
    return one_line_error(run, root, tmp_path / "out", *extra)


def test_bad_inputs_stop_with_a_message_naming_them(tmp_path):
    assert "missing folder" in bad(tmp_path / "absent", tmp_path)
    root = write_mrmr(tmp_path / "mrmr")
    assert "MRMR subset 'traffic'" in bad(root, tmp_path, "--tasks", "traffic")
    (root / "negation" / "query.jsonl").unlink()
    assert "missing table 'query'" in bad(root, tmp_path)
    root = write_mrmr(tmp_path / "mrmr2")
    write_jsonl(root / "negation" / "corpus.jsonl", [{"id": "t1", "text": "red"}, {"text": "blue"}])
    assert f"{root / 'negation' / 'corpus.jsonl'} row 1: missing field 'id'" in bad(root, tmp_path)
    root = write_mrmr(tmp_path / "mrmr3")
    (root / "knowledge" / "images" / "doc_dog.png").unlink()
    message = bad(root, tmp_path)
    assert "task MRMR-knowledge:" in message and "row 1: image 'images/doc_dog.png' does not exist" in message

"""The MMEB-v2 evaluator on small fixtures written in the VLM2Vec layout, with exact known answers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from eval_fakes import WordEncoder, one_line_error, word_png

from lame_pl.evaluation.mmeb import load_mmeb_tasks
from lame_pl.evaluation.run import main

INST = "<|image_1|> Represent the given image for classification"


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def image_rows() -> list[dict]:
    """ImageNet-1K-shaped rows: an image query, text candidates, gold first. Expected hit@1: 2 of 4."""

    def row(word: str, candidates: list[str]) -> dict:
        return {
            "qry_inst": INST,
            "qry_text": "",
            "qry_img_path": f"ImageNet-1K/{word}.png",
            "tgt_inst": "",
            "tgt_text": candidates,
            "tgt_img_path": [""] * len(candidates),
        }

    return [
        row("cat", ["cat", "dog", "bird"]),  # right
        row("dog", ["bird", "dog", "cat"]),  # wrong: the model prefers dog, the gold is bird
        row("fish", ["cat", "dog", "bird"]),  # every score ties at 0: ties count against the query
        row("cat", ["cat", "cat", "dog"]),  # a duplicate of the gold is the gold, not a rival
    ]


def t2i_rows() -> list[dict]:
    """MSCOCO_t2i-shaped rows: a text query, image candidates named by path. Expected hit@1: 1 of 2."""
    return [
        {
            "qry_inst": "Find me an everyday image that matches the given caption:",
            "qry_text": "a cat",
            "qry_img_path": "",
            "tgt_inst": "",
            "tgt_text": ["<|image_1|> Represent the given image."] * 2,
            "tgt_img_path": ["MSCOCO_t2i/cat.png", "MSCOCO_t2i/dog.png"],
        },
        {
            "qry_inst": "Find me an everyday image that matches the given caption:",
            "qry_text": "a bird",
            "qry_img_path": "",
            "tgt_inst": "",
            "tgt_text": ["<|image_1|> Represent the given image."] * 2,
            "tgt_img_path": ["MSCOCO_t2i/dog.png", "MSCOCO_t2i/bird.png"],
        },
    ]


def write_mmeb(root: Path, parquet: bool = False) -> Path:
    images = root / "image-tasks"
    for word in ("cat", "dog", "fish"):
        word_png(word, images / "ImageNet-1K" / f"{word}.png")
    for word in ("cat", "dog", "bird"):
        word_png(word, images / "MSCOCO_t2i" / f"{word}.png")
    if parquet:
        pa = pytest.importorskip("pyarrow")
        pq = pytest.importorskip("pyarrow.parquet")
        (root / "image" / "ImageNet-1K").mkdir(parents=True)
        pq.write_table(
            pa.Table.from_pylist(image_rows()), root / "image" / "ImageNet-1K" / "test-00000-of-00001.parquet"
        )
    else:
        write_jsonl(root / "image" / "ImageNet-1K.jsonl", image_rows())
    write_jsonl(root / "image" / "MSCOCO_t2i.jsonl", t2i_rows())
    # Video retrieval (global): text queries against every video of the task, videos as frame folders.
    for word in ("cat", "dog"):
        for i in range(3):
            word_png(word, root / "video-tasks" / "MSR-VTT" / f"v_{word}" / f"{i:03d}.png")
    write_jsonl(
        root / "video" / "MSR-VTT.jsonl",
        [
            {
                "qry_inst": "Find a video that contains the following visual content:",
                "qry_text": "cat",
                "qry_video_path": "",
                "tgt_text": [""],
                "tgt_video_path": ["MSR-VTT/v_cat"],
            },
            {
                "qry_inst": "Find a video that contains the following visual content:",
                "qry_text": "dog",
                "qry_video_path": "",
                "tgt_text": [""],
                "tgt_video_path": ["MSR-VTT/v_dog"],
            },
        ],
    )
    # Visual documents, BEIR-style, graded qrels; pages as <corpus-id>.png under visdoc-tasks/<Task>.
    task = root / "visdoc" / "ViDoRe_arxivqa"
    for doc, word in (("d1", "cat"), ("d2", "dog"), ("d3", "bird")):
        word_png(word, root / "visdoc-tasks" / "ViDoRe_arxivqa" / f"{doc}.png")
    write_jsonl(task / "corpus.jsonl", [{"corpus-id": d} for d in ("d1", "d2", "d3")])
    write_jsonl(
        task / "queries.jsonl",
        [{"query-id": "q1", "query": "cat"}, {"query-id": "q2", "query": "dog"}, {"query-id": "q3", "query": "bird"}],
    )
    write_jsonl(
        task / "qrels.jsonl",
        [
            {"query-id": "q1", "corpus-id": "d1", "score": 2},
            {"query-id": "q1", "corpus-id": "d1", "score": 1},  # duplicate qrel: the highest grade stays
            {"query-id": "q1", "corpus-id": "d2", "score": 1},
            {"query-id": "q1", "corpus-id": "d3", "score": 0},  # grade 0: dropped
            {"query-id": "q2", "corpus-id": "d2", "score": 1},
            {"query-id": "q3", "corpus-id": "d3", "score": 0},  # q3 has no positive qrel: skipped
        ],
    )
    return root


# q1 ranks d1 (grade 2) first; d2 and d3 tie at 0 and the irrelevant d3 goes first, so d2 is third.
Q1_NDCG5 = (2 / math.log2(2) + 1 / math.log2(4)) / (2 / math.log2(2) + 1 / math.log2(3))
EXPECTED = {"ImageNet-1K": 0.5, "MSCOCO_t2i": 0.5, "MSR-VTT": 1.0, "ViDoRe_arxivqa": (Q1_NDCG5 + 1.0) / 2}


def run(root: Path, out: Path, *extra: str, encoder=None) -> dict:
    args = ["--checkpoint", "unused.ckpt", "--data-root", str(root), "--output-dir", str(out), *extra]
    return main("mmeb", args, encoder=encoder or WordEncoder())


def test_known_answers_per_task_group_modality_and_overall(tmp_path, capsys):
    root = write_mmeb(tmp_path / "mmeb")
    summary = run(root, tmp_path / "out")
    scores = {t["task"]: t["strict_score"] for t in summary["tasks"]}
    assert scores == pytest.approx(EXPECTED)
    assert [t["task"] for t in summary["tasks"]] == ["ImageNet-1K", "MSCOCO_t2i", "MSR-VTT", "ViDoRe_arxivqa"]
    by_task = {t["task"]: t for t in summary["tasks"]}
    assert by_task["ViDoRe_arxivqa"]["main_metric"] == "ndcg@5" and by_task["ViDoRe_arxivqa"]["skipped_queries"] == 1
    assert by_task["ImageNet-1K"]["ranking"] == "local" and by_task["MSR-VTT"]["ranking"] == "global"
    assert by_task["ImageNet-1K"]["num_candidates"] == 3  # cat, dog, bird across all rows
    image = summary["modalities"]["image"]
    # official (VLM2Vec): the all-tie "fish" row keeps numpy's order, gold first, so it is a hit (0.75);
    # strict counts the tie against the query (0.5): a 25-point gap, flagged.
    assert image["groups"] == {
        "CLS": {"score": 0.75, "strict": 0.5, "num_tasks": 1, "gap_flagged": True},
        "RET": {"score": 0.5, "strict": 0.5, "num_tasks": 1, "gap_flagged": False},
    }
    # official visdoc: VLM2Vec ranks the documents the queries name (d1, d2) before the rest (d3), so
    # d2 wins its tie with d3 for q1: nDCG@5 is 1 for both queries.
    official = {t["task"]: t["main_score"] for t in summary["tasks"]}
    assert official == pytest.approx({**EXPECTED, "ImageNet-1K": 0.75, "ViDoRe_arxivqa": 1.0})
    assert summary["modalities"]["video"]["score"] == 1.0
    assert summary["overall"]["strict"] == pytest.approx(sum(EXPECTED.values()) / 4)
    # One JSON per task, VLM2Vec-named, and the summary.
    saved = json.loads((tmp_path / "out" / "visdoc" / "ViDoRe_arxivqa_score.json").read_text())
    assert saved["strict_score"] == pytest.approx(EXPECTED["ViDoRe_arxivqa"])
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["overall"]["num_tasks"] == 4
    table = capsys.readouterr().out
    assert "ImageNet-1K" in table and "(mean of 4 tasks)" in table
    lines = [line.split()[:2] for line in table.splitlines()]
    assert "75.00   50.00 !" in table and "official and strict differ" in table
    assert ["image", "CLS"] in lines and ["visdoc", "ViDoRe-v1"] in lines and ["overall", "(mean"] in lines


def test_parquet_reads_like_jsonl(tmp_path):
    root = write_mmeb(tmp_path / "mmeb", parquet=True)
    summary = run(root, tmp_path / "out", "--tasks", "ImageNet-1K")
    assert summary["tasks"][0]["strict_score"] == 0.5


def test_video_frames_are_sampled_and_instructions_cleaned(tmp_path):
    root = write_mmeb(tmp_path / "mmeb")
    tasks = {t.name: t for t in load_mmeb_tasks(root, num_frames=2)}
    video = tasks["MSR-VTT"]
    # A video is a video (the model's video input), not images; first and last of 3 frames, as VLM2Vec-V2 samples.
    assert all(not c.images for c in video.candidates)
    assert [[Path(f).name for f in c.video] for c in video.candidates] == [["000.png", "002.png"]] * 2
    query = tasks["ImageNet-1K"].queries[0]
    assert query.instruction == "Represent the given image for classification"  # no <|image_1|>
    assert len(query.images) == 1


def test_video_frames_in_natural_order_sampled_like_vlm2vec(tmp_path):
    root = write_mmeb(tmp_path / "mmeb")
    folder = root / "video-tasks" / "MSR-VTT" / "v_cat"
    for frame in folder.iterdir():
        frame.unlink()
    for i in range(1, 13):  # frame_1 ... frame_12: lexical order would put frame_10 before frame_2
        word_png("cat", folder / f"frame_{i}.png")
    (folder / ".frame_0.png").write_bytes(b"hidden")  # hidden files and other files are not frames
    (folder / "notes.txt").write_text("not a frame")
    video = {t.name: t for t in load_mmeb_tasks(root, ["MSR-VTT"], num_frames=4)}["MSR-VTT"]
    # numpy.linspace(0, 11, 4) truncated: indices 0, 3, 7, 11.
    assert [Path(f).name for f in video.candidates[0].video] == [
        "frame_1.png",
        "frame_4.png",
        "frame_8.png",
        "frame_12.png",
    ]


def test_item_key_tells_a_video_from_the_same_frames_as_images(tmp_path):
    from lame_pl.evaluation.task import Item

    frames = (str(tmp_path / "cat.png"), str(tmp_path / "dog.png"))
    for path in frames:
        word_png(Path(path).stem, Path(path))
    assert Item("", "x", images=frames).key() != Item("", "x", video=frames).key()
    assert Item("", "x", video=frames).key() == Item("", "x", video=frames).key()
    assert Item("", "x", video=frames).key() != Item("", "x", video=frames[::-1]).key()


def test_video_frames_of_different_sizes_are_named(tmp_path):
    from PIL import Image

    from lame_pl.evaluation.encode import item_side
    from lame_pl.evaluation.tables import EvalDataError
    from lame_pl.evaluation.task import Item

    Image.new("RGB", (8, 8)).save(tmp_path / "f1.png")
    Image.new("RGB", (16, 8)).save(tmp_path / "f2.png")
    with pytest.raises(EvalDataError, match=r"f1\.png .*frames differ in size"):
        item_side(Item("", "x", video=(str(tmp_path / "f1.png"), str(tmp_path / "f2.png"))))
    side = item_side(Item("i", "x", images=(str(tmp_path / "f2.png"),), video=(str(tmp_path / "f1.png"),) * 2))
    assert len(side.images) == 1 and len(side.video) == 2 and side.instruction == "i"


def test_rerun_encodes_nothing_and_changes_invalidate_the_cache(tmp_path):
    root = write_mmeb(tmp_path / "mmeb")
    first = WordEncoder()
    run(root, tmp_path / "out", encoder=first)
    assert len(first.encoded) > 0
    # Identical items are encoded once: the classification labels repeat across rows.
    assert len(first.encoded) == len(set(first.encoded))
    again = WordEncoder()
    summary = run(root, tmp_path / "out", encoder=again)
    assert again.encoded == []
    assert {t["task"]: t["strict_score"] for t in summary["tasks"]} == pytest.approx(EXPECTED)
    # A changed record is encoded afresh, and only it.
    rows = t2i_rows()
    rows[1]["qry_text"] = "a dog"
    write_jsonl(root / "image" / "MSCOCO_t2i.jsonl", rows)
    changed = WordEncoder()
    run(root, tmp_path / "out", encoder=changed)
    assert [item.text for item in changed.encoded] == ["a dog"]
    # Another checkpoint (fingerprint) encodes everything again.
    other = WordEncoder(fingerprint="words-v2")
    run(root, tmp_path / "out", "--tasks", "MSR-VTT", encoder=other)
    assert len(other.encoded) == 4  # two queries, two videos


def bad(root: Path, tmp_path: Path, *extra: str) -> str:
    return one_line_error(run, root, tmp_path / "out", *extra)


def test_missing_folder(tmp_path):
    message = bad(tmp_path / "nowhere", tmp_path)
    assert "missing folder" in message and "nowhere" in message
    (tmp_path / "empty").mkdir()
    assert "expected image/, video/ or visdoc/" in bad(tmp_path / "empty", tmp_path)
    root = write_mmeb(tmp_path / "mmeb")
    assert "task 'NoSuchTask' not found" in bad(root, tmp_path, "--tasks", "NoSuchTask")


def test_malformed_records_name_file_row_and_field(tmp_path):
    root = write_mmeb(tmp_path / "mmeb")
    path = root / "image" / "ImageNet-1K.jsonl"
    rows = image_rows()
    del rows[2]["tgt_text"]
    write_jsonl(path, rows)
    message = bad(root, tmp_path)
    assert f"{path} row 2: missing field 'tgt_text'" in message
    write_jsonl(path, image_rows())
    path.write_text(path.read_text() + "{not json\n")
    assert f"{path} row 4 (line 5): not valid JSON" in bad(root, tmp_path)
    rows = image_rows()
    rows[1]["tgt_img_path"] = [""]
    write_jsonl(path, rows)
    assert "row 1: 'tgt_text' has 3 candidates but 'tgt_img_path' has 1" in bad(root, tmp_path)
    write_jsonl(path, image_rows())
    qrels = root / "visdoc" / "ViDoRe_arxivqa" / "qrels.jsonl"
    write_jsonl(qrels, [{"query-id": "q1", "corpus-id": "d1"}])
    assert f"{qrels} row 0: missing field 'score'" in bad(root, tmp_path)


def test_missing_image_names_task_row_and_path(tmp_path):
    root = write_mmeb(tmp_path / "mmeb")
    (root / "image-tasks" / "ImageNet-1K" / "dog.png").unlink()
    message = bad(root, tmp_path)
    assert "task ImageNet-1K:" in message and "row 1: qry_img_path 'ImageNet-1K/dog.png' does not exist" in message
    root = write_mmeb(tmp_path / "mmeb2")
    (root / "visdoc-tasks" / "ViDoRe_arxivqa" / "d2.png").unlink()
    message = bad(root, tmp_path, "--tasks", "ViDoRe_arxivqa")
    assert "task ViDoRe_arxivqa:" in message and "row 1: page image 'd2.png' does not exist" in message
    root = write_mmeb(tmp_path / "mmeb3")
    for frame in (root / "video-tasks" / "MSR-VTT" / "v_dog").iterdir():
        frame.unlink()
    assert "tgt_video_path 'MSR-VTT/v_dog' holds no frame image" in bad(root, tmp_path, "--tasks", "MSR-VTT")

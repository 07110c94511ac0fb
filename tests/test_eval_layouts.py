"""The evaluators read the folders the published snapshots leave on disk, say where each task came from,
name what they do not read, resolve a task name's case, and list the tasks they accept."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from eval_fakes import WordEncoder, one_line_error, word_png
from test_eval_mmeb import EXPECTED, image_rows, t2i_rows, write_mmeb
from test_eval_mmeb import run as run_mmeb
from test_eval_mrmr import K1, K2, write_mrmr
from test_eval_mrmr import run as run_mrmr

from lame_pl.evaluation.run import main

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
REPO = Path(__file__).resolve().parents[1]


def parquet(path: Path, rows: list[dict]) -> None:
    """A Hugging Face snapshot's shard: ``<config>/test-00000-of-00001.parquet``."""
    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path / "test-00000-of-00001.parquet")


def jsonl_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_snapshots(root: Path, images: str) -> Path:
    """The flat fixture of test_eval_mmeb rearranged as the snapshots lay it out.

    Image rows: the annotation repository's per-task folders (``MMEB_Test_Instruct/<Task>/``);
    images under ``images`` (``image-tasks/MMEB`` as MMEB-V2's archive unpacks, or ``eval_images``);
    video frames under ``video-tasks/frames/video_ret`` as MMEB-V2 ships them; the ViDoRe tables as
    the ``vidore/arxivqa_test_subsampled_beir`` snapshot inside ``visdoc-tasks/``, pages beside it.
    """
    flat = write_mmeb(root.parent / f"{root.name}-flat")
    parquet(root / "MMEB_Test_Instruct" / "ImageNet-1K", image_rows())
    parquet(root / "MMEB_Test_Instruct" / "MSCOCO_t2i", t2i_rows())
    (root / "MMEB_Test_Instruct" / "README.md").parent.mkdir(parents=True, exist_ok=True)
    (root / "MMEB_Test_Instruct" / "README.md").write_text("dataset card")
    shutil.copytree(flat / "image-tasks", root / images)
    shutil.copytree(flat / "video", root / "video")
    shutil.copytree(flat / "video-tasks", root / "video-tasks" / "frames" / "video_ret")
    beir = root / "visdoc-tasks" / "arxivqa_test_subsampled_beir"
    for table in ("corpus", "queries", "qrels"):
        parquet(beir / table, jsonl_rows(flat / "visdoc" / "ViDoRe_arxivqa" / f"{table}.jsonl"))
    shutil.copytree(flat / "visdoc-tasks" / "ViDoRe_arxivqa", root / "visdoc-tasks" / "ViDoRe_arxivqa")
    return root


@pytest.mark.parametrize("images", ["image-tasks/MMEB", "eval_images"])
def test_snapshot_layouts_score_as_the_flat_layout(tmp_path, capsys, images):
    root = write_snapshots(tmp_path / "mmeb", images)
    (root / "notes").mkdir()  # a folder the evaluator does not read: named, not silently skipped
    summary = run_mmeb(root, tmp_path / "out")
    assert {t["task"]: t["strict_score"] for t in summary["tasks"]} == pytest.approx(EXPECTED)
    err = capsys.readouterr().err
    assert "ImageNet-1K: rows MMEB_Test_Instruct/ImageNet-1K, media " + images in err
    assert "MSR-VTT: rows video/MSR-VTT.jsonl, media video-tasks/frames/video_ret" in err
    assert "ViDoRe_arxivqa: tables visdoc-tasks/arxivqa_test_subsampled_beir, pages visdoc-tasks/ViDoRe_arxivqa" in err
    assert f"warning: folder {root / 'notes'} is not read" in err
    assert err.count("is not read") == 1  # README.md, the media folders and the snapshot's folders are not noise


def test_a_task_found_twice_is_read_once_and_the_other_copy_named(tmp_path, capsys):
    root = write_mmeb(tmp_path / "mmeb")
    parquet(root / "MMEB_Test_Instruct" / "ImageNet-1K", image_rows()[:1])  # a different copy: 1 query
    summary = run_mmeb(root, tmp_path / "out", "--tasks", "ImageNet-1K")
    assert summary["tasks"][0]["num_queries"] == 4  # image/ comes first
    err = capsys.readouterr().err
    assert f"warning: {root / 'MMEB_Test_Instruct' / 'ImageNet-1K'} is not read: task ImageNet-1K is read from" in err


def test_task_names_resolve_without_regard_to_case(tmp_path, capsys):
    root = write_mmeb(tmp_path / "mmeb")
    summary = run_mmeb(root, tmp_path / "out", "--tasks", "imagenet-1k", "vidore_ARXIVQA")
    by_task = {t["task"]: t for t in summary["tasks"]}
    assert by_task["ImageNet-1K"]["strict_score"] == EXPECTED["ImageNet-1K"]
    assert by_task["ViDoRe_arxivqa"]["main_metric"] == "ndcg@5"  # the canonical task's metric, never a default
    assert "note: task 'imagenet-1k' read as 'ImageNet-1K'" in capsys.readouterr().err
    message = one_line_error(run_mmeb, root, tmp_path / "out", "--tasks", "ImageNet1K")
    assert "task 'ImageNet1K' not found" in message and "did you mean 'ImageNet-1K'?" in message
    # A folder spelled in another case is the task it names.
    (root / "image" / "MSCOCO_t2i.jsonl").rename(root / "image" / "mscoco_T2I.jsonl")
    summary = run_mmeb(root, tmp_path / "out2", "--tasks", "MSCOCO_t2i")
    assert summary["tasks"][0]["task"] == "MSCOCO_t2i" and summary["tasks"][0]["counted"]


def test_media_missing_names_the_folders_tried_and_an_archive_to_unpack(tmp_path):
    root = write_mmeb(tmp_path / "mmeb")
    shutil.rmtree(root / "image-tasks")
    (root / "image-tasks").mkdir()
    (root / "image-tasks" / "mmeb_v1.tar.gz").write_bytes(b"")
    message = one_line_error(run_mmeb, root, tmp_path / "out", "--tasks", "ImageNet-1K")
    assert "task ImageNet-1K:" in message and "is in none of the media folders" in message
    assert f"unpack {root / 'image-tasks' / 'mmeb_v1.tar.gz'} first" in message


def test_english_vidore_v2_keeps_its_english_queries(tmp_path, capsys):
    root = tmp_path / "mmeb"
    beir = root / "visdoc-tasks" / "biomedical_lectures_v2"  # one snapshot, two tasks
    parquet(
        beir / "corpus",
        [
            {"corpus-id": "d1", "image": {"bytes": word_png("cat"), "path": None}},
            {"corpus-id": "d2", "image": {"bytes": word_png("dog"), "path": None}},
        ],
    )
    parquet(
        beir / "queries",
        [
            {"query-id": "q1", "query": "cat", "language": "english"},
            {"query-id": "q2", "query": "dog", "language": "french"},
        ],
    )
    parquet(
        beir / "qrels",
        [{"query-id": "q1", "corpus-id": "d1", "score": 1}, {"query-id": "q2", "corpus-id": "d1", "score": 1}],
    )  # q2 misses: 0
    summary = run_mmeb(root, tmp_path / "out")
    by_task = {t["task"]: t for t in summary["tasks"]}
    assert by_task["ViDoRe_biomedical_lectures_v2"]["num_queries"] == 1
    assert by_task["ViDoRe_biomedical_lectures_v2"]["strict_score"] == 1.0
    assert by_task["ViDoRe_biomedical_lectures_v2_multilingual"]["num_queries"] == 2
    assert not by_task["ViDoRe_biomedical_lectures_v2_multilingual"]["counted"]
    assert "1 of 2 queries are in english" in capsys.readouterr().err


def test_media_without_tables_is_said(tmp_path, capsys):
    root = write_mmeb(tmp_path / "mmeb")
    shutil.rmtree(root / "video")
    run_mmeb(root, tmp_path / "out", "--tasks", "ImageNet-1K")
    assert f"warning: {root / 'video-tasks'} holds video media but no video task table was found" in (
        capsys.readouterr().err
    )


def test_mrmr_snapshot_folders_and_case(tmp_path, capsys):
    flat = write_mrmr(tmp_path / "flat")
    root = tmp_path / "mrmr"
    shutil.copytree(flat / "knowledge", root / "MRMRbenchmark" / "Knowledge")
    shutil.copytree(flat / "negation", root / "negation")
    (root / "extra").mkdir()
    summary = run_mrmr(root, tmp_path / "out")
    scores = {t["task"]: t["strict_score"] for t in summary["tasks"]}
    assert scores == pytest.approx({"knowledge": (K1 + K2) / 2, "negation": 0.5})  # as the flat layout
    err = capsys.readouterr().err
    assert f"note: folder {root / 'MRMRbenchmark' / 'Knowledge'} read as MRMR subset 'knowledge'" in err
    assert f"warning: folder {root / 'extra'} is not read" in err
    summary = run_mrmr(root, tmp_path / "out2", "--tasks", "Negation")
    assert summary["tasks"][0]["task"] == "negation" and summary["tasks"][0]["main_metric"] == "recall@1"
    assert "note: task 'Negation' read as 'negation'" in capsys.readouterr().err
    message = one_line_error(run_mrmr, root, tmp_path / "out", "--tasks", "negatoin")
    assert "unknown MRMR task 'negatoin' (did you mean 'negation'?)" in message


def test_list_tasks_needs_no_checkpoint_or_data(capsys):
    for benchmark in ("mmeb", "mrmr"):
        with pytest.raises(SystemExit) as done:
            main(benchmark, ["--list-tasks"], encoder=WordEncoder())
        assert done.value.code == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["ImageNet-1K", "image", "CLS", "(classification)", "hit@1", "local"] in lines
    assert ["MSR-VTT", "video", "RET", "(retrieval)", "hit@1", "global"] in lines
    assert [
        "ViDoRe_arxivqa",
        "visdoc",
        "ViDoRe-v1",
        "(document",
        "retrieval)",
        "ndcg@5",
        "global",
        "arxivqa_test_subsampled_beir",
    ] in lines
    assert ["negation", "contradiction", "recall@1", "negation/", "or", "MRMRbenchmark/negation/"] in lines
    assert sum(1 for line in lines if "hit@1" in line or "ndcg@5" in line) == 81  # 78 counted + 3 multilingual


def test_list_tasks_runs_as_written_in_a_fresh_directory(tmp_path, capsys):
    done = subprocess.run(
        [sys.executable, str(REPO / "tools" / "eval_mmeb.py"), "--list-tasks"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "ImageNet-1K" in done.stdout and "ndcg@5" in done.stdout
    # Without --list-tasks the evaluation arguments are still required, by name.
    with pytest.raises(SystemExit) as missing:
        main("mrmr", ["--data-root", "."], encoder=WordEncoder())
    assert missing.value.code == 2 and "required: --checkpoint, --output-dir" in capsys.readouterr().err

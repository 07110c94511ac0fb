"""Both evaluator tools end to end on a tiny checkpoint written by the real CLI."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_eval_mmeb import write_mmeb
from test_eval_mrmr import write_mrmr

from lame_pl.cli import build_cli
from lame_pl.evaluation.run import main

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "tests" / "conf" / "tiny.yaml"


@pytest.fixture(scope="module")
def checkpoint(module_tmp, synthetic_shards) -> Path:
    """One optimiser step of the tiny config, saved by ModelCheckpoint as last.ckpt."""
    tmp = module_tmp("ckpt")
    shards = synthetic_shards(8, 4, 4, 8)
    argv = sys.argv
    sys.argv = ["lightning"]  # LightningCLI warns when both sys.argv and args are given
    try:
        build_cli(
            [
                "fit",
                f"--config={CONF}",
                f"--data.init_args.train_shards={shards / 'train'}",
                "--trainer.max_steps=1",
                "--trainer.limit_val_batches=0",
                "--trainer.logger=false",
                f"--trainer.default_root_dir={tmp}",  # where LightningCLI saves its config.yaml
                "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                f"--trainer.callbacks.dirpath={tmp / 'ckpt'}",
                "--trainer.callbacks.save_last=true",
                "--data.init_args.max_text_length=24",
            ]
        )
    finally:
        sys.argv = argv
    return tmp / "ckpt" / "last.ckpt"


def tool(name: str, *args: str) -> subprocess.CompletedProcess:
    """The tool as a user runs it (a fresh interpreter: ~7 s of imports, so used once)."""
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / name), *args], capture_output=True, text=True, timeout=300, cwd=ROOT
    )


def run_script(name: str, *args: str, monkeypatch) -> None:
    """The tool's file executed as ``__main__`` in this process, with its command line."""
    monkeypatch.setattr(sys, "argv", [name, *args])
    runpy.run_path(str(ROOT / "tools" / name), run_name="__main__")


def test_eval_mmeb_with_a_checkpoint_scores_every_task_and_a_rerun_only_scores(
    checkpoint, tmp_path, capsys, monkeypatch
):
    data = write_mmeb(tmp_path / "mmeb")
    args = [
        "--checkpoint",
        str(checkpoint),
        "--data-root",
        str(data),
        "--output-dir",
        str(tmp_path / "out"),
        "--batch-size",
        "3",
        "--max-text-length",
        "32",
    ]
    run_script("eval_mmeb.py", *args, monkeypatch=monkeypatch)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    tasks = {t["task"]: t for t in summary["tasks"]}
    assert set(tasks) == {"ImageNet-1K", "MSCOCO_t2i", "MSR-VTT", "ViDoRe_arxivqa"}
    assert all(0.0 <= t["main_score"] <= 1.0 and t["encoded"] > 0 for t in tasks.values())
    assert "overall" in capsys.readouterr().out
    main("mmeb", args)
    again = {t["task"]: t for t in json.loads((tmp_path / "out" / "summary.json").read_text())["tasks"]}
    assert all(t["encoded"] == 0 for t in again.values())
    assert {k: t["main_score"] for k, t in again.items()} == {k: t["main_score"] for k, t in tasks.items()}


def test_eval_mrmr_tool_with_a_checkpoint(checkpoint, tmp_path, capsys, monkeypatch):
    data = write_mrmr(tmp_path / "mrmr")
    run_script(
        "eval_mrmr.py",
        "--checkpoint",
        str(checkpoint),
        "--data-root",
        str(data),
        "--output-dir",
        str(tmp_path / "out"),
        "--tasks",
        "negation",
        "knowledge",
        monkeypatch=monkeypatch,
    )
    saved = json.loads((tmp_path / "out" / "mrmr" / "knowledge_score.json").read_text())
    assert saved["main_metric"] == "ndcg@10" and 0.0 <= saved["main_score"] <= 1.0
    out = capsys.readouterr().out
    assert "negation" in out and "recall@1" in out


def test_bad_input_exits_non_zero_with_one_line(tmp_path):
    data = write_mmeb(tmp_path / "mmeb")
    (data / "image-tasks" / "MSCOCO_t2i" / "bird.png").unlink()
    result = tool(
        "eval_mmeb.py", "--checkpoint", "missing.ckpt", "--data-root", str(data), "--output-dir", str(tmp_path / "out")
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("error: task MSCOCO_t2i: ")
    assert "tgt_img_path 'MSCOCO_t2i/bird.png' does not exist" in result.stderr
    # With the data fixed, the missing checkpoint is the next thing named.
    (data / "image-tasks" / "MSCOCO_t2i" / "bird.png").write_bytes(
        (data / "image-tasks" / "MSCOCO_t2i" / "cat.png").read_bytes()
    )
    with pytest.raises(SystemExit, match="error: missing checkpoint file missing.ckpt"):
        main("mmeb", ["--checkpoint", "missing.ckpt", "--data-root", str(data), "--output-dir", str(tmp_path / "out")])


def test_checkpoint_encoder_batches_agree_with_one_at_a_time(checkpoint, tmp_path):
    from eval_fakes import word_png

    from lame_pl.evaluation.encode import CheckpointEncoder
    from lame_pl.evaluation.task import Item

    image = tmp_path / "cat.png"
    word_png("cat", image)
    dog = tmp_path / "dog.png"
    word_png("dog", dog)
    items = [
        Item("Represent the image:", "", (str(image),)),
        Item("", "a much longer caption with many more words"),
        Item("Find the document:", "short", (word_png("dog"),)),
        Item("", "two frames", (str(image), str(image))),
        Item("", "two frames", video=(str(image), str(dog))),
    ]
    one = CheckpointEncoder(checkpoint, batch_size=1).encode(items)
    batched = CheckpointEncoder(checkpoint, batch_size=5).encode(items)
    assert one.shape == (5, batched.shape[1])
    assert torch.allclose(one.norm(dim=-1), torch.ones(5), atol=1e-5)
    # Left padding and mixed image/video/text rows in one batch do not change an embedding.
    assert torch.allclose(one, batched, atol=1e-4)
    assert not torch.allclose(one[0], one[3], atol=1e-3)  # one image vs two frames of it differ
    assert not torch.allclose(one[3], one[4], atol=1e-3)  # frames as images vs frames as a video differ


def test_training_collator_and_evaluator_build_identical_inputs(checkpoint, tmp_path):
    """The same record through InstructionCollator (training) and CheckpointEncoder (evaluation)."""
    import io
    import random

    from conftest import random_image
    from PIL import Image

    from lame_pl.backbone import build_processor
    from lame_pl.datamodules.collate import InstructionCollator
    from lame_pl.evaluation.encode import CheckpointEncoder
    from lame_pl.evaluation.task import Item

    rng = random.Random(0)
    paths = {}
    for name, side in (("query.png", 56), ("negative.png", 40), *((f"frame_{i}.png", 28) for i in range(4))):
        paths[name] = str(tmp_path / name)
        random_image(rng, side).save(paths[name])

    def decoded(name: str) -> Image.Image:  # as DecodeInstructionPairs opens a shard member
        return Image.open(io.BytesIO((tmp_path / name).read_bytes())).convert("RGB")

    frames = [f"frame_{i}.png" for i in range(4)]
    long_text = "what is the colour of the large shape in the middle of this picture, and why"
    samples = [
        {
            "key": "a",
            "query": {
                "instruction": "Answer the question about the image:",
                "text": long_text,
                "images": [decoded("query.png")],
                "video": None,
            },
            "target": {"instruction": "Represent the answer:", "text": "blue", "images": [], "video": None},
            "negatives": [
                {"instruction": "", "text": "red", "images": [], "video": None},
                {"instruction": "Represent the image:", "text": "", "images": [decoded("negative.png")], "video": None},
            ],
        },
        {
            "key": "b",
            "query": {"instruction": "", "text": "a cat jumps", "images": [], "video": None},
            "target": {
                "instruction": "Understand the content of the provided video.",
                "text": "",
                "images": [],
                "video": [decoded(f) for f in frames],
            },
            "negatives": [],
        },
    ]
    # What the evaluator reads for the same records: each instruction as the collator resolves it.
    queries = [
        Item("Answer the question about the image:", long_text, (paths["query.png"],)),
        Item("Find the video:", "a cat jumps"),
    ]
    targets = [
        Item("Represent the answer:", "blue"),
        Item("Understand the content of the provided video.", "", video=tuple(paths[f] for f in frames)),
    ]
    negatives = [Item("Represent the answer:", "red"), Item("Represent the image:", "", (paths["negative.png"],))]

    encoder = CheckpointEncoder(checkpoint, max_text_length=8)
    collate = InstructionCollator(
        build_processor(encoder.embedder.backbone_spec),
        query_instruction="Find the video:",
        target_instruction="unused",
        max_text_length=8,
    )
    batch = collate(samples)
    for side, items in (("query", queries), ("target", targets), ("negative", negatives)):
        expected = encoder.inputs(items)
        assert set(batch[side]) == set(expected), side
        for key, value in expected.items():
            assert torch.equal(batch[side][key], value), (side, key)
    assert "pixel_values_videos" in batch["target"] and "pixel_values" in batch["query"]
    query = collate.tokenizer.decode(batch["query"]["input_ids"][0])
    assert "<|vision_end|>\nAnswer the question about the image: what is the" in query  # a space, not run together
    assert "and why" not in query  # the text was cut to 8 tokens, on both sides alike


def test_texts_are_cut_as_the_training_run_cut_them_unless_told_otherwise(checkpoint, capsys):
    """The checkpoint was trained with data.max_text_length 24: the evaluator cuts there too."""
    from lame_pl.evaluation.encode import FALLBACK_MAX_TEXT_LENGTH, CheckpointEncoder

    assert CheckpointEncoder(checkpoint).max_text_length == 24 != FALLBACK_MAX_TEXT_LENGTH
    assert "max_text_length: 24 (the training run's data.max_text_length)" in capsys.readouterr().out
    assert CheckpointEncoder(checkpoint, max_text_length=7).max_text_length == 7

"""README's "Train on your own image-caption folder": the recipe block, its overlay, and a full run of it.

The full run (slow) executes the README's block as written, in a scratch folder that links
``configs/`` and ``tools/`` from the repository, on 50 images this test writes. What it changes,
and nothing else:

- ``PHOTOS=~/photos`` becomes the scratch image folder;
- ``.venv/bin/`` becomes a scratch ``bin/`` whose ``python`` is this interpreter and whose
  ``lightning`` runs this interpreter's ``lightning`` with ``FAST`` appended: a few steps of the
  tiny test backbone instead of the demo's 100 + 600 steps.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import CAPTIONS, random_image
from lightning import Trainer
from lightning.pytorch.loggers import TensorBoardLogger

from lame_pl.callbacks import MetricsFile
from lame_pl.cli import build_cli

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
OVERLAY = ROOT / "configs" / "examples" / "own_folder.yaml"
NUM_IMAGES = 50
# Appended to every `lightning` command of the recipe. Steps: every_n_train_steps of the demo's
# checkpoint callback is 100, so a stage needs 100 steps to leave last.ckpt; tiny batches of
# 28 px images on the tiny backbone make them cheap. Validation only at the end of stage 1.
FAST = [
    "--model.init_args.backbone.preset=tiny",
    "--model.init_args.decoder.preset=tiny",
    "--model.init_args.backbone.min_pixels=784",
    "--model.init_args.backbone.max_pixels=784",
    "--model.init_args.num_reason_tokens=2",
    "--data.init_args.batch_size=2",
    "--data.init_args.num_workers=0",
    "--trainer.max_steps=100",
    "--trainer.limit_val_batches=1",
    "--trainer.enable_progress_bar=false",
]


def recipe_block() -> str:
    """The commands between ``<!-- recipe: own-folder -->`` and ``<!-- /recipe -->`` in README.md."""
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- recipe: own-folder -->\n```bash\n(.*?)```\n<!-- /recipe -->", text, re.S)
    assert match, "README.md has no ```bash block between <!-- recipe: own-folder --> and <!-- /recipe -->"
    return match.group(1)


def expected_split(stem: str, val: float, test: float) -> str:
    """The split rule README states: SHA-1 of the path without extension as a number in [0, 1)."""
    u = int(hashlib.sha1(stem.encode()).hexdigest()[:16], 16) / 16**16
    return "test" if u < test else "val" if u < test + val else "train"


def test_recipe_block_names_files_that_exist_and_is_self_contained():
    block = recipe_block()
    for path in re.findall(r"(?:configs|tools)/[\w./-]+\.(?:yaml|py)", block):
        assert (ROOT / path).is_file(), f"the README recipe names {path}, which does not exist"
    commands = [line for line in block.splitlines() if line.startswith(".venv/bin/")]
    assert [c.split()[0:2] for c in commands] == [
        [".venv/bin/python", "tools/make_shards.py"],
        [".venv/bin/python", "tools/decoder_vocab.py"],
        [".venv/bin/lightning", "fit"],
        [".venv/bin/lightning", "fit"],
        [".venv/bin/lightning", "test"],
        [".venv/bin/python", "tools/show_metrics.py"],
    ]
    assert "tensorboard" not in block  # it serves until stopped: kept outside the block the test runs


def test_overlay_moves_data_vocabulary_runs_and_metrics(capsys, monkeypatch):
    """The stage-2 command of the recipe, parsed: nothing of the demo's paths is left."""
    monkeypatch.setattr(sys, "argv", ["lightning"])
    demo = ROOT / "configs" / "demo"
    with pytest.raises(SystemExit) as exc:
        build_cli(
            [
                "fit",
                f"--config={demo / 'base.yaml'}",
                f"--config={demo / 'stage2.yaml'}",
                f"--config={OVERLAY}",
                "--model.init_args.init_from=runs/own/stage1/checkpoints/last.ckpt",
                "--print_config",
            ]
        )
    assert exc.value.code in (0, None)
    printed = capsys.readouterr().out
    config = yaml.safe_load(printed)
    assert {"save_dir": "runs/own", "version": "stage2"}.items() <= config["trainer"]["logger"]["init_args"].items()
    assert config["trainer"]["val_check_interval"] == 100 and config["trainer"]["check_val_every_n_epoch"] is None
    data = config["data"]["init_args"]
    assert [data[f"{s}_shards"] for s in ("train", "val", "test")] == [
        "data/own/train",
        "data/own/val",
        "data/own/test",
    ]
    model = config["model"]["init_args"]
    assert model["decoder"]["vocab_file"] == "data/own/decoder_vocab.json"
    assert model["init_from"] == "runs/own/stage1/checkpoints/last.ckpt"
    # Every callback of the demo is kept (callback lists are replaced wholesale, so the overlay has none) ...
    names = [c["class_path"] for c in config["trainer"]["callbacks"]]
    assert "callbacks.MetricsFile" in names and "callbacks.AtomicCheckpoint" in names
    # ... and MetricsFile follows the logger: a path of its own would put test_metrics.json in runs/demo.
    metrics = config["trainer"]["callbacks"][names.index("callbacks.MetricsFile")].get("init_args") or {}
    assert metrics.get("path") is None, "configs/demo/base.yaml gives MetricsFile a path: it ignores the overlay"
    assert "runs/demo" not in printed


def test_metrics_file_defaults_to_the_logger_save_dir(tmp_path):
    with_logger = Trainer(
        logger=TensorBoardLogger(tmp_path / "runs", name="", version="x"),
        default_root_dir=tmp_path,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    assert MetricsFile().resolve_path(with_logger) == tmp_path / "runs" / "test_metrics.json"
    without = Trainer(logger=False, default_root_dir=tmp_path / "root", enable_checkpointing=False)
    assert MetricsFile().resolve_path(without) == tmp_path / "root" / "test_metrics.json"
    assert MetricsFile(str(tmp_path / "m.json")).resolve_path(with_logger) == tmp_path / "m.json"


def _write_folder(src: Path) -> dict[str, str]:
    """50 random 56 px images with captions, some in a subfolder; returns {path without extension: caption}."""
    rng = random.Random(0)
    captions = {}
    for i in range(NUM_IMAGES):
        stem = f"{'trip/' if i % 3 == 0 else ''}photo{i:02d}"
        (src / stem).parent.mkdir(parents=True, exist_ok=True)
        random_image(rng).save(src / f"{stem}.png")
        captions[stem] = f"{CAPTIONS[i % len(CAPTIONS)]}, photo {i}"
        (src / f"{stem}.txt").write_text(captions[stem] + "\n")
    return captions


@pytest.mark.slow
def test_readme_recipe_runs_on_a_folder_of_50_images(tmp_path):
    work, src, bin_dir = tmp_path / "work", tmp_path / "photos", tmp_path / "bin"
    for folder in (work, src, bin_dir):
        folder.mkdir()
    for name in ("configs", "tools"):
        (work / name).symlink_to(ROOT / name)
    captions = _write_folder(src)
    # Scripts, not links: a virtual environment is found from the path the interpreter was started by.
    for name, command in (
        ("python", f'{shlex.quote(sys.executable)} "$@"'),
        ("lightning", f'{shlex.quote(str(BIN / "lightning"))} "$@" {shlex.join(FAST)}'),
    ):
        (bin_dir / name).write_text(f"#!/bin/sh\nexec {command}\n")
        (bin_dir / name).chmod(0o755)

    block = recipe_block()
    assert block.count("PHOTOS=~/photos") == 1 and ".venv/bin/" in block
    script = block.replace("PHOTOS=~/photos", f"PHOTOS={shlex.quote(str(src))}").replace(".venv/bin/", f"{bin_dir}/")
    start = time.perf_counter()
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], cwd=work, capture_output=True, text=True, timeout=600
    )
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]

    # Three splits with manifests, by the stated rule, summing to the folder.
    fractions = [float(x) for x in re.search(r"--val-fraction (\S+) --test-fraction (\S+)", block).groups()]
    expected = {
        split: sum(expected_split(stem, *fractions) == split for stem in captions) for split in ("train", "val", "test")
    }
    counts = {
        split: json.loads((work / "data" / "own" / split / "manifest.json").read_text())["num_samples"]
        for split in ("train", "val", "test")
    }
    assert counts == expected and sum(counts.values()) == NUM_IMAGES and min(counts.values()) > 0
    assert json.loads((work / "data" / "own" / "decoder_vocab.json").read_text())
    for stage in ("stage1", "stage2"):
        assert (work / "runs" / "own" / stage / "checkpoints" / "last.ckpt").is_file()
    metrics = json.loads((work / "runs" / "own" / "test_metrics.json").read_text())
    assert {"test/recall@1", "test/recall@5", "test/mrr", "chance/recall@1"} <= set(metrics)
    assert metrics["test/num_candidates"] == counts["test"]
    assert "test/recall@1" in result.stdout  # show_metrics printed the table
    print(f"recipe ran in {elapsed:.0f}s")

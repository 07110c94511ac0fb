"""Two processes on the CPU (gloo): the gathered contrastive loss trains, and test ranks the whole split."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "tests" / "conf" / "tiny.yaml"
LIGHTNING = Path(sys.executable).with_name("lightning")


def test_two_process_fit_and_test(tmp_path):
    shards = tmp_path / "shards"
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "make_shards.py"), "synthetic", "--out", str(shards),
         "--train", "32", "--val", "10", "--test", "10", "--image-size", "56", "--samples-per-shard", "5"],
        check=True, capture_output=True,
    )
    common = [
        f"--config={CONF}", *[f"--data.init_args.{s}_shards={shards / s}" for s in ("train", "val", "test")],
        "--trainer.devices=2", "--trainer.strategy=ddp", "--model.init_args.stage=2",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    fit = subprocess.run([str(LIGHTNING), "fit", *common, "--trainer.max_steps=2", "--trainer.limit_val_batches=0"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert fit.returncode == 0, fit.stderr[-3000:]
    out = tmp_path / "metrics.json"
    test = subprocess.run(
        [str(LIGHTNING), "test", *common, "--trainer.callbacks+=callbacks.MetricsFile", f"--trainer.callbacks.path={out}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert test.returncode == 0, test.stderr[-3000:]
    metrics = json.loads(out.read_text())
    # Each rank read one of the two test shards; the ranking saw all ten captions.
    assert metrics["test/num_candidates"] == 10
    assert abs(metrics["chance/recall@1"] - 0.1) < 1e-6


def test_two_process_fit_on_instruction_pairs_with_uneven_hard_negatives(tmp_path):
    """Ranks draw batches with different numbers of hard negatives (or none); the gather copes."""
    import random

    from PIL import Image
    from test_pairs import ROWS, SIDES

    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(0)
    for name, side in SIDES.items():
        Image.frombytes("RGB", (side, side), bytes(rng.getrandbits(8) for _ in range(side * side * 3))).save(src / name)
    (src / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS * 2))
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_shards.py"), "manifest", "--manifest",
                    str(src / "pairs.jsonl"), "--out", str(tmp_path / "pairs"), "--samples-per-shard", "3"],
                   check=True, capture_output=True)
    fit = subprocess.run(
        [str(LIGHTNING), "fit", f"--config={CONF}", "--data=datamodules.InstructionPairDataModule",
         f"--data.init_args.train_shards={tmp_path / 'pairs' / 'train'}", "--data.init_args.batch_size=2",
         "--data.init_args.num_workers=0", "--trainer.devices=2", "--trainer.strategy=ddp",
         "--model.init_args.stage=2", "--trainer.max_steps=3", "--trainer.limit_val_batches=0",
         f"--trainer.default_root_dir={tmp_path}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert fit.returncode == 0, fit.stderr[-3000:]

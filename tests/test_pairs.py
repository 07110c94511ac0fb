"""Instruction pairs: written by tools/make_shards.py manifest, read back by InstructionPairDataModule."""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from lame_pl import LaMEModule
from lame_pl.backbone import BackboneSpec, DecoderSpec
from lame_pl.data.skips import SKIP_REASONS, BadSampleError
from lame_pl.datamodules import InstructionPairDataModule

ROOT = Path(__file__).resolve().parents[1]
SPEC = BackboneSpec(preset="tiny", min_pixels=56 * 56, max_pixels=56 * 56)
# Each side text-only, image-only or both; some rows with hard negatives of each kind.
ROWS = [
    {
        "query_instruction": "Find the caption.",
        "query_image": "a.png",
        "target_text": "a red square",
        "negatives": ["a blue circle", {"image": "b.png"}],
    },
    {"query_instruction": "Find the picture.", "query_text": "a green triangle", "target_image": "c.png"},
    {
        "query_text": "what is shown",
        "query_image": "b.png",
        "target_text": "a yellow dot",
        "target_image": "d.png",
        "negatives": [{"text": "a grey line", "image": "a.png"}],
    },
    {"query_instruction": "Answer.", "query_text": "two plus two", "target_text": "four"},
    {"query_image": "c.png", "target_image": "a.png", "negatives": [{"text": "nothing"}]},
    {"query_instruction": "Match.", "query_text": "a dark room", "query_image": "d.png", "target_text": "night"},
]
SIDES = {"a.png": 32, "b.png": 40, "c.png": 48, "d.png": 56}


def _images(row: dict, side: str) -> int:
    return int(row.get(f"{side}_image") is not None)


def _negatives(row: dict) -> list[dict]:
    return [{"text": n} if isinstance(n, str) else n for n in row.get("negatives", [])]


def write_pair_shards(src: Path, out: Path, rows: list[dict], samples_per_shard: int, split: str = "train") -> Path:
    """``rows`` (``ROWS``-shaped, images from ``SIDES`` written to ``src``) as instruction-pair shards of ``split``."""
    src.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for name, side in SIDES.items():
        Image.frombytes("RGB", (side, side), bytes(rng.getrandbits(8) for _ in range(side * side * 3))).save(src / name)
    (src / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    manifest = ["manifest", "--manifest", str(src / "pairs.jsonl"), "--out", str(out), "--split-name", split]
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "make_shards.py"),
            *manifest,
            "--samples-per-shard",
            str(samples_per_shard),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return out / split


@pytest.fixture(scope="module")
def pairs_dir(module_tmp) -> Path:
    return write_pair_shards(module_tmp("pairs_src"), module_tmp("pairs"), ROWS, 4, split="val")


def _datamodule(shards: str | list[str], **kwargs) -> InstructionPairDataModule:
    return InstructionPairDataModule(SPEC, val_shards=shards, batch_size=4, num_workers=0, **kwargs)


def _check_side(side: dict, rows: list[dict], images: int) -> None:
    assert side["input_ids"].shape == side["attention_mask"].shape == side["mm_token_type_ids"].shape
    assert side["input_ids"].shape[0] == len(rows)
    # Left padding: every sequence ends at the last position.
    assert side["attention_mask"][:, -1].all()
    if images:
        assert side["image_grid_thw"].shape == (images, 3)
        patches = int(side["image_grid_thw"].prod(dim=1).sum())
        assert side["pixel_values"].shape[0] == patches
    else:
        assert "pixel_values" not in side and "image_grid_thw" not in side


def test_round_trip_every_sample_once(pairs_dir: Path) -> None:
    batches = list(_datamodule(str(pairs_dir)).val_dataloader())
    keys = [k for b in batches for k in b["keys"]]
    assert keys == [f"{i:09d}" for i in range(len(ROWS))]
    for batch in batches:
        rows = [ROWS[int(k)] for k in batch["keys"]]
        _check_side(batch["query"], rows, sum(_images(r, "query") for r in rows))
        _check_side(batch["target"], rows, sum(_images(r, "target") for r in rows))
        negatives = [n for r in rows for n in _negatives(r)]
        if negatives:
            _check_side(batch["negative"], negatives, sum(n.get("image") is not None for n in negatives))
        else:
            assert "negative" not in batch
        assert batch["texts"] == [r.get("target_text", "") for r in rows]
        assert batch["decoder"]["input_ids"].shape[0] == len(rows)
        assert batch["skipped"] == {}
    # An image-only target teaches the decoder only where to stop.
    first = batches[0]
    image_only = first["keys"].index("000000001")
    assert int(first["decoder"]["attention_mask"][image_only].sum()) == 1


def _with_bad_json(pairs_dir: Path, tmp_path: Path) -> tuple[Path, str]:
    """A copy of the first shard whose second sample's JSON is cut short."""
    shard = tmp_path / "bad.tar"
    with tarfile.open(pairs_dir / "shard-000000.tar") as src, tarfile.open(shard, "w") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read()
            if member.name == "000000001.json":
                data = data[: len(data) // 2]
                member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
    return shard, "000000001"


def test_bad_json_skipped_and_counted(pairs_dir: Path, tmp_path: Path) -> None:
    assert "bad_json" in SKIP_REASONS
    shard, bad = _with_bad_json(pairs_dir, tmp_path)
    batches = list(_datamodule([str(shard), str(pairs_dir / "shard-000001.tar")]).val_dataloader())
    keys = [k for b in batches for k in b["keys"]]
    assert keys == [f"{i:09d}" for i in range(len(ROWS)) if f"{i:09d}" != bad]
    skipped: dict[str, int] = {}
    for b in batches:
        for reason, n in b["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    assert skipped == {"bad_json": 1}
    with pytest.raises(BadSampleError, match="bad_json") as exc:
        list(_datamodule(str(shard), strict=True).val_dataloader())
    assert str(shard) in str(exc.value) and bad in str(exc.value)


def test_missing_image_member_skipped(pairs_dir: Path, tmp_path: Path) -> None:
    shard = tmp_path / "missing.tar"
    with tarfile.open(pairs_dir / "shard-000000.tar") as src, tarfile.open(shard, "w") as dst:
        for member in src.getmembers():
            if member.name != "000000002.target.png":
                dst.addfile(member, src.extractfile(member))
    batches = list(_datamodule(str(shard)).val_dataloader())
    assert [k for b in batches for k in b["keys"]] == ["000000000", "000000001", "000000003"]
    assert sum(b["skipped"].get("missing_image", 0) for b in batches) == 1


def test_training_step_with_negatives(pairs_dir: Path) -> None:
    torch.manual_seed(0)
    batch = next(iter(_datamodule(str(pairs_dir)).val_dataloader()))
    assert "negative" in batch
    module = LaMEModule(SPEC, DecoderSpec(preset="tiny"), num_reason_tokens=2, stage=2)
    loss, terms, _ = module.model_step(batch, "train")
    assert "contrastive" in terms and torch.isfinite(loss)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())

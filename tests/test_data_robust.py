"""Bad input in the shards: skipped and counted by reason (or, with strict, a clear error); good samples all arrive."""

from __future__ import annotations

import io
import logging
import random
import struct
import subprocess
import tarfile
import zlib
from collections import Counter
from pathlib import Path

import pytest
import webdataset as wds
from lightning import Trainer
from PIL import Image

from lame_pl import LaMEModule
from lame_pl.backbone import BackboneSpec, DecoderSpec
from lame_pl.callbacks import DataHealth
from lame_pl.data.skips import BadSampleError
from lame_pl.datamodules import ImageTextDataModule

SPEC = BackboneSpec(preset="tiny", min_pixels=56 * 56, max_pixels=56 * 56)


def png(seed: int = 0, side: int = 56) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (side, side), (seed * 37 % 256, seed * 91 % 256, 80)).save(out, format="PNG")
    return out.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width x height`` in its header and holds no pixel data at all."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


def good(key: str, seed: int = 0) -> dict:
    return {"__key__": key, "png": png(seed), "txt": f"caption of {key}", "json": b"{}"}


def write(path: Path, samples: list[dict]) -> Path:
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)
    return path


def datamodule(val, **kwargs) -> ImageTextDataModule:
    return ImageTextDataModule(SPEC, val_shards=val, **{"eval_batch_size": 3, "num_workers": 0, **kwargs})


def read_all(loader) -> tuple[list[str], Counter, list[dict]]:
    """(keys in order, summed skip counts, the batches)."""
    batches = list(loader)
    skipped: Counter = Counter()
    for batch in batches:
        skipped.update(batch["skipped"])
    return [k for b in batches for k in b["keys"]], skipped, batches


def member_offsets(path: Path) -> dict[str, tuple[int, int]]:
    """``name -> (header offset, data offset)`` of every member."""
    with tarfile.open(path) as tar:
        return {m.name: (m.offset, m.offset_data) for m in tar.getmembers()}


def damage_headers(path: Path, *names: str) -> None:
    """Overwrite all header blocks of members ``names`` (TarWriter writes a pax header first) with noise."""
    offsets = member_offsets(path)
    data = bytearray(path.read_bytes())
    for name in names:
        start, end = offsets[name]
        data[start:end] = random.Random(start).randbytes(end - start)
    path.write_bytes(bytes(data))


# --- each kind of bad sample -------------------------------------------------------------------


def test_bad_samples_skipped_by_reason_and_every_good_one_arrives_in_order(tmp_path: Path) -> None:
    truncated = png(9)[:-40]
    samples = [
        good("a0"),
        {"__key__": "b1", "png": b"this is no image at all", "txt": "x"},
        good("a2", 2),
        {"__key__": "b3", "png": png(3), "txt": "  \n\t "},
        {"__key__": "b4", "png": png(4), "json": b"{}"},  # no caption member
        {"__key__": "b5", "txt": "a caption without an image", "json": b"{}"},
        {"__key__": "b6", "png": png_header_only(9000, 8000), "txt": "72 megapixels"},
        {"__key__": "b7", "png": png_header_only(60000, 60000), "txt": "a decompression bomb"},
        {"__key__": "b8", "png": truncated, "txt": "cut off"},
        good("a9", 9),
        {"__key__": "b10", "png": png(10, side=80), "txt": "above the test's max_image_pixels"},
        # The processor would expect an image for this token and fail the whole batch.
        {"__key__": "b12", "png": png(12), "txt": "a caption with <|image_pad|> inside"},
        good("a11", 11),
    ]
    write(tmp_path / "shard-000000.tar", samples)
    write(tmp_path / "shard-000001.tar", [good("c0"), good("c1", 1)])
    dm = datamodule(str(tmp_path), max_image_pixels=70 * 70)
    keys, skipped, batches = read_all(dm.val_dataloader())
    assert keys == ["a0", "a2", "a9", "a11", "c0", "c1"]
    assert skipped == {"bad_image": 2, "empty_caption": 2, "missing_image": 1, "image_too_large": 3, "vision_token": 1}
    assert all(isinstance(b["skipped"], dict) for b in batches)
    assert batches[-1]["skipped"] == {}  # counts go with the batch they were met in, not later
    assert [t for b in batches for t in b["texts"]][:2] == ["caption of a0", "caption of a2"]


def test_image_size_is_judged_from_the_header_before_decoding(tmp_path: Path) -> None:
    # A header of 72 megapixels with no pixel data: decoding it would fail as bad_image.
    write(tmp_path / "s.tar", [good("a0"), {"__key__": "big", "png": png_header_only(9000, 8000), "txt": "x"}])
    _, skipped, _ = read_all(datamodule(str(tmp_path / "s.tar")).val_dataloader())
    assert skipped == {"image_too_large": 1}
    _, skipped, _ = read_all(datamodule(str(tmp_path / "s.tar"), max_image_pixels=10**8).val_dataloader())
    assert skipped == {"bad_image": 1}


def test_truncated_shard_keeps_what_came_before_it(tmp_path: Path) -> None:
    shard = write(tmp_path / "shard-000000.tar", [good(f"a{i}", i) for i in range(5)])
    write(tmp_path / "shard-000001.tar", [good("c0"), good("c1", 1)])
    start = member_offsets(shard)["a3.png"][1]
    shard.write_bytes(shard.read_bytes()[: start + 100])  # ends inside a3's image
    keys, skipped, _ = read_all(datamodule(str(tmp_path)).val_dataloader())
    assert keys == ["a0", "a1", "a2", "c0", "c1"]
    assert skipped == {"corrupt_tar": 1}


def test_damaged_member_header_loses_only_its_sample(tmp_path: Path) -> None:
    shard = write(tmp_path / "shard-000000.tar", [good(f"a{i}", i) for i in range(6)])
    damage_headers(shard, "a2.png")
    keys, skipped, _ = read_all(datamodule(str(shard)).val_dataloader())
    assert keys == ["a0", "a1", "a3", "a4", "a5"]
    assert skipped == {"corrupt_tar": 1}


def test_a_whole_sample_passed_over_is_still_counted(tmp_path: Path) -> None:
    shard = write(tmp_path / "shard-000000.tar", [good(f"a{i}", i) for i in range(4)])
    damage_headers(shard, "a2.json", "a2.png", "a2.txt")
    keys, skipped, _ = read_all(datamodule(str(shard)).val_dataloader())
    assert keys == ["a0", "a1", "a3"]
    assert skipped == {"corrupt_tar": 1}


def test_garbage_and_vanished_shards_are_corrupt_tar(tmp_path: Path) -> None:
    write(tmp_path / "shard-000000.tar", [good("a0"), good("a1", 1)])
    (tmp_path / "shard-000001.tar").write_bytes(random.Random(0).randbytes(5000))
    write(tmp_path / "shard-000002.tar", [good("c0")])
    write(tmp_path / "shard-000003.tar", [good("d0")])
    dm = datamodule(str(tmp_path))
    (tmp_path / "shard-000003.tar").unlink()  # gone between setup and reading
    keys, skipped, _ = read_all(dm.val_dataloader())
    assert keys == ["a0", "a1", "c0"]
    assert skipped == {"corrupt_tar": 2}


def test_skips_after_the_last_good_sample_ride_on_the_last_batch(tmp_path: Path) -> None:
    write(tmp_path / "shard-000000.tar", [good(f"a{i}", i) for i in range(3)])  # exactly one batch
    write(tmp_path / "shard-000001.tar", [{"__key__": f"b{i}", "png": png(i), "txt": " "} for i in range(4)])
    keys, skipped, batches = read_all(datamodule(str(tmp_path)).val_dataloader())
    assert keys == ["a0", "a1", "a2"] and len(batches) == 1
    assert batches[0]["skipped"] == {"empty_caption": 4}


# --- strict --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sample", "reason"),
    [
        ({"png": b"not an image", "txt": "x"}, "bad_image"),
        ({"png": png(1), "txt": ""}, "empty_caption"),
        ({"txt": "no image"}, "missing_image"),
        ({"png": png_header_only(9000, 8000), "txt": "x"}, "image_too_large"),
    ],
)
def test_strict_names_shard_key_and_reason(tmp_path: Path, sample: dict, reason: str) -> None:
    shard = write(tmp_path / "shard-000000.tar", [good("a0"), {"__key__": "the_bad_one", **sample}, good("a2")])
    with pytest.raises(BadSampleError) as exc:
        list(datamodule(str(shard), strict=True).val_dataloader())
    message = str(exc.value)
    assert str(shard) in message and "'the_bad_one'" in message and reason in message


def test_strict_corrupt_tar_names_shard_and_reason(tmp_path: Path) -> None:
    shard = write(tmp_path / "shard-000000.tar", [good(f"a{i}", i) for i in range(3)])
    damage_headers(shard, "a1.png")
    with pytest.raises(BadSampleError, match="corrupt_tar") as exc:
        list(datamodule(str(shard), strict=True).val_dataloader())
    assert str(shard) in str(exc.value) and "'a1'" in str(exc.value)


# --- GNU tar -------------------------------------------------------------------------------------


def test_gnu_tar_from_loose_files_reads_like_our_shards(tmp_path: Path) -> None:
    folder = tmp_path / "loose"
    folder.mkdir()
    ours = []
    for i in range(5):
        key = f"{i:06d}"
        (folder / f"{key}.png").write_bytes(png(i))
        (folder / f"{key}.txt").write_text(f"caption number {i}\n")  # editors end files with a newline
        ours.append({"__key__": key, "png": png(i), "txt": f"caption number {i}"})
    write(tmp_path / "ours.tar", ours)
    names = sorted(p.name for p in folder.iterdir())
    subprocess.run(["tar", "-cf", str(tmp_path / "listed.tar"), "-C", str(folder), *names], check=True)
    subprocess.run(["tar", "--sort=name", "-cf", str(tmp_path / "dot.tar"), "-C", str(folder), "."], check=True)

    def read(name: str) -> list[dict]:
        return list(datamodule(str(tmp_path / name)).val_dataloader())

    reference = read("ours.tar")
    for name in ("listed.tar", "dot.tar"):
        batches = read(name)
        assert [b["keys"] for b in batches] == [b["keys"] for b in reference], name
        assert [b["texts"] for b in batches] == [b["texts"] for b in reference], name
        for b, r in zip(batches, reference, strict=True):
            assert b["skipped"] == {}
            assert (b["query"]["pixel_values"] == r["query"]["pixel_values"]).all()


# --- across processes, and in training ---------------------------------------------------------


def _shards_with_bad_samples(folder: Path, n_shards: int, per_shard: int = 4) -> list[str]:
    """Shards that each start with one bad image and one empty caption, then good samples."""
    folder.mkdir(exist_ok=True)
    keys = []
    for s in range(n_shards):
        samples = [
            {"__key__": f"s{s}_bad", "png": b"broken", "txt": "x"},
            {"__key__": f"s{s}_empty", "png": png(1), "txt": ""},
        ]
        samples += [good(f"s{s}_{i}", i) for i in range(per_shard)]
        keys += [f"s{s}_{i}" for i in range(per_shard)]
        write(folder / f"shard-{s:06d}.tar", samples)
    return keys


def test_counts_cross_worker_processes(tmp_path: Path) -> None:
    keys = _shards_with_bad_samples(tmp_path / "val", 4)
    dm = datamodule(str(tmp_path / "val"), num_workers=2)
    seen, skipped, _ = read_all(dm.val_dataloader())
    assert sorted(seen) == sorted(keys)
    assert skipped == {"bad_image": 4, "empty_caption": 4}

    dm = ImageTextDataModule(
        SPEC, train_shards=str(tmp_path / "val"), samples_per_epoch=16, batch_size=4, num_workers=2, shuffle_buffer=1
    )
    batches = list(dm.train_dataloader())
    assert len(batches) == 4 and all(len(b["keys"]) == 4 for b in batches)
    skipped = Counter()
    for b in batches:
        skipped.update(b["skipped"])
    # Each worker reads whole shards of 2 bad + 4 good samples, so 2 batches of 4 pass 2 or 3 shard starts.
    assert skipped["bad_image"] >= 2 and skipped["empty_caption"] >= 2
    assert set(skipped) == {"bad_image", "empty_caption"}


def test_data_health_logs_skips_during_fit(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _shards_with_bad_samples(tmp_path / "train", 2)
    _shards_with_bad_samples(tmp_path / "val", 1)
    dm = ImageTextDataModule(
        SPEC,
        train_shards=str(tmp_path / "train"),
        val_shards=str(tmp_path / "val"),
        samples_per_epoch=8,
        batch_size=2,
        num_workers=0,
        shuffle_buffer=1,
    )
    module = LaMEModule(SPEC, DecoderSpec(preset="tiny"), num_reason_tokens=2)
    health = DataHealth()
    trainer = Trainer(
        accelerator="cpu",
        fast_dev_run=True,
        callbacks=[health],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with caplog.at_level(logging.INFO):
        trainer.fit(module, datamodule=dm)
    metrics = trainer.callback_metrics
    # Every shard starts with its two bad samples, and shuffle_buffer=1 keeps that order.
    assert float(metrics["data/skipped/bad_image"]) == 1.0
    assert float(metrics["data/skipped/empty_caption"]) == 1.0
    assert float(metrics["val/data/skipped/bad_image"]) == 1.0
    assert float(metrics["val/data/skipped/empty_caption"]) == 1.0
    assert health.train_total == {"bad_image": 1, "empty_caption": 1}
    assert health.state_dict() == {"train": {"bad_image": 1, "empty_caption": 1}}
    lines = [r.getMessage() for r in caplog.records]
    assert "train epoch 0: skipped 2 samples (2 in all): bad_image 1, empty_caption 1" in lines
    assert "val epoch 0: skipped 2 samples: bad_image 1, empty_caption 1" in lines

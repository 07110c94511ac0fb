"""The data pipeline: synthetic shard writer, collator and WebDataset datamodule."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from conftest import load_tool

from lame_pl.backbone import BackboneSpec
from lame_pl.datamodules import ImageTextDataModule, PairCollator
from lame_pl.synthetic import scenes

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"
SIZES = {"train": 64, "val": 20, "test": 20}
PER_SHARD = 8
SPEC = BackboneSpec(preset="tiny", min_pixels=56 * 56, max_pixels=56 * 56)


def _tools():
    """tools/make_shards.py as a module, and the synthetic scenes it draws."""
    return load_tool("make_shards"), scenes


@pytest.fixture(scope="module")
def data_dir(module_tmp) -> Path:
    out = module_tmp("shards")
    cmd = [
        sys.executable,
        str(TOOLS / "make_shards.py"),
        "synthetic",
        "--out",
        str(out),
        "--overwrite",
        "--image-size",
        "56",
        "--samples-per-shard",
        str(PER_SHARD),
        "--seed",
        "3",
    ]
    for split, n in SIZES.items():
        cmd += [f"--{split}", str(n)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out


def _read_split(split_dir: Path) -> list[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) for every sample, in shard and file order."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(split_dir.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return list(samples.items())


def _datamodule(data_dir: Path, **kwargs) -> ImageTextDataModule:
    defaults = dict(
        train_shards=str(data_dir / "train"),
        val_shards=str(data_dir / "val"),
        test_shards=str(data_dir / "test" / "shard-*.tar"),
        batch_size=8,
        num_workers=0,
        shuffle_buffer=16,
    )
    return ImageTextDataModule(SPEC, **{**defaults, **kwargs})


# --- make_shards -------------------------------------------------------------------------------


def test_shards_are_tar_files_in_img2dataset_layout(data_dir: Path) -> None:
    for split, n in SIZES.items():
        shards = sorted((data_dir / split).glob("shard-*.tar"))
        assert len(shards) == -(-n // PER_SHARD)
        assert all(tarfile.is_tarfile(s) for s in shards)
        samples = _read_split(data_dir / split)
        assert len(samples) == n
        assert all(set(files) == {"png", "txt", "json"} for _, files in samples)
        manifest = json.loads((data_dir / split / "manifest.json").read_text())
        assert manifest["num_samples"] == n
        assert [s["url"] for s in manifest["shards"]] == [s.name for s in shards]
        assert sum(s["num_samples"] for s in manifest["shards"]) == n


def test_captions_unique_per_split_and_held_out_from_train(data_dir: Path) -> None:
    captions = {split: [f["txt"].decode() for _, f in _read_split(data_dir / split)] for split in SIZES}
    for split, texts in captions.items():
        assert len(set(texts)) == len(texts), split
    assert not set(captions["test"]) & set(captions["train"])
    assert not set(captions["val"]) & set(captions["train"])


def test_metadata_matches_caption(data_dir: Path) -> None:
    _, scenes = _tools()
    for _, files in _read_split(data_dir / "val"):
        meta = json.loads(files["json"])
        caption = files["txt"].decode()
        assert meta["counts"]["total"] == sum(o["count"] for o in meta["objects"])
        for obj in meta["objects"]:
            assert obj["color"] in caption and obj["shape"] in caption and obj["position"] in caption
        groups = [
            {"color": o["color"], "shape": o["shape"], "count": o["count"], "cell": 3 * o["row"] + o["col"]}
            for o in meta["objects"]
        ]
        assert scenes.caption_scene(groups) == caption


def test_scene_generator_is_deterministic() -> None:
    import random

    _, scenes = _tools()
    a = scenes.make_scene(random.Random(7), 56)
    b = scenes.make_scene(random.Random(7), 56)
    assert a[1] == b[1] and a[2] == b[2] and a[0].tobytes() == b[0].tobytes()
    assert a[0].mode == "RGB" and a[0].size == (56, 56)


def test_make_shards_is_deterministic(data_dir: Path, tmp_path: Path) -> None:
    make_shards, _ = _tools()
    argv = [
        "synthetic",
        "--out",
        str(tmp_path),
        "--image-size",
        "56",
        "--samples-per-shard",
        str(PER_SHARD),
        "--seed",
        "3",
        "--test",
        str(SIZES["test"]),
        "--val",
        "1",
        "--train",
        "1",
    ]
    assert make_shards.main(argv) == 0
    assert _read_split(tmp_path / "test") == _read_split(data_dir / "test")


def test_make_shards_bad_args_exit_with_message(tmp_path: Path) -> None:
    script = str(TOOLS / "make_shards.py")
    bad = subprocess.run(
        [sys.executable, script, "synthetic", "--out", str(tmp_path), "--train", "0"], capture_output=True, text=True
    )
    assert bad.returncode != 0 and "--train" in bad.stderr and "0" in bad.stderr

    make_shards, _ = _tools()
    (tmp_path / "keep.txt").write_text("not ours")
    with pytest.raises(SystemExit) as exc:
        make_shards.main(["synthetic", "--out", str(tmp_path)])
    assert exc.value.code != 0
    assert (tmp_path / "keep.txt").exists()
    with pytest.raises(SystemExit):
        make_shards.main([])  # no subcommand


def test_make_shards_overwrite_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_shards, _ = _tools()
    (tmp_path / "x").write_text("")
    with pytest.raises(SystemExit):
        make_shards.main(["synthetic", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "--overwrite" in err


# --- collator ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_processor():
    from lame_pl.backbone import build_processor

    return build_processor(SPEC)


def _samples(n: int) -> list[dict]:
    from PIL import Image

    texts = ["a red circle at the top", "two blue squares on the left and a green triangle in the center", "x"]
    return [
        {"key": f"k{i}", "image": Image.new("RGB", (56 + 8 * i, 56), (10 * i, 0, 0)), "text": texts[i % 3]}
        for i in range(n)
    ]


def test_collator_never_cuts_image_tokens(data_processor) -> None:
    collate = PairCollator(data_processor, "Describe " * 50, max_text_length=4, decoder_max_length=3)
    batch = collate(_samples(3))
    q = batch["query"]
    image_id = data_processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    merge = data_processor.image_processor.merge_size**2
    for row, thw in zip(q["input_ids"], q["image_grid_thw"], strict=True):
        assert int((row == image_id).sum()) == int(thw.prod()) // merge
    # vision start/end, the image, "\n", 4 instruction tokens, "\n"
    assert q["attention_mask"].sum(1).max() <= 2 + int(q["image_grid_thw"].prod(1).max()) // merge + 1 + 4 + 1
    assert batch["target"]["input_ids"].shape[1] <= 4 + 1  # the caption's 4 tokens and the closing "\n"
    eos = data_processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    dec = batch["decoder"]
    assert dec["input_ids"].shape[1] == 3
    lengths = dec["attention_mask"].sum(1)
    assert all(dec["input_ids"][i, lengths[i] - 1] == eos for i in range(3))
    assert dec["labelled"].tolist() == [True, True, True]  # every caption is a label


# --- datamodule --------------------------------------------------------------------------------


def _check_batch(batch: dict, n: int, eos: int, pad: int) -> None:
    q, t, d = batch["query"], batch["target"], batch["decoder"]
    assert set(q) == {"input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"}
    assert set(t) == {"input_ids", "attention_mask", "mm_token_type_ids"}
    assert set(d) == {"input_ids", "attention_mask", "labelled"}
    assert q["image_grid_thw"].shape == (n, 3)
    assert q["pixel_values"].dtype == torch.float32
    assert q["pixel_values"].shape[0] == int(q["image_grid_thw"].prod(1).sum())
    assert d["labelled"].dtype == torch.bool and bool(d["labelled"].all())
    for part in (q, t, d):
        for name, tensor in part.items():
            if name not in ("pixel_values", "labelled"):
                assert tensor.dtype == torch.int64, name
                assert tensor.shape[0] == n, name
    # Left padding: every query and target ends at the last position.
    assert bool((q["attention_mask"][:, -1] == 1).all()) and bool((t["attention_mask"][:, -1] == 1).all())
    assert bool((q["mm_token_type_ids"] == 1).any()) and not bool(t["mm_token_type_ids"].any())
    # Right padding: tokens first, then the end-of-text token, then padding.
    lengths = d["attention_mask"].sum(1)
    for i, length in enumerate(lengths.tolist()):
        assert d["attention_mask"][i, :length].all() and not d["attention_mask"][i, length:].any()
        assert d["input_ids"][i, length - 1] == eos
        assert bool((d["input_ids"][i, length:] == pad).all())
    assert len(batch["keys"]) == len(batch["texts"]) == n


def test_val_and_test_loaders_yield_every_sample_once_in_order(data_dir: Path) -> None:
    dm = _datamodule(data_dir, eval_batch_size=6)
    tok = dm.processor.tokenizer
    eos, pad = tok.convert_tokens_to_ids("<|endoftext|>"), tok.pad_token_id
    for split, loader in (("val", dm.val_dataloader()), ("test", dm.test_dataloader())):
        expected = _read_split(data_dir / split)
        batches = list(loader)
        assert [len(b["keys"]) for b in batches] == [6, 6, 6, 2]
        for b in batches:
            _check_batch(b, len(b["keys"]), eos, pad)
        assert [k for b in batches for k in b["keys"]] == [k for k, _ in expected]
        assert [x for b in batches for x in b["texts"]] == [f["txt"].decode() for _, f in expected]
        # The decoder labels are the caption itself, no instruction.
        first = batches[0]["decoder"]
        n = int(first["attention_mask"][0].sum())
        assert tok.decode(first["input_ids"][0, : n - 1]) == batches[0]["texts"][0]
    assert [len(b["keys"]) for b in dm.val_dataloader()] == [6, 6, 6, 2]  # a second pass is complete too


def test_train_loader_full_batches_and_epoch_length(data_dir: Path) -> None:
    dm = _datamodule(data_dir)  # epoch length from manifest.json: 64 samples / 8
    assert dm.samples_per_epoch == SIZES["train"] and dm.train_batches_per_worker() == 8
    dm = _datamodule(
        data_dir, train_shards=str(data_dir / "train" / "shard-{000000..000007}.tar"), samples_per_epoch=40, seed=5
    )
    loader = dm.train_dataloader()
    assert len(loader) == 5
    tok = dm.processor.tokenizer
    epochs = [list(loader) for _ in range(2)]
    for batches in epochs:
        assert len(batches) == 5
        for b in batches:
            _check_batch(b, 8, tok.convert_tokens_to_ids("<|endoftext|>"), tok.pad_token_id)
    keys = [[k for b in batches for k in b["keys"]] for batches in epochs]
    assert keys[0] != keys[1]  # a new shuffle each epoch
    # Same seed, same stream; another seed, another stream.
    again = [k for b in _datamodule(data_dir, samples_per_epoch=40, seed=5).train_dataloader() for k in b["keys"]]
    other = [k for b in _datamodule(data_dir, samples_per_epoch=40, seed=6).train_dataloader() for k in b["keys"]]
    assert again == keys[0] and other != keys[0]


def test_bad_shard_specs_and_sizes_raise_naming_the_key(data_dir: Path, tmp_path: Path) -> None:
    pattern = str(data_dir / "train" / "nope-{0..3}.tar")
    with pytest.raises(ValueError, match=r"data\.train_shards") as exc:
        ImageTextDataModule(SPEC, train_shards=pattern)
    assert pattern in str(exc.value)
    with pytest.raises(ValueError, match=r"data\.val_shards .*matches no shard file"):
        ImageTextDataModule(SPEC, val_shards=[str(data_dir / "val"), str(tmp_path / "*.tar")])
    with pytest.raises(FileNotFoundError, match=r"data\.test_shards .*missing_dir"):
        ImageTextDataModule(SPEC, test_shards=str(tmp_path / "missing_dir"))
    with pytest.raises(ValueError, match=r"data\.batch_size .* got 0"):
        ImageTextDataModule(SPEC, val_shards=str(data_dir / "val"), batch_size=0)
    (tmp_path / "shard-000000.tar").write_bytes((data_dir / "val" / "shard-000000.tar").read_bytes())
    with pytest.raises(ValueError, match=r"data\.samples_per_epoch"):
        ImageTextDataModule(SPEC, train_shards=str(tmp_path))  # no manifest.json beside it
    with pytest.raises(ValueError, match=r"data\.test_shards is not set"):
        ImageTextDataModule(SPEC, val_shards=str(data_dir / "val")).test_dataloader()
    # A shard the loader could not open fails now, not minutes into a run (a folder named like a
    # shard stands in for an unreadable file: this suite may run as root, who reads any file).
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "shard-000001.tar").mkdir()
    with pytest.raises(PermissionError, match=r"data\.val_shards shard file .*shard-000001\.tar' cannot be read"):
        ImageTextDataModule(SPEC, val_shards=str(tmp_path / "odd" / "shard-*.tar"))

"""tools/make_shards.py folder and manifest subcommands, shard sizing, bad input, mmeb-train dispatch."""

from __future__ import annotations

import csv
import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import webdataset as wds
from conftest import load_tool
from PIL import Image

from lame_pl.data.shard_args import parse_bytes

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"


def _tool(name: str):
    """A tools/ script as a module (conftest.load_tool)."""
    return load_tool(name)


def _image(path: Path, seed: int = 0, side: int = 32) -> bytes:
    """Write a random-noise image (its format from the extension) and return the file's bytes."""
    rng = random.Random(seed)
    image = Image.frombytes("RGB", (side, side), bytes(rng.getrandbits(8) for _ in range(side * side * 3)))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path.read_bytes()


def _read(split_dir: Path) -> dict[str, dict[str, bytes]]:
    """Every sample of a split's shards, read back with webdataset: {key: {ext: bytes}}."""
    urls = sorted(str(p) for p in split_dir.glob("shard-*.tar"))
    samples = {}
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        assert sample["__key__"] not in samples
        samples[sample["__key__"]] = {k: v for k, v in sample.items() if not k.startswith("__")}
    return samples


def _manifest(split_dir: Path) -> dict:
    manifest = json.loads((split_dir / "manifest.json").read_text())
    shards = sorted(p.name for p in split_dir.glob("shard-*.tar"))
    assert [s["url"] for s in manifest["shards"]] == shards
    assert sum(s["num_samples"] for s in manifest["shards"]) == manifest["num_samples"]
    return manifest


def _run(argv: list[str]) -> None:
    assert _tool("make_shards").main(argv) == 0


def _error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the tool expecting a clean failure; return its stderr."""
    with pytest.raises(SystemExit) as exc:
        _tool("make_shards").main(argv)
    assert exc.value.code != 0
    return capsys.readouterr().err


# --- folder ------------------------------------------------------------------------------------


def test_folder_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    sources = {
        "a/b/cat1.jpg": "a cat on a mat",
        "a/b/cat2.png": "two cats\n",
        "c d/x.y.webp": "  spaces and dots  ",
        "top.JPEG": "upper-case extension",
    }
    images = {}
    for i, (rel, caption) in enumerate(sources.items()):
        images[rel] = _image(src / rel, seed=i)
        (src / rel).with_suffix(".txt").write_text(caption)
    _image(src / "a" / "nocap.jpg")
    _image(src / "a" / "empty.png")
    (src / "a" / "empty.txt").write_text(" \n")
    (src / "notes.txt").write_text("a caption file without an image is ignored")

    _run(["folder", "--src", str(src), "--out", str(tmp_path / "out"), "--split-name", "val"])
    split = tmp_path / "out" / "val"
    samples = _read(split)
    expected_keys = {
        "a/b/cat1.jpg": "a__b__cat1",
        "a/b/cat2.png": "a__b__cat2",
        "c d/x.y.webp": "c_d__x_y",
        "top.JPEG": "top",
    }
    assert set(samples) == set(expected_keys.values())
    for rel, key in expected_keys.items():
        ext = rel.rsplit(".", 1)[1].lower()
        assert set(samples[key]) == {ext, "txt", "json"}
        assert samples[key][ext] == images[rel]  # copied, not re-encoded
        assert samples[key]["txt"].decode() == sources[rel].strip()
        assert json.loads(samples[key]["json"]) == {"source": rel}
    manifest = _manifest(split)
    assert manifest["num_samples"] == 4 and manifest["split"] == "val"
    assert manifest["skipped"] == {"missing_caption": 1, "empty_caption": 1}
    out = capsys.readouterr().out
    assert "missing_caption: 1" in out and "empty_caption: 1" in out and "a/nocap.jpg" in out


def test_folder_keys_stay_unique_and_short(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for i, rel in enumerate(["a b/c.jpg", "a_b/c.jpg", "a/b_c.jpg", "a/b/c.jpg", "d/" + "long" * 40 + ".png"]):
        _image(src / rel, seed=i)
        (src / rel).with_suffix(".txt").write_text(f"caption {i}")
    _run(["folder", "--src", str(src), "--out", str(tmp_path / "out")])
    keys = set(_read(tmp_path / "out" / "train"))
    assert len(keys) == 5
    assert all(len(k) <= 80 and k.replace("_", "").replace("-", "").isalnum() for k in keys)


def _expected_split(stem: str, val: float, test: float) -> str:
    """The documented rule, written out again: SHA-1 of the path without extension -> [0, 1) -> test | val | train."""
    u = int(hashlib.sha1(stem.encode()).hexdigest()[:16], 16) / 16**16
    return "test" if u < test else "val" if u < test + val else "train"


def _captioned_images(src: Path, names: list[str]) -> None:
    for i, name in enumerate(names):
        _image(src / f"{name}.png", seed=i, side=8)
        (src / f"{name}.txt").write_text(f"caption of {name}")


def test_folder_fractions_write_three_splits_by_path_hash(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    names = [f"{d}/img{i:02d}" for d in ("a", "b/c") for i in range(20)]
    _captioned_images(src, names)
    flags = ["--val-fraction", "0.2", "--test-fraction", "0.15"]
    _run(["folder", "--src", str(src), "--out", str(out), *flags])
    first = {}
    for split in ("train", "val", "test"):
        manifest = _manifest(out / split)
        assert manifest["split"] == split
        assert manifest["split_by"] == {
            "hash": "sha1 of the image path relative to src, without extension",
            "val_fraction": 0.2,
            "test_fraction": 0.15,
        }
        sources = [json.loads(s["json"])["source"] for s in _read(out / split).values()]
        assert manifest["num_samples"] == len(sources) > 0
        first.update(dict.fromkeys(sources, split))
    assert len(first) == len(names)  # each image in exactly one split
    assert all(split == _expected_split(source[:-4], 0.2, 0.15) for source, split in first.items())

    # More images later: none of the old ones moves, so a test image never becomes a training one.
    _captioned_images(src, [f"new/img{i:02d}" for i in range(20)])
    _run(["folder", "--src", str(src), "--out", str(out), *flags, "--overwrite"])
    second = {
        json.loads(s["json"])["source"]: split
        for split in ("train", "val", "test")
        for s in _read(out / split).values()
    }
    assert len(second) == 60 and {k: second[k] for k in first} == first


def test_folder_fraction_errors_name_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    _captioned_images(src, ["a", "b", "c"])
    base = ["folder", "--src", str(src), "--out", str(out)]
    for bad in ("1", "-0.1", "half", "nan"):
        assert "argument --val-fraction: expected a fraction in [0, 1)" in _error(
            [*base, "--val-fraction", bad], capsys
        )
    assert "sum must be below 1" in _error([*base, "--val-fraction", "0.5", "--test-fraction", "0.5"], capsys)
    assert "--split-name cannot be combined" in _error([*base, "--split-name", "x", "--test-fraction", "0.1"], capsys)
    # Three images and a 1% test share: the test split would be empty, which stops before writing.
    assert [_expected_split(n, 0, 0.01) for n in "abc"] == ["train"] * 3
    err = _error([*base, "--test-fraction", "0.01"], capsys)
    assert "the test split gets none of the 3 images" in err and "--test-fraction" in err
    assert not out.exists()
    err = _error([*base, "--val-fraction", "0.01", "--test-fraction", "0.98"], capsys)
    assert "the train split gets none" in err and "--val-fraction and --test-fraction" in err
    # Without fractions, --split-name still names the one split written.
    _run([*base, "--split-name", "all"])
    assert _manifest(out / "all")["num_samples"] == 3 and "split_by" not in _manifest(out / "all")


# --- manifest: image-text ----------------------------------------------------------------------


def _image_text_rows(root: Path) -> list[dict]:
    rows = []
    for i in range(5):
        _image(root / "imgs" / f"{i}.png", seed=i)
        rows.append({"image": f"imgs/{i}.png", "text": f"caption number {i}", "id": i})
    rows[3]["text"] = ""  # skipped: empty caption
    rows.append({"image": "imgs/missing.png", "text": "no such file"})  # skipped: missing image
    return rows


def _check_image_text(split: Path, root: Path) -> None:
    samples = _read(split)
    assert sorted(samples) == ["000000000", "000000001", "000000002", "000000004"]
    for key, files in samples.items():
        i = int(key)
        assert files["png"] == (root / "imgs" / f"{i}.png").read_bytes()
        assert files["txt"].decode() == f"caption number {i}"
        assert json.loads(files["json"])["source"] == f"imgs/{i}.png"
    manifest = _manifest(split)
    assert manifest["num_samples"] == 4 and manifest["rows"] == 6 and manifest["kind"] == "image-text"
    assert manifest["skipped"] == {"empty_caption": 1, "missing_image": 1}


def test_manifest_jsonl_image_text(tmp_path: Path) -> None:
    rows = _image_text_rows(tmp_path)
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    _run(["manifest", "--manifest", str(path), "--out", str(tmp_path / "out")])
    _check_image_text(tmp_path / "out" / "train", tmp_path)
    assert json.loads(_read(tmp_path / "out" / "train")["000000000"]["json"]) == {"source": "imgs/0.png", "id": 0}


def test_manifest_csv_image_text_with_image_root(tmp_path: Path) -> None:
    root = tmp_path / "data"
    rows = _image_text_rows(root)
    path = tmp_path / "lists" / "pairs.csv"
    path.parent.mkdir()
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "text", "id"])
        writer.writeheader()
        writer.writerows(rows)
    _run(["manifest", "--manifest", str(path), "--out", str(tmp_path / "out"), "--image-root", str(root)])
    _check_image_text(tmp_path / "out" / "train", root)


# --- manifest: instruction pairs ---------------------------------------------------------------


def _instruction_rows(root: Path) -> tuple[list[dict], dict[str, bytes]]:
    files = {name: _image(root / name, seed=i) for i, name in enumerate(["q0.jpg", "t1.png", "n0.webp", "q2.png"])}
    rows = [
        {
            "query_instruction": "Find the caption.",
            "query_image": "q0.jpg",
            "target_text": "a red circle",
            "negatives": ["a blue square", {"text": "a thing", "image": "n0.webp"}],
        },
        {"query_text": "two green squares", "target_image": "t1.png"},
        {
            "query_instruction": "Same picture?",
            "query_text": "look",
            "query_image": "q2.png",
            "target_text": "yes",
            "target_image": "t1.png",
        },
        {"query_text": "", "target_text": "no query"},  # skipped: empty query
    ]
    return rows, files


def _check_instruction(split: Path, files: dict[str, bytes]) -> None:
    samples = _read(split)
    assert sorted(samples) == ["000000000", "000000001", "000000002"]
    first = samples["000000000"]
    meta = json.loads(first["json"])
    assert meta == {
        "query_instruction": "Find the caption.",
        "query_text": "",
        "query_image": "query.jpg",
        "query_video": None,
        "target_instruction": "",
        "target_text": "a red circle",
        "target_image": None,
        "target_video": None,
        "negatives": [
            {"instruction": "", "text": "a blue square", "image": None, "video": None},
            {"instruction": "", "text": "a thing", "image": "neg1.webp", "video": None},
        ],
        "source": {
            "query_image": "q0.jpg",
            "query_video": None,
            "target_image": None,
            "target_video": None,
            "negatives": [{"image": None, "video": None}, {"image": "n0.webp", "video": None}],
        },
    }
    assert set(first) == {"json", "query.jpg", "neg1.webp"}
    assert first["query.jpg"] == files["q0.jpg"] and first["neg1.webp"] == files["n0.webp"]
    second = samples["000000001"]
    meta = json.loads(second["json"])
    assert meta["query_text"] == "two green squares" and meta["query_image"] is None
    assert meta["target_image"] == "target.png" and meta["negatives"] == [] and meta["query_instruction"] == ""
    assert set(second) == {"json", "target.png"} and second["target.png"] == files["t1.png"]
    third = samples["000000002"]
    assert set(third) == {"json", "query.png", "target.png"}
    assert third["query.png"] == files["q2.png"] and third["target.png"] == files["t1.png"]
    manifest = _manifest(split)
    assert manifest["kind"] == "instruction-pairs" and manifest["num_samples"] == 3
    assert manifest["skipped"] == {"empty_query": 1}


def test_manifest_jsonl_instruction_pairs(tmp_path: Path) -> None:
    rows, files = _instruction_rows(tmp_path)
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    _run(["manifest", "--manifest", str(path), "--out", str(tmp_path / "out")])
    _check_instruction(tmp_path / "out" / "train", files)


def test_manifest_csv_instruction_pairs(tmp_path: Path) -> None:
    rows, files = _instruction_rows(tmp_path)
    fields = ["query_instruction", "query_text", "query_image", "target_text", "target_image", "negatives"]
    path = tmp_path / "pairs.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            if "negatives" in row:
                row = {**row, "negatives": json.dumps(row["negatives"])}
            writer.writerow(row)
    _run(["manifest", "--manifest", str(path), "--out", str(tmp_path / "out")])
    _check_instruction(tmp_path / "out" / "train", files)


# --- shard size --------------------------------------------------------------------------------


def _many(tmp_path: Path, n: int) -> Path:
    rows = []
    for i in range(n):
        _image(tmp_path / f"{i}.png", seed=i)  # noise: ~3 KB each, incompressible
        rows.append(json.dumps({"image": f"{i}.png", "text": f"caption {i}"}))
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


def test_shards_split_by_count(tmp_path: Path) -> None:
    path = _many(tmp_path, 10)
    _run(["manifest", "--manifest", str(path), "--out", str(tmp_path / "out"), "--samples-per-shard", "3"])
    manifest = _manifest(tmp_path / "out" / "train")
    assert [s["num_samples"] for s in manifest["shards"]] == [3, 3, 3, 1]
    assert manifest["shards"][0]["url"] == "shard-000000.tar" and manifest["num_samples"] == 10
    assert len(_read(tmp_path / "out" / "train")) == 10


@pytest.mark.parametrize(("limit", "per_shard"), [("30KB", 1000), ("30KB", 2), ("1", 1000)])
def test_shards_split_by_bytes(tmp_path: Path, limit: str, per_shard: int) -> None:
    path = _many(tmp_path, 12)
    split = tmp_path / "out" / "train"
    _run(
        [
            "manifest",
            "--manifest",
            str(path),
            "--out",
            str(tmp_path / "out"),
            "--shard-bytes",
            limit,
            "--samples-per-shard",
            str(per_shard),
        ]
    )
    manifest = _manifest(split)
    limit_bytes = parse_bytes(limit)
    counts = [s["num_samples"] for s in manifest["shards"]]
    assert sum(counts) == 12 and max(counts) <= per_shard and len(counts) > 1
    for shard in manifest["shards"]:
        size = (split / shard["url"]).stat().st_size
        assert size <= limit_bytes or shard["num_samples"] == 1  # only a lone oversized sample may exceed it
    if limit == "1":
        assert counts == [1] * 12
    assert len(_read(split)) == 12


def test_parse_bytes() -> None:
    assert parse_bytes("500MB") == 500 * 10**6 and parse_bytes("1GB") == 10**9
    assert parse_bytes("1.5gb") == 1_500_000_000
    assert parse_bytes("64KiB") == 65536 and parse_bytes("4096") == 4096 and parse_bytes("2M") == 2 * 10**6
    for bad in ("", "-1MB", "1XB", "MB", "0"):
        with pytest.raises(Exception, match="size"):
            parse_bytes(bad)


# --- bad input ---------------------------------------------------------------------------------


def test_bad_arguments_exit_with_clear_messages(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "out")
    assert "does-not-exist" in _error(["folder", "--src", str(tmp_path / "does-not-exist"), "--out", out], capsys)
    err = _error(["manifest", "--manifest", str(tmp_path / "nope.jsonl"), "--out", out], capsys)
    assert "nope.jsonl" in err
    (tmp_path / "rows.txt").write_text("x")
    assert ".jsonl or a .csv" in _error(["manifest", "--manifest", str(tmp_path / "rows.txt"), "--out", out], capsys)
    assert "--shard-bytes" in _error(["folder", "--src", str(tmp_path), "--out", out, "--shard-bytes", "lots"], capsys)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no image with a caption" in _error(["folder", "--src", str(empty), "--out", out], capsys)


def test_malformed_rows_name_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    _image(tmp_path / "a.png")
    good = json.dumps({"image": "a.png", "text": "fine"})
    cases = {
        "broken.jsonl": ([good, "", good, "{not json"], 4, "not valid JSON"),
        "types.jsonl": ([good, json.dumps({"image": "a.png", "text": 3})], 2, "'text' must be a string"),
        "missing.jsonl": ([good, json.dumps({"image": "a.png"})], 2, "missing column 'text'"),
        "array.jsonl": ([good, "[1, 2]"], 2, "expected a JSON object"),
        "negatives.jsonl": ([json.dumps({"query_text": "q", "target_text": "t", "negatives": [3]})], 1, "negatives[0]"),
        "nothing.jsonl": ([json.dumps({"caption": "x"})], 1, "needs the columns"),
        "short.csv": (["image,text", "a.png,fine", "a.png"], 3, "fewer fields"),
        "long.csv": (["image,text", "a.png,fine,extra"], 2, "more fields"),
        "header.csv": (["picture,caption", "a.png,fine"], 1, "the header names neither"),
        "half.csv": (["image,caption", "a.png,fine"], 1, "the header names neither"),
    }
    for name, (lines, line_no, message) in cases.items():
        path = tmp_path / name
        path.write_text("\n".join(lines) + "\n")
        err = _error(["manifest", "--manifest", str(path), "--out", str(out)], capsys)
        assert f"{path}:{line_no}:" in err and message in err, (name, err)
        assert not out.exists()  # validated before anything is written

    (tmp_path / "bad.jsonl").write_text(good + "\n{oops\n")
    script = str(TOOLS / "make_shards.py")
    proc = subprocess.run(
        [sys.executable, script, "manifest", "--manifest", str(tmp_path / "bad.jsonl"), "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and "bad.jsonl:2:" in proc.stderr


def test_non_empty_out_needs_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _many(tmp_path, 3)
    argv = ["manifest", "--manifest", str(path), "--out", str(tmp_path / "out")]
    _run(argv + ["--samples-per-shard", "1"])
    keep = tmp_path / "out" / "train" / "keep.txt"
    keep.write_text("not ours")
    assert "--overwrite" in _error(argv, capsys)
    _run(argv + ["--overwrite"])
    assert [s["num_samples"] for s in _manifest(tmp_path / "out" / "train")["shards"]] == [3]
    assert keep.exists()  # only the tool's own files are replaced


def test_mmeb_train_subcommand_dispatches_to_the_package(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The converter lives in lame_pl.data.mmeb_train (tests/test_mmeb_train.py); the tool only dispatches.
    err = _error(["mmeb-train", "--out", str(tmp_path / "out")], capsys)
    assert "--mmeb-root" in err and not (tmp_path / "out" / "mixture.yaml").exists()

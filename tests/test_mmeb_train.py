"""``make_shards.py mmeb-train`` (lame_pl.data.mmeb_train): VLM2Vec-V2's training sources to shards.

Every fixture is written by the test in the layout a user has after VLM2Vec's download script:
MMEB-train parquet (Hugging Face snapshot and parquet-converter layouts) and JSONL subsets with
image files, colpali and VisRAG parquet with inline page images, LLaVA-Hound JSONL with frame folders.
The instruction split the converter applies has its own tests (tests/test_instruction_split.py);
tests/test_configs.py reuses ``_mmeb_root`` and ``_video``.
"""

from __future__ import annotations

import argparse
import io
import json
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
import yaml
from PIL import Image

from lame_pl.data import mmeb_train
from lame_pl.data.instruction_pairs import DecodeInstructionPairs, parse_pair_json
from lame_pl.data.shard_writer import DataError
from lame_pl.data.skips import SkipCounter
from lame_pl.data.vlm2vec_mixture import MMEB, SUBSET_BY_NAME, SUBSETS, VIDEO_KINDS
from lame_pl.datamodules.mixture import ShardSet, expand_mixture
from lame_pl.datamodules.pairs import InstructionPairDataModule
from lame_pl.datamodules.shards import count_samples
from lame_pl.instructions import (
    VIDEO_QA_INSTRUCTION,
    VIDEO_RETRIEVAL_QUERY_INSTRUCTION,
    VIDEO_RETRIEVAL_TARGET_INSTRUCTION,
    VISDOC_PAGE_TEXT,
    VISDOC_QUERY_INSTRUCTION,
)
from lame_pl.media import list_frames, sample_frames

QA_INST = "Represent the given image with the following question:"
T2I_INST = "Find me an everyday image that matches the given caption:"
IMAGE_INST = "Represent the given image."
CLS_INST = "Represent the given image for classification"


# --------------------------------------------------------------------------------- fixtures


def _image_bytes(seed: int, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (seed * 37 % 256, seed * 91 % 256, seed * 13 % 256)).save(buf, format=fmt)
    return buf.getvalue()


def _write_image(path: Path, seed: int, fmt: str = "PNG") -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _image_bytes(seed, fmt)
    path.write_bytes(data)
    return data


def _parquet(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _mmeb_row(qry: str, qimg: str, pos: str, pimg: str, neg: str = "", nimg: str = "") -> dict:
    return {
        "qry": qry,
        "qry_image_path": qimg,
        "pos_text": pos,
        "pos_image_path": pimg,
        "neg_text": neg,
        "neg_image_path": nimg,
    }


def _mmeb_root(tmp_path: Path) -> Path:
    """OK-VQA (snapshot parquet, one row's image missing, one hard negative), MSCOCO_t2i
    (parquet-converter layout), ImageNet_1K (JSONL), VisualNews_i2t (captions sharing "A man")."""
    root = tmp_path / "MMEB-train"
    questions = ["What is shown?", "How many dogs are there?", "Which color is the car?", "Where is this?"]
    answers = ["a cat", "two", "red", "a beach"]
    rows = []
    for i, (q, a) in enumerate(zip(questions, answers, strict=True)):
        image = f"images/OK-VQA/{i}.jpg"
        if i != 3:  # row 3's image is missing on disk
            _write_image(root / image, i, "JPEG")
        rows.append(_mmeb_row(f"<|image_1|>\n{QA_INST} {q}\n", image, a, "", neg="a dog" if i == 0 else ""))
    _parquet(root / "OK-VQA" / "original-00000-of-00001.parquet", rows)
    _parquet(root / "OK-VQA" / "train-00000-of-00001.parquet", rows[:1])  # another split: never read

    captions = ["A man riding a horse on a beach.", "Two dogs play in the snow.", "A red car parked outside."]
    rows = []
    for i, caption in enumerate(captions):
        image = f"images/MSCOCO_t2i/{i}.png"
        _write_image(root / image, 10 + i)
        rows.append(_mmeb_row(f"{T2I_INST} {caption}\n", "", f"<|image_1|>\n{IMAGE_INST}\n", image))
    _parquet(root / "MSCOCO_t2i" / "original" / "0000.parquet", rows)

    rows = []
    for i, label in enumerate(["tench", "goldfish", "great white shark", "tiger shark", "hammerhead"]):
        image = f"images/ImageNet_1K/{i}.png"
        _write_image(root / image, 20 + i)
        rows.append(_mmeb_row(f"<|image_1|>\n{CLS_INST}\n", image, label, ""))
    _jsonl(root / "ImageNet_1K.jsonl", rows)

    rows = []
    for i, caption in enumerate(["A man speaks at a rally.", "A man walks his dog."]):
        image = f"images/VisualNews_i2t/{i}.png"
        _write_image(root / image, 30 + i)
        rows.append(_mmeb_row("<|image_1|>\nFind a caption for the news in the given photo.\n", image, caption, ""))
    _parquet(root / "VisualNews_i2t" / "original-00000-of-00001.parquet", rows)
    return root


def _visdoc(tmp_path: Path) -> tuple[Path, Path]:
    """A colpali snapshot folder (train + test files, one row without an image) and a VisRAG parquet file."""
    colpali = tmp_path / "colpali_train_set"
    rows = [
        {
            "image": {"bytes": _image_bytes(40 + i), "path": f"p{i}.png"},
            "image_filename": f"p{i}.png",
            "query": f"What is on page {i}?",
            "answer": f"answer {i}",
            "source": "arxiv",
            "prompt": "long prose",
        }
        for i in range(3)
    ]
    rows.append(
        {"image": None, "image_filename": "", "query": "no page?", "answer": "none", "source": "arxiv", "prompt": ""}
    )
    _parquet(colpali / "data" / "train-00000-of-00001.parquet", rows)
    _parquet(colpali / "data" / "test-00000-of-00001.parquet", rows[:1])
    visrag = _parquet(
        tmp_path / "visrag" / "train.parquet",
        [
            {
                "query": f"Which chart shows {w}?",
                "image": {"bytes": _image_bytes(50 + i), "path": None},
                "source": "ChartQA",
            }
            for i, w in enumerate(["sales", "costs"])
        ],
    )
    return colpali, visrag


def _video(tmp_path: Path) -> tuple[Path, Path, dict[str, list[Path]]]:
    """LLaVA-Hound annotations and frames: vid0 (10 frames), vid1 (3), vid_empty (none), vid_gone (no folder)."""
    frames_root = tmp_path / "train_300k"
    frames = {}
    for name, n in (("vid0", 10), ("vid1", 3), ("vid_empty", 0)):
        folder = frames_root / name
        folder.mkdir(parents=True)
        for i in range(1, n + 1):
            _write_image(folder / f"frame_{i}.jpg", 60 + i, "JPEG")
        frames[name] = sample_frames(list_frames(folder), 8)
    sft = tmp_path / "sft"
    captions = [
        {
            "id": f"c{i}",
            "video": name,
            "conversations": [
                {"from": "human", "value": "<video>\nDescribe the video in detail."},
                {"from": "gpt", "value": f"Caption of {name}."},
            ],
        }
        for i, name in enumerate(["vid0", "vid1", "vid_empty", "vid_gone"])
    ]
    _jsonl(sft / "video_caption_300k.jsonl", captions)
    qa = [
        {
            "id": "q0",
            "video": "vid1",
            "conversations": [
                {"from": "human", "value": "<video>\nWhat happens first?"},
                {"from": "gpt", "value": "A door opens."},
            ],
        }
    ]
    _jsonl(sft / "video_240k_caption_15k.jsonl", qa)
    return sft, frames_root, frames


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    mmeb_train.add_arguments(parser)
    return parser.parse_args([str(a) for a in argv])


def _read(folder: Path) -> dict[str, dict]:
    """``{key: {"pair": parsed json, "record": raw json, members...}}`` of every shard in ``folder``."""
    out = {}
    for sample in wds.WebDataset([str(p) for p in sorted(folder.glob("shard-*.tar"))], shardshuffle=False):
        record = json.loads(sample["json"])
        out[sample["__key__"]] = {"pair": parse_pair_json(sample["json"]), "record": record, **sample}
    return out


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


# --------------------------------------------------------------------------------- the mixture table


def test_mixture_table_is_vlm2vec_v2s() -> None:
    assert len(SUBSETS) == 25 and len(SUBSET_BY_NAME) == 25
    assert sum(s.kind == MMEB for s in SUBSETS) == 20
    assert sum(s.weight for s in SUBSETS) == 52  # train_alltasks.yaml: 15 (MMEB) + 10 + 12 + 3 x 5
    assert SUBSET_BY_NAME["VisDial"].row_cap == 130_000 and SUBSET_BY_NAME["HatefulMemes"].weight == 0.5
    assert SUBSET_BY_NAME["colpali_train_set"].row_cap is None and SUBSET_BY_NAME["visrag-indomain"].weight == 12
    assert SUBSET_BY_NAME["video_qa_240k"].row_cap == 240_000
    assert all(s.num_frames == 8 for s in SUBSETS if s.kind in VIDEO_KINDS)


# --------------------------------------------------------------------------------- end to end


def test_mmeb_subsets_split_instructions_and_write_shards(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _mmeb_root(tmp_path)
    out = tmp_path / "out"
    mmeb_train.run(_args("--mmeb-root", root, "--out", out))
    printed = capsys.readouterr().out
    assert "found 4 subsets: ImageNet_1K, OK-VQA, VisualNews_i2t, MSCOCO_t2i" in printed
    assert "not found (21):" in printed and "colpali_train_set: no --colpali" in printed
    assert "\n  N24News, HatefulMemes, VOC2007, SUN397, A-OKVQA, DocVQA, " in printed
    assert f"OK-VQA: instructions (inferred): query {QA_INST!r}, target ''" in printed

    okvqa = _read(out / "OK-VQA")
    assert sorted(okvqa) == ["000000000", "000000001", "000000002"]  # row 3's image is missing
    first = okvqa["000000000"]["pair"]
    assert first["query"]["instruction"] == QA_INST and first["query"]["text"] == "What is shown?"
    assert first["target"] == {"instruction": "", "text": "a cat", "image": None, "video": None}
    assert [n["text"] for n in first["negatives"]] == ["a dog"]
    assert okvqa["000000000"][first["query"]["image"]] == (root / "images/OK-VQA/0.jpg").read_bytes()
    manifest = _manifest(out / "OK-VQA")
    assert manifest["skipped"] == {"missing_image": 1} and manifest["num_samples"] == 3
    assert manifest["query_instruction"] == QA_INST and manifest["row_cap"] == 10_000 and manifest["rows"] == 4
    assert manifest["inputs"][0].endswith("OK-VQA/original-00000-of-00001.parquet")

    t2i = _read(out / "MSCOCO_t2i")
    for sample in t2i.values():
        pair = sample["pair"]
        assert pair["query"]["instruction"] == T2I_INST and not pair["query"]["text"].startswith("Find")
        # The target is image-only: its constant prompt is an instruction, never decoder text.
        assert pair["target"]["instruction"] == IMAGE_INST and pair["target"]["text"] == ""
        assert pair["target"]["image"] is not None
    imagenet = _read(out / "ImageNet_1K")
    assert {s["pair"]["query"]["instruction"] for s in imagenet.values()} == {CLS_INST}
    assert {s["pair"]["query"]["text"] for s in imagenet.values()} == {""}
    assert sorted(s["pair"]["target"]["text"] for s in imagenet.values())[0] == "goldfish"
    news = _read(out / "VisualNews_i2t")
    assert sorted(s["pair"]["target"]["text"] for s in news.values()) == [
        "A man speaks at a rally.",
        "A man walks his dog.",
    ]
    # No target text anywhere starts with its subset's target instruction.
    for name in ("OK-VQA", "MSCOCO_t2i", "ImageNet_1K", "VisualNews_i2t"):
        instruction = _manifest(out / name)["target_instruction"]
        for sample in _read(out / name).values():
            text = sample["pair"]["target"]["text"]
            assert not (instruction and text.startswith(instruction)), (name, text)


def test_mixture_yaml_lists_the_sets_written(tmp_path: Path) -> None:
    root = _mmeb_root(tmp_path)
    colpali, visrag = _visdoc(tmp_path)
    sft, frames_root, _ = _video(tmp_path)
    out = tmp_path / "out"
    mmeb_train.run(
        _args(
            "--mmeb-root",
            root,
            "--colpali",
            colpali,
            "--visrag",
            visrag,
            "--video-annotations",
            sft,
            "--video-frames",
            frames_root,
            "--out",
            out,
            "--subsets",
            "video_qa_240k,OK-VQA,colpali_train_set,visrag-indomain,video_caption_300k-video",
        )
    )
    overlay = yaml.safe_load((out / "mixture.yaml").read_text())
    assert overlay["data"]["init_args"]["train_shards"] is None
    sets = overlay["data"]["init_args"]["train_mixture"]
    # The table's order, whatever the order asked for; the peer's weights.
    assert [(s["name"], s["weight"], s["homogeneous"]) for s in sets] == [
        ("OK-VQA", 0.5, True),
        ("colpali_train_set", 10.0, True),
        ("visrag-indomain", 12.0, True),
        ("video_caption_300k-video", 5.0, True),
        ("video_qa_240k", 5.0, True),
    ]
    root = overlay["data"]["init_args"]["mixture_root"]
    assert Path(root) == out.resolve() and sets[0]["shards"] == "OK-VQA"
    # As the datamodule resolves it: every set's shards found, its size from the manifest.
    for item, urls in expand_mixture([ShardSet(**s) for s in sets], root):
        assert count_samples(urls) == _manifest(Path(item.shards))["num_samples"]


def test_visual_documents(tmp_path: Path) -> None:
    colpali, visrag = _visdoc(tmp_path)
    out = tmp_path / "out"
    mmeb_train.run(_args("--colpali", colpali, "--visrag", visrag, "--out", out))
    pages = _read(out / "colpali_train_set")
    assert sorted(pages) == ["000000000", "000000001", "000000002"]  # the test file is not read; row 3 has no image
    pair = pages["000000001"]["pair"]
    assert pair["query"] == {"instruction": "", "text": "What is on page 1?", "image": "query.png", "video": None}
    assert pair["target"]["text"] == "answer 1" and pair["target"]["image"] is None
    assert pages["000000001"]["query.png"] == _image_bytes(41)
    assert _manifest(out / "colpali_train_set")["skipped"] == {"missing_image": 1}
    docs = _read(out / "visrag-indomain")
    pair = docs["000000001"]["pair"]
    assert (
        pair["query"]["instruction"] == VISDOC_QUERY_INSTRUCTION and pair["query"]["text"] == "Which chart shows costs?"
    )
    assert pair["target"]["instruction"] == VISDOC_PAGE_TEXT and pair["target"]["text"] == ""
    assert docs["000000001"]["target.png"] == _image_bytes(51)


def test_video_sets_sample_frames_and_count_empty_folders(tmp_path: Path) -> None:
    sft, frames_root, frames = _video(tmp_path)
    out = tmp_path / "out"
    mmeb_train.run(_args("--video-annotations", sft, "--video-frames", frames_root, "--out", out))
    captions = _read(out / "video_caption_300k")
    assert sorted(captions) == ["000000000", "000000001"]
    sample = captions["000000000"]
    pair = sample["pair"]
    assert pair["query"]["instruction"] == "Describe the video in detail." and pair["query"]["text"] == ""
    assert len(pair["query"]["video"]) == 8  # 10 frames -> VLM2Vec-V2's 8
    assert [sample[m] for m in pair["query"]["video"]] == [p.read_bytes() for p in frames["vid0"]]
    assert pair["target"]["text"] == "Caption of vid0." and pair["target"]["video"] is None
    assert len(captions["000000001"]["pair"]["query"]["video"]) == 3  # fewer frames than 8: all of them
    manifest = _manifest(out / "video_caption_300k")
    assert manifest["skipped"] == {"empty_video": 1, "missing_video": 1} and manifest["num_frames"] == 8

    retrieval = _read(out / "video_caption_300k-video")["000000000"]["pair"]
    assert retrieval["query"] == {
        "instruction": VIDEO_RETRIEVAL_QUERY_INSTRUCTION,
        "text": "Caption of vid0.",
        "image": None,
        "video": None,
    }
    assert retrieval["target"]["instruction"] == VIDEO_RETRIEVAL_TARGET_INSTRUCTION
    assert retrieval["target"]["text"] == "" and len(retrieval["target"]["video"]) == 8

    qa = _read(out / "video_qa_240k")["000000000"]["pair"]  # from video_240k_caption_15k.jsonl
    assert qa["query"]["instruction"] == VIDEO_QA_INSTRUCTION and qa["query"]["text"] == "What happens first?"
    assert len(qa["query"]["video"]) == 3 and qa["target"]["text"] == "A door opens."

    mmeb_train.run(
        _args(
            "--video-annotations",
            sft,
            "--video-frames",
            frames_root,
            "--out",
            out,
            "--overwrite",
            "--subsets",
            "video_caption_300k",
            "--num-frames",
            "2",
        )
    )
    pair = _read(out / "video_caption_300k")["000000000"]["pair"]
    assert len(pair["query"]["video"]) == 2 and _manifest(out / "video_caption_300k")["num_frames"] == 2


def test_shards_decode_through_the_datamodule(tmp_path: Path) -> None:
    root = _mmeb_root(tmp_path)
    sft, frames_root, _ = _video(tmp_path)
    out = tmp_path / "out"
    mmeb_train.run(
        _args(
            "--mmeb-root",
            root,
            "--video-annotations",
            sft,
            "--video-frames",
            frames_root,
            "--subsets",
            "OK-VQA,video_qa_240k",
            "--out",
            out,
        )
    )
    skips = SkipCounter()
    decode = DecodeInstructionPairs(skips, max_image_pixels=10**6)
    for name, n in (("OK-VQA", 3), ("video_qa_240k", 1)):
        urls = [str(p) for p in sorted((out / name).glob("shard-*.tar"))]
        decoded = list(decode.run(iter(wds.WebDataset(urls, shardshuffle=False))))
        assert len(decoded) == n
        for sample in decoded:
            media = sample["query"]["images"] + (sample["query"]["video"] or [])
            assert media and all(isinstance(image, Image.Image) for image in media)
    assert skips.drain() == {}


def test_row_caps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _mmeb_root(tmp_path)
    monkeypatch.setitem(SUBSET_BY_NAME, "ImageNet_1K", replace(SUBSET_BY_NAME["ImageNet_1K"], row_cap=3))
    out = tmp_path / "out"
    mmeb_train.run(_args("--mmeb-root", root, "--subsets", "ImageNet_1K", "--out", out))
    manifest = _manifest(out / "ImageNet_1K")
    assert manifest["num_samples"] == 3 and manifest["row_cap"] == 3 and manifest["rows"] == 3
    assert sorted(_read(out / "ImageNet_1K")) == ["000000000", "000000001", "000000002"]  # the first rows
    # The instruction is still read off every row, not only the capped ones.
    assert manifest["query_instruction"] == CLS_INST
    mmeb_train.run(_args("--mmeb-root", root, "--subsets", "ImageNet_1K", "--out", out, "--overwrite", "--no-row-caps"))
    manifest = _manifest(out / "ImageNet_1K")
    assert manifest["num_samples"] == 5 and manifest["row_cap"] is None
    mmeb_train.run(
        _args("--mmeb-root", root, "--subsets", "ImageNet_1K", "--out", out, "--overwrite", "--max-rows", "2")
    )
    assert _manifest(out / "ImageNet_1K")["num_samples"] == 2
    assert len(list((out / "ImageNet_1K").glob("shard-*.tar"))) == 1


def test_single_row_subset_needs_its_instructions(tmp_path: Path) -> None:
    root = tmp_path / "MMEB-train"
    _write_image(root / "images/A-OKVQA/0.png", 0)
    _parquet(
        root / "A-OKVQA" / "original-00000-of-00001.parquet",
        [_mmeb_row(f"<|image_1|>\n{QA_INST} What is shown?\n", "images/A-OKVQA/0.png", "a cat", "")],
    )
    out = tmp_path / "out"
    with pytest.raises(DataError, match="single row.*--query-instruction and --target-instruction"):
        mmeb_train.run(_args("--mmeb-root", root, "--out", out))
    assert not (out / "mixture.yaml").exists()
    mmeb_train.run(
        _args(
            "--mmeb-root",
            root,
            "--out",
            out,
            "--subsets",
            "A-OKVQA",
            "--query-instruction",
            QA_INST,
            "--target-instruction",
            "",
        )
    )
    pair = _read(out / "A-OKVQA")["000000000"]["pair"]
    assert (pair["query"]["instruction"], pair["query"]["text"]) == (QA_INST, "What is shown?")
    assert (pair["target"]["instruction"], pair["target"]["text"]) == ("", "a cat")
    assert _manifest(out / "A-OKVQA")["instruction_origin"] == "given"


def test_rows_that_miss_a_given_instruction_are_skipped_and_counted(tmp_path: Path) -> None:
    root = _mmeb_root(tmp_path)
    out = tmp_path / "out"
    mmeb_train.run(
        _args("--mmeb-root", root, "--out", out, "--subsets", "VisualNews_i2t", "--target-instruction", "A man speaks")
    )
    manifest = _manifest(out / "VisualNews_i2t")
    assert manifest["num_samples"] == 1 and manifest["skipped"] == {"instruction_mismatch": 1}
    assert _read(out / "VisualNews_i2t")["000000000"]["pair"]["target"]["text"] == "at a rally."


def test_a_subset_with_nothing_left_fails_but_the_others_are_written(tmp_path: Path) -> None:
    root = _mmeb_root(tmp_path)
    for image in (root / "images" / "MSCOCO_t2i").iterdir():
        image.unlink()
    out = tmp_path / "out"
    with pytest.raises(
        DataError,
        match=r"1 of 4 subsets failed: MSCOCO_t2i: no row could be written to .* \(MMEB-train image paths are read from --image-root",
    ):
        mmeb_train.run(_args("--mmeb-root", root, "--out", out))
    assert not list((out / "MSCOCO_t2i").glob("*"))
    sets = yaml.safe_load((out / "mixture.yaml").read_text())["data"]["init_args"]["train_mixture"]
    assert [s["name"] for s in sets] == ["ImageNet_1K", "OK-VQA", "VisualNews_i2t"]


def test_bad_options_and_inputs_name_what_is_wrong(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _mmeb_root(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(SystemExit):
        _args("--out", out, "--subsets", "ImageNet_1K,NoSuchSet")
    assert "unknown subset 'NoSuchSet'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _args("--out", out, "--no-row-caps", "--max-rows", "3")
    with pytest.raises(DataError, match="--mmeb-root '.*nowhere' is not a directory"):
        mmeb_train.run(_args("--mmeb-root", tmp_path / "nowhere", "--out", out))
    with pytest.raises(DataError, match="--query-instruction applies to one MMEB-train subset"):
        mmeb_train.run(_args("--mmeb-root", root, "--out", out, "--query-instruction", "x"))
    with pytest.raises(DataError, match="subset N24News: input not found"):
        mmeb_train.run(_args("--mmeb-root", root, "--out", out, "--subsets", "N24News"))
    with pytest.raises(DataError, match="no input found for any subset"):
        mmeb_train.run(_args("--out", out))
    with pytest.raises(DataError, match="OK-VQA holds no test-\\*.parquet"):
        mmeb_train.run(_args("--mmeb-root", root, "--out", out, "--subsets", "OK-VQA", "--split", "test"))
    sft = tmp_path / "sft"
    _jsonl(sft / "video_caption_300k.jsonl", [{"video": "v", "conversations": []}])
    with pytest.raises(DataError, match="--video-frames is not"):
        mmeb_train.run(_args("--video-annotations", sft, "--out", out))
    with pytest.raises(DataError, match=r"video_caption_300k.jsonl:1: 'conversations' must be a list of at least two"):
        mmeb_train.run(
            _args(
                "--video-annotations", sft, "--video-frames", tmp_path, "--out", out, "--subsets", "video_caption_300k"
            )
        )
    (sft / "video_caption_300k.jsonl").write_text('{"video": "v", "conversations": [}\n')
    with pytest.raises(DataError, match=r"video_caption_300k.jsonl:1: not valid JSON"):
        mmeb_train.run(
            _args(
                "--video-annotations", sft, "--video-frames", tmp_path, "--out", out, "--subsets", "video_caption_300k"
            )
        )
    bad = tmp_path / "bad"
    _parquet(bad / "CIRR" / "original-00000-of-00001.parquet", [{"qry": "x", "pos_text": "y"}])
    with pytest.raises(DataError, match=r"CIRR/original-00000-of-00001.parquet: missing column 'qry_image_path'"):
        mmeb_train.run(_args("--mmeb-root", bad, "--out", out))
    _parquet(bad / "NIGHTS" / "original-00000-of-00001.parquet", [{**_mmeb_row("a", "", "b", ""), "qry": 3}])
    with pytest.raises(DataError, match=r"NIGHTS/original-00000-of-00001.parquet row 0: field 'qry' must be a string"):
        mmeb_train.run(_args("--mmeb-root", bad, "--out", out, "--subsets", "NIGHTS"))
    with pytest.raises(DataError, match="--colpali '.*' does not exist"):
        mmeb_train.run(_args("--colpali", tmp_path / "none.parquet", "--out", out))
    colpali = tmp_path / "only_test"
    _parquet(colpali / "test-00000-of-00001.parquet", [{"query": "q", "image": None, "answer": "a"}])
    with pytest.raises(DataError, match="no train\\*.parquet or train\\*.jsonl file in the folder"):
        mmeb_train.run(_args("--colpali", colpali, "--out", out))


def test_non_empty_output_needs_overwrite_and_bad_input_keeps_old_shards(tmp_path: Path) -> None:
    root = _mmeb_root(tmp_path)
    out = tmp_path / "out"
    mmeb_train.run(_args("--mmeb-root", root, "--out", out, "--subsets", "ImageNet_1K"))
    before = _read(out / "ImageNet_1K")
    with pytest.raises(DataError, match="ImageNet_1K.*not empty; pass --overwrite"):
        mmeb_train.run(_args("--mmeb-root", root, "--out", out, "--subsets", "ImageNet_1K"))
    (root / "ImageNet_1K.jsonl").write_text('{"qry": "x"}\n')  # malformed now
    with pytest.raises(DataError, match="ImageNet_1K.jsonl:1: missing field 'qry_image_path'"):
        mmeb_train.run(_args("--mmeb-root", root, "--out", out, "--subsets", "ImageNet_1K", "--overwrite"))
    assert _read(out / "ImageNet_1K").keys() == before.keys()  # the bad input cost nothing


def test_mixture_overlay_trains_through_the_datamodule(tmp_path: Path, tiny_spec) -> None:
    root = _mmeb_root(tmp_path)
    colpali, _ = _visdoc(tmp_path)
    sft, frames_root, _ = _video(tmp_path)
    out = tmp_path / "out"
    mmeb_train.run(
        _args(
            "--mmeb-root",
            root,
            "--colpali",
            colpali,
            "--video-annotations",
            sft,
            "--video-frames",
            frames_root,
            "--subsets",
            "OK-VQA,colpali_train_set,video_qa_240k",
            "--out",
            out,
        )
    )
    overlay = yaml.safe_load((out / "mixture.yaml").read_text())["data"]["init_args"]
    data = InstructionPairDataModule(
        tiny_spec, **overlay, batch_size=2, num_workers=0, shuffle_buffer=4, samples_per_epoch=12
    )
    data.setup("fit")
    batches = list(data.train_dataloader())
    assert len(batches) == 6
    for batch in batches:
        assert len(set(batch["sources"])) == 1  # homogeneous: one subset per batch
        assert batch["sources"][0] in {"OK-VQA", "colpali_train_set", "video_qa_240k"}
        has_video = "pixel_values_videos" in batch["query"]
        assert has_video == (batch["sources"][0] == "video_qa_240k")

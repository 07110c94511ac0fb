"""Fixtures for the ``mmeb-train`` converter tests (tests/test_mmeb_train.py, tests/test_configs.py).

Each builder writes, under a test's folder, files in the layout a user has after VLM2Vec's download
script: MMEB-train parquet (Hugging Face snapshot and parquet-converter layouts) and JSONL subsets
with image files, colpali and VisRAG parquet with inline page images, LLaVA-Hound JSONL with frame
folders. ``read_shards`` and ``read_manifest`` read back what the converter wrote.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds
from PIL import Image

from lame_pl.data import mmeb_train
from lame_pl.data.instruction_pairs import parse_pair_json
from lame_pl.media import list_frames, sample_frames

QA_INST = "Represent the given image with the following question:"
T2I_INST = "Find me an everyday image that matches the given caption:"
IMAGE_INST = "Represent the given image."
CLS_INST = "Represent the given image for classification"


def image_bytes(seed: int, fmt: str = "PNG") -> bytes:
    """An 8x8 image of a colour set by ``seed``, encoded as ``fmt``."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (seed * 37 % 256, seed * 91 % 256, seed * 13 % 256)).save(buf, format=fmt)
    return buf.getvalue()


def write_image(path: Path, seed: int, fmt: str = "PNG") -> bytes:
    """Writes ``image_bytes(seed, fmt)`` to ``path`` (making its folder) and returns them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = image_bytes(seed, fmt)
    path.write_bytes(data)
    return data


def parquet(path: Path, rows: list[dict]) -> Path:
    """Writes ``rows`` as a parquet file at ``path`` (making its folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def jsonl(path: Path, rows: list[dict]) -> Path:
    """Writes ``rows`` as JSON lines at ``path`` (making its folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def mmeb_row(qry: str, qimg: str, pos: str, pimg: str, neg: str = "", nimg: str = "") -> dict:
    """One MMEB-train row: query, positive and optional hard negative, each a text and an image path."""
    return {
        "qry": qry,
        "qry_image_path": qimg,
        "pos_text": pos,
        "pos_image_path": pimg,
        "neg_text": neg,
        "neg_image_path": nimg,
    }


def mmeb_root(tmp_path: Path) -> Path:
    """OK-VQA (snapshot parquet, one row's image missing, one hard negative), MSCOCO_t2i
    (parquet-converter layout), ImageNet_1K (JSONL), VisualNews_i2t (captions sharing "A man")."""
    root = tmp_path / "MMEB-train"
    questions = ["What is shown?", "How many dogs are there?", "Which color is the car?", "Where is this?"]
    answers = ["a cat", "two", "red", "a beach"]
    rows = []
    for i, (q, a) in enumerate(zip(questions, answers, strict=True)):
        image = f"images/OK-VQA/{i}.jpg"
        if i != 3:  # row 3's image is missing on disk
            write_image(root / image, i, "JPEG")
        rows.append(mmeb_row(f"<|image_1|>\n{QA_INST} {q}\n", image, a, "", neg="a dog" if i == 0 else ""))
    parquet(root / "OK-VQA" / "original-00000-of-00001.parquet", rows)
    parquet(root / "OK-VQA" / "train-00000-of-00001.parquet", rows[:1])  # another split: never read

    captions = ["A man riding a horse on a beach.", "Two dogs play in the snow.", "A red car parked outside."]
    rows = []
    for i, caption in enumerate(captions):
        image = f"images/MSCOCO_t2i/{i}.png"
        write_image(root / image, 10 + i)
        rows.append(mmeb_row(f"{T2I_INST} {caption}\n", "", f"<|image_1|>\n{IMAGE_INST}\n", image))
    parquet(root / "MSCOCO_t2i" / "original" / "0000.parquet", rows)

    rows = []
    for i, label in enumerate(["tench", "goldfish", "great white shark", "tiger shark", "hammerhead"]):
        image = f"images/ImageNet_1K/{i}.png"
        write_image(root / image, 20 + i)
        rows.append(mmeb_row(f"<|image_1|>\n{CLS_INST}\n", image, label, ""))
    jsonl(root / "ImageNet_1K.jsonl", rows)

    rows = []
    for i, caption in enumerate(["A man speaks at a rally.", "A man walks his dog."]):
        image = f"images/VisualNews_i2t/{i}.png"
        write_image(root / image, 30 + i)
        rows.append(mmeb_row("<|image_1|>\nFind a caption for the news in the given photo.\n", image, caption, ""))
    parquet(root / "VisualNews_i2t" / "original-00000-of-00001.parquet", rows)
    return root


def visdoc(tmp_path: Path) -> tuple[Path, Path]:
    """A colpali snapshot folder (train + test files, one row without an image) and a VisRAG parquet file."""
    colpali = tmp_path / "colpali_train_set"
    rows = [
        {
            "image": {"bytes": image_bytes(40 + i), "path": f"p{i}.png"},
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
    parquet(colpali / "data" / "train-00000-of-00001.parquet", rows)
    parquet(colpali / "data" / "test-00000-of-00001.parquet", rows[:1])
    visrag = parquet(
        tmp_path / "visrag" / "train.parquet",
        [
            {
                "query": f"Which chart shows {w}?",
                "image": {"bytes": image_bytes(50 + i), "path": None},
                "source": "ChartQA",
            }
            for i, w in enumerate(["sales", "costs"])
        ],
    )
    return colpali, visrag


def video(tmp_path: Path) -> tuple[Path, Path, dict[str, list[Path]]]:
    """LLaVA-Hound annotations and frames: vid0 (10 frames), vid1 (3), vid_empty (none), vid_gone (no folder)."""
    frames_root = tmp_path / "train_300k"
    frames = {}
    for name, n in (("vid0", 10), ("vid1", 3), ("vid_empty", 0)):
        folder = frames_root / name
        folder.mkdir(parents=True)
        for i in range(1, n + 1):
            write_image(folder / f"frame_{i}.jpg", 60 + i, "JPEG")
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
    jsonl(sft / "video_caption_300k.jsonl", captions)
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
    jsonl(sft / "video_240k_caption_15k.jsonl", qa)
    return sft, frames_root, frames


def source_args(tmp_path: Path) -> list[str | Path]:
    """``mmeb-train``'s input options with every source written under ``tmp_path``: ``mmeb_root``,
    ``visdoc``'s colpali folder and VisRAG file, ``video``'s annotations and frames."""
    root = mmeb_root(tmp_path)
    colpali, visrag = visdoc(tmp_path)
    sft, frames_root, _ = video(tmp_path)
    options = {"--mmeb-root": root, "--colpali": colpali, "--visrag": visrag}
    options.update({"--video-annotations": sft, "--video-frames": frames_root})
    return [part for option, path in options.items() for part in (option, path)]


def args(*argv: str) -> argparse.Namespace:
    """``mmeb-train``'s options parsed from ``argv`` (paths allowed)."""
    parser = argparse.ArgumentParser()
    mmeb_train.add_arguments(parser)
    return parser.parse_args([str(a) for a in argv])


def read_shards(folder: Path) -> dict[str, dict]:
    """``{key: {"pair": parsed json, "record": raw json, members...}}`` of every shard in ``folder``."""
    out = {}
    for sample in wds.WebDataset([str(p) for p in sorted(folder.glob("shard-*.tar"))], shardshuffle=False):
        record = json.loads(sample["json"])
        out[sample["__key__"]] = {"pair": parse_pair_json(sample["json"]), "record": record, **sample}
    return out


def read_manifest(folder: Path) -> dict:
    """The ``manifest.json`` of a subset's shard folder."""
    return json.loads((folder / "manifest.json").read_text())

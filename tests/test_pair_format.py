"""The instruction-pair shard format: written by write_pairs / make_shards.py manifest, decoded by the datamodule's stage."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import webdataset as wds
from conftest import load_tool
from PIL import Image

from lame_pl.backbone import BackboneSpec
from lame_pl.data import DataError, Skips
from lame_pl.data.instruction_pairs import PairRow, PairSide, parse_pair_json, write_pairs
from lame_pl.data.shard_writer import EmptySplitError
from lame_pl.data.skips import SkipCounter
from lame_pl.datamodules import InstructionPairDataModule
from lame_pl.datamodules.tar_reading import TarSamples

ROOT = Path(__file__).resolve().parents[1]
SPEC = BackboneSpec(preset="tiny", min_pixels=56 * 56, max_pixels=56 * 56)


def _colour(i: int) -> tuple[int, int, int]:
    return (i * 40 % 256, 255 - i * 30 % 256, i * 70 % 256)


def _encoded(i: int, fmt: str = "PNG", side: int = 28) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (side, side), _colour(i)).save(out, format=fmt)
    return out.getvalue()


def _save(path: Path, i: int, fmt: str = "PNG") -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_encoded(i, fmt))
    return path.name


def _pixel(image: Image.Image) -> tuple[int, int, int]:
    return image.convert("RGB").getpixel((3, 3))


@pytest.fixture(scope="module")
def decode_stage():
    """The datamodule's own decode stage (what its loaders run), built once."""
    return InstructionPairDataModule(SPEC, batch_size=2, num_workers=0).decode_stage


def _decoded(decode_stage, split_dir: Path) -> tuple[dict[str, dict], dict[str, int]]:
    """Every sample of a split through TarSamples and the decode stage: ({key: sample}, skip counts)."""
    skips = SkipCounter()
    decode = decode_stage(skips)
    urls = sorted(str(p) for p in split_dir.glob("shard-*.tar"))
    pipeline = wds.DataPipeline(wds.SimpleShardList(urls), TarSamples(skips, complete=decode.complete), decode)
    samples = {s["key"]: s for s in pipeline}
    return samples, dict(skips.counts)


def _rows(root: Path) -> list[PairRow]:
    for i in range(5):
        _save(root / "clip" / f"frame_{i}.png", 10 + i)
    _save(root / "img" / "q.png", 1)
    _save(root / "img" / "neg.jpg", 2, "JPEG")
    frames = [f"clip/frame_{i}.png" for i in range(5)]
    return [
        PairRow(
            "video-query",
            PairSide("Find the caption of this video.", "", video=frames[:3]),
            PairSide("Represent the caption.", "  a clip of colours  "),
            [
                PairSide("Represent the caption.", "a still photo"),
                PairSide("Neg video.", "", video=[frames[4], str(root / frames[3])]),
            ],
            source={"row": 0},
        ),
        PairRow(
            "inline-target",
            PairSide("", "which picture?", image="img/q.png"),
            PairSide("Represent the image.", "", image=_encoded(3)),
            [PairSide("", "", image=_encoded(4, "WEBP")), PairSide("", "", image="img/neg.jpg")],
        ),
        PairRow("text-only", PairSide("Answer.", "two plus two"), PairSide("", "four")),
    ]


def test_write_pairs_round_trips_through_the_decode_stage(tmp_path: Path, decode_stage) -> None:
    skips = Skips()
    manifest = write_pairs(
        _rows(tmp_path),
        tmp_path / "out",
        image_root=tmp_path,
        samples_per_shard=2,
        shard_bytes=None,
        meta={"split": "train", "source": "test"},
        skips=skips,
    )
    assert manifest["kind"] == "instruction-pairs" and manifest["num_samples"] == 3 and manifest["skipped"] == {}
    assert [s["num_samples"] for s in manifest["shards"]] == [2, 1]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == manifest

    samples, skipped = _decoded(decode_stage, tmp_path / "out")
    assert skipped == {} and list(samples) == ["video-query", "inline-target", "text-only"]
    video = samples["video-query"]
    assert video["query"]["instruction"] == "Find the caption of this video." and video["query"]["text"] == ""
    assert video["query"]["images"] == []
    assert [_pixel(f) for f in video["query"]["video"]] == [_colour(10), _colour(11), _colour(12)]
    assert video["target"] == {
        "instruction": "Represent the caption.",
        "text": "a clip of colours",
        "images": [],
        "video": None,
    }
    still, moving = video["negatives"]
    assert still == {"instruction": "Represent the caption.", "text": "a still photo", "images": [], "video": None}
    assert moving["instruction"] == "Neg video." and [_pixel(f) for f in moving["video"]] == [_colour(14), _colour(13)]

    inline = samples["inline-target"]
    assert inline["query"]["instruction"] == "" and inline["query"]["video"] is None
    assert [_pixel(i) for i in inline["query"]["images"]] == [_colour(1)]
    assert [_pixel(i) for i in inline["target"]["images"]] == [_colour(3)]
    assert inline["target"]["instruction"] == "Represent the image."
    assert [len(n["images"]) for n in inline["negatives"]] == [1, 1]

    text = samples["text-only"]
    assert text["query"] == {"instruction": "Answer.", "text": "two plus two", "images": [], "video": None}
    assert text["target"]["text"] == "four" and text["negatives"] == []


def test_write_pairs_member_names_and_bytes(tmp_path: Path) -> None:
    rows = _rows(tmp_path)
    write_pairs(
        rows, tmp_path / "out", image_root=tmp_path, samples_per_shard=10, shard_bytes=None, meta={}, skips=Skips()
    )
    raw = {s["__key__"]: s for s in wds.WebDataset(str(tmp_path / "out" / "shard-000000.tar"), shardshuffle=False)}
    video = raw["video-query"]
    assert sorted(k for k in video if not k.startswith("__")) == [
        "json",
        "neg1_f0.png",
        "neg1_f1.png",
        "query_f0.png",
        "query_f1.png",
        "query_f2.png",
    ]
    record = json.loads(video["json"])
    assert record["query_video"] == ["query_f0.png", "query_f1.png", "query_f2.png"] and record["query_image"] is None
    assert record["target_instruction"] == "Represent the caption." and record["source"] == {"row": 0}
    assert record["negatives"][1] == {
        "instruction": "Neg video.",
        "text": "",
        "image": None,
        "video": ["neg1_f0.png", "neg1_f1.png"],
    }
    assert video["query_f1.png"] == (tmp_path / "clip" / "frame_1.png").read_bytes()  # copied, not re-encoded
    inline = raw["inline-target"]
    assert inline["target.png"] == rows[1].target.image and inline["neg0.webp"] == rows[1].negatives[0].image
    assert inline["neg1.jpg"] == (tmp_path / "img" / "neg.jpg").read_bytes()


def test_write_pairs_skips_and_counts_rows_by_reason(tmp_path: Path) -> None:
    ok = _save(tmp_path / "ok.png", 0)
    (tmp_path / "anim.gif").write_bytes(b"GIF89a" + b"\0" * 20)
    (tmp_path / "empty.png").write_bytes(b"")
    text = PairSide("", "some text")
    rows = [
        PairRow("good", PairSide("", "q", image=ok), text),
        PairRow("no-file", PairSide("", "q", image="nowhere.png"), text),
        PairRow("no-frame", PairSide("", "q", video=[ok, "gone.png"]), text),
        PairRow("gif-path", PairSide("", "q", image="anim.gif"), text),
        PairRow("gif-bytes", text, PairSide("", "", image=b"GIF89a" + b"\0" * 20)),
        PairRow("no-bytes", text, PairSide("", "t", image=b"")),
        PairRow("empty-file", text, PairSide("", "t", image="empty.png")),
        PairRow("blank-query", PairSide("Only an instruction.", "   "), text),
        PairRow("blank-target", text, PairSide("", "")),
        PairRow("blank-negative", text, text, [PairSide("Instruction only.", "")]),
        PairRow("no-frames", PairSide("", "", video=[]), text),
    ]
    skips = Skips(examples=5)
    manifest = write_pairs(
        rows, tmp_path / "out", image_root=tmp_path, samples_per_shard=10, shard_bytes=None, meta={}, skips=skips
    )
    assert manifest["num_samples"] == 1
    assert manifest["skipped"] == {
        "empty_image": 2,
        "empty_negative": 1,
        "empty_query": 1,
        "empty_target": 1,
        "empty_video": 1,
        "missing_image": 2,
        "unsupported_image_type": 2,
    }
    examples = {reason: " | ".join(where) for reason, where in skips.examples.items()}
    assert "sample no-file: query image (nowhere.png)" in examples["missing_image"]
    assert "sample no-frame: query video frame 1 (gone.png)" in examples["missing_image"]
    assert "sample gif-path" in examples["unsupported_image_type"]
    assert "sample gif-bytes: target image (inline bytes" in examples["unsupported_image_type"]
    assert "sample blank-negative" in examples["empty_negative"]


def test_write_pairs_raises_on_rows_no_source_can_mean(tmp_path: Path) -> None:
    _save(tmp_path / "a.png", 0)
    text = PairSide("", "t")

    def write(rows: list[PairRow], root: Path | None = tmp_path) -> None:
        write_pairs(
            rows, tmp_path / "out", image_root=root, samples_per_shard=10, shard_bytes=None, meta={}, skips=Skips()
        )

    with pytest.raises(DataError, match=r"sample key 'a\.b'"):
        write([PairRow("a.b", text, text)])
    with pytest.raises(DataError, match=r"sample key 'k' is used twice"):
        write([PairRow("k", text, text), PairRow("k", text, text)])
    with pytest.raises(DataError, match=r"sample k: negatives\[0\] has both an image and a video"):
        write([PairRow("k", text, text, [PairSide("", "", image="a.png", video=["a.png"])])])
    with pytest.raises(DataError, match=r"sample k: query image: path 'a\.png' is relative and no image root"):
        write([PairRow("k", PairSide("", "", image="a.png"), text)], root=None)
    with pytest.raises(DataError, match=r"sample k: target text must be a string"):
        write([PairRow("k", text, PairSide("", None))])
    with pytest.raises(DataError, match=r"'source' is not JSON-serialisable"):
        write([PairRow("k", text, text, source={"raw": b"x"})])
    # Absolute paths need no image root.
    write([PairRow("k", PairSide("", "", image=str(tmp_path / "a.png")), text)], root=None)


def test_write_pairs_with_no_survivor_names_the_skips(tmp_path: Path) -> None:
    rows = [PairRow(f"r{i}", PairSide("", "q", image=f"missing{i}.png"), PairSide("", "t")) for i in range(2)]
    with pytest.raises(EmptySplitError, match=r"(?s)no row could be written.*missing_image: 2 \(e.g. sample r0"):
        write_pairs(
            rows, tmp_path / "out", image_root=tmp_path, samples_per_shard=10, shard_bytes=None, meta={}, skips=Skips()
        )
    assert not list((tmp_path / "out").glob("shard-*.tar"))


def test_write_pairs_respects_shard_bytes(tmp_path: Path) -> None:
    rows = [
        PairRow(f"r{i}", PairSide("", f"query {i}", image=_encoded(i, side=40)), PairSide("", "t")) for i in range(6)
    ]
    manifest = write_pairs(
        rows, tmp_path / "out", image_root=None, samples_per_shard=100, shard_bytes=16 * 1024, meta={}, skips=Skips()
    )
    assert len(manifest["shards"]) > 1 and manifest["num_samples"] == 6
    assert all((tmp_path / "out" / s["url"]).stat().st_size <= 16 * 1024 for s in manifest["shards"])


# --- reading ----------------------------------------------------------------------------------


OLD_RECORD = {  # as tools/make_shards.py wrote instruction pairs before targets had instructions and sides videos
    "query_instruction": "Find the caption.",
    "query_text": "",
    "query_image": "query.png",
    "target_text": "a red circle",
    "target_image": None,
    "negatives": [{"text": "a blue square", "image": None}, {"text": "", "image": "neg1.png"}],
    "source": {"query_image": "q.png", "target_image": None, "negatives": [None, "n.png"]},
}


def test_old_format_json_still_decodes(tmp_path: Path, decode_stage) -> None:
    split = tmp_path / "old"
    split.mkdir()
    with wds.TarWriter(str(split / "shard-000000.tar")) as sink:
        sink.write(
            {
                "__key__": "000000000",
                "json": json.dumps(OLD_RECORD).encode(),
                "query.png": _encoded(5),
                "neg1.png": _encoded(6),
            }
        )
    assert parse_pair_json(json.dumps(OLD_RECORD).encode()) == {
        "query": {"instruction": "Find the caption.", "text": "", "image": "query.png", "video": None},
        "target": {"instruction": "", "text": "a red circle", "image": None, "video": None},
        "negatives": [
            {"instruction": "", "text": "a blue square", "image": None, "video": None},
            {"instruction": "", "text": "", "image": "neg1.png", "video": None},
        ],
    }
    samples, skipped = _decoded(decode_stage, split)
    assert skipped == {}
    (sample,) = samples.values()
    assert [_pixel(i) for i in sample["query"]["images"]] == [_colour(5)] and sample["query"]["video"] is None
    assert sample["target"] == {"instruction": "", "text": "a red circle", "images": [], "video": None}
    assert [n["instruction"] for n in sample["negatives"]] == ["", ""]
    assert [_pixel(i) for i in sample["negatives"][1]["images"]] == [_colour(6)]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"query_video": "query_f0.png"}, r"'query_video' must be a non-empty list"),
        ({"query_video": []}, r"'query_video' must be a non-empty list"),
        ({"query_video": ["query_f0.png"]}, r"query: has both an image and a video"),
        ({"target_instruction": 3}, r"target: 'target_instruction' must be a string"),
        ({"negatives": [{"text": "x", "instruction": None}]}, r"negatives\[0\]: 'instruction' must be a string"),
        ({"negatives": [{"text": "", "image": None, "video": None}]}, r"negatives\[0\]: has neither a text"),
        ({"query_instruction": None}, r"'query_instruction' must be a string"),
    ],
)
def test_parse_pair_json_names_the_bad_field(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_pair_json(json.dumps({**OLD_RECORD, **change}).encode())


VIDEO_RECORD = {**OLD_RECORD, "query_image": None, "query_video": ["query_f0.png", "query_f1.png"], "negatives": []}


def _decoded_videos(decode_stage, split: Path, bad: dict[str, tuple[dict, dict[str, bytes]]]):
    """A good two-frame video sample "ok" then ``bad`` ({key: (record, members)}), decoded."""
    split.mkdir()
    with wds.TarWriter(str(split / "shard-000000.tar")) as sink:
        for key, (record, members) in {
            "ok": (VIDEO_RECORD, {"query_f0.png": _encoded(1), "query_f1.png": _encoded(2)}),
            **bad,
        }.items():
            sink.write({"__key__": key, "json": json.dumps(record).encode(), **members})
    return _decoded(decode_stage, split)


def test_decode_counts_missing_frames_and_bad_json(tmp_path: Path, decode_stage) -> None:
    both = {"query_f0.png": _encoded(1), "query_f1.png": _encoded(2)}
    samples, skipped = _decoded_videos(
        decode_stage,
        tmp_path / "bad",
        {
            "lost-frame": (VIDEO_RECORD, {"query_f0.png": _encoded(1)}),
            "bad-frame": (VIDEO_RECORD, {"query_f0.png": _encoded(1), "query_f1.png": b"not an image"}),
            "both": ({**VIDEO_RECORD, "query_image": "query_f0.png"}, both),
        },
    )
    assert list(samples) == ["ok"] and [_pixel(f) for f in samples["ok"]["query"]["video"]] == [_colour(1), _colour(2)]
    assert skipped == {"missing_image": 1, "bad_image": 1, "bad_json": 1}


def test_decode_counts_frames_of_two_sizes_and_vision_tokens_in_text(tmp_path: Path, decode_stage) -> None:
    """Either would fail a whole batch in the processor; each is one bad record, counted."""
    samples, skipped = _decoded_videos(
        decode_stage,
        tmp_path / "bad",
        {
            "sizes": (VIDEO_RECORD, {"query_f0.png": _encoded(1), "query_f1.png": _encoded(2, side=42)}),
            "token": (
                {**VIDEO_RECORD, "target_text": "a <|image_pad|> caption"},
                {"query_f0.png": _encoded(1), "query_f1.png": _encoded(2)},
            ),
        },
    )
    assert list(samples) == ["ok"]
    assert skipped == {"bad_image": 1, "vision_token": 1}


# --- tools/make_shards.py manifest ------------------------------------------------------------


def _make_shards():
    return load_tool("make_shards")


def test_manifest_with_videos_and_instructions(tmp_path: Path, decode_stage, capsys) -> None:
    # Frame names sort naturally (frame_2 before frame_10); 12 frames sampled down to 4.
    for i in range(12):
        _save(tmp_path / "videos" / "v1" / f"frame_{i}.png", i)
    for i in range(2):
        _save(tmp_path / "videos" / "v2" / f"{i}.png", 20 + i)
    (tmp_path / "videos" / "empty").mkdir()
    _save(tmp_path / "q.png", 30)
    rows = [
        {
            "query_instruction": "Describe the video.",
            "query_video": "videos/v1",
            "target_text": "counting up",
            "target_instruction": "Represent the caption.",
            "negatives": ["counting down", {"instruction": "Neg.", "video": "videos/v2"}],
        },
        {"query_text": "which clip?", "query_image": "q.png", "target_video": "videos/v2"},
        {"query_text": "gone", "target_video": "videos/missing"},
        {"query_text": "nothing", "target_video": "videos/empty"},
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert _make_shards().main(["manifest", "--manifest", str(path), "--out", str(out), "--num-frames", "4"]) == 0
    manifest = json.loads((out / "train" / "manifest.json").read_text())
    assert manifest["num_samples"] == 2 and manifest["num_frames"] == 4 and manifest["kind"] == "instruction-pairs"
    assert manifest["skipped"] == {"missing_video": 1, "empty_video": 1}
    assert "missing_video: 1 (e.g. " + f"{path}:3" in capsys.readouterr().out

    samples, skipped = _decoded(decode_stage, out / "train")
    assert skipped == {}
    first = samples["000000000"]
    # numpy.linspace(0, 11, 4) truncated: frames 0, 3, 7 and 11.
    assert [_pixel(f) for f in first["query"]["video"]] == [_colour(i) for i in (0, 3, 7, 11)]
    assert first["query"]["instruction"] == "Describe the video." and first["query"]["images"] == []
    assert first["target"] == {
        "instruction": "Represent the caption.",
        "text": "counting up",
        "images": [],
        "video": None,
    }
    assert first["negatives"][0]["text"] == "counting down" and first["negatives"][0]["instruction"] == ""
    assert first["negatives"][1]["instruction"] == "Neg."
    assert [_pixel(f) for f in first["negatives"][1]["video"]] == [_colour(20), _colour(21)]
    second = samples["000000001"]
    assert [_pixel(i) for i in second["query"]["images"]] == [_colour(30)]
    assert [_pixel(f) for f in second["target"]["video"]] == [_colour(20), _colour(21)]
    raw = next(iter(wds.WebDataset(str(out / "train" / "shard-000000.tar"), shardshuffle=False)))
    assert json.loads(raw["json"])["source"]["query_video"] == "videos/v1"


def test_manifest_csv_accepts_the_new_columns(tmp_path: Path, decode_stage) -> None:
    for i in range(3):
        _save(tmp_path / "clip" / f"{i}.png", i)
    path = tmp_path / "pairs.csv"
    path.write_text(
        "query_text,query_video,target_instruction,target_text,negatives\n"
        'what happens?,clip,Represent it.,a clip,"[{""instruction"": ""N."", ""text"": ""no""}]"\n'
    )
    out = tmp_path / "out"
    assert _make_shards().main(["manifest", "--manifest", str(path), "--out", str(out)]) == 0
    samples, _ = _decoded(decode_stage, out / "train")
    sample = samples["000000000"]
    assert len(sample["query"]["video"]) == 3 and sample["target"]["instruction"] == "Represent it."
    assert sample["negatives"] == [{"instruction": "N.", "text": "no", "images": [], "video": None}]


def test_manifest_rejects_a_side_with_image_and_video(tmp_path: Path, capsys) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text(
        json.dumps({"query_text": "q", "target_text": "t"})
        + "\n"
        + json.dumps({"query_image": "a.png", "query_video": "clip", "target_text": "t"})
        + "\n"
        + json.dumps({"query_text": "q", "target_text": "t", "negatives": [{"instruction": "x"}]})
        + "\n"
    )
    with pytest.raises(SystemExit):
        _make_shards().main(["manifest", "--manifest", str(path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert f"{path}:2: query_image and query_video are both given" in err
    assert not (tmp_path / "out").exists()
    path.write_text(json.dumps({"query_text": "q", "target_text": "t", "negatives": [{"instruction": "x"}]}) + "\n")
    with pytest.raises(SystemExit):
        _make_shards().main(["manifest", "--manifest", str(path), "--out", str(tmp_path / "out")])
    assert f"{path}:1: negatives[0] has neither a text nor an image or video" in capsys.readouterr().err


def test_video_shards_load_as_batches(tmp_path: Path) -> None:
    """The written format through the whole loader (decode, then the collator) with a video query."""
    write_pairs(
        _rows(tmp_path),
        tmp_path / "out",
        image_root=tmp_path,
        samples_per_shard=10,
        shard_bytes=None,
        meta={},
        skips=Skips(),
    )
    dm = InstructionPairDataModule(SPEC, val_shards=str(tmp_path / "out"), batch_size=3, num_workers=0)
    (batch,) = list(dm.val_dataloader())
    assert batch["keys"] == ["video-query", "inline-target", "text-only"] and batch["skipped"] == {}
    assert batch["query"]["video_grid_thw"].shape[0] == 1  # one video among the queries
    assert batch["negative"]["video_grid_thw"].shape[0] == 1 and batch["negative"]["input_ids"].shape[0] == 4
    assert batch["texts"] == ["a clip of colours", "", "four"]

"""``make_shards.py mmeb-train`` (lame_pl.data.mmeb_train): VLM2Vec-V2's training sources to shards.

Every fixture is written by the test in the layout a user has after VLM2Vec's download script:
MMEB-train parquet (Hugging Face snapshot and parquet-converter layouts) and JSONL subsets with
image files, colpali and VisRAG parquet with inline page images, LLaVA-Hound JSONL with frame folders.
The instruction split the converter applies has its own tests (tests/test_instruction_split.py);
the fixture builders live in tests/mmeb_train_fixtures.py (tests/test_configs.py uses them too).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import webdataset as wds
import yaml
from mmeb_train_fixtures import (
    CLS_INST,
    IMAGE_INST,
    QA_INST,
    T2I_INST,
    args,
    image_bytes,
    jsonl,
    mmeb_root,
    mmeb_row,
    parquet,
    read_manifest,
    read_shards,
    source_args,
    video,
    visdoc,
    write_image,
)
from PIL import Image

from lame_pl.data import mmeb_train
from lame_pl.data.instruction_pairs import DecodeInstructionPairs
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
    root = mmeb_root(tmp_path)
    out = tmp_path / "out"
    mmeb_train.run(args("--mmeb-root", root, "--out", out))
    printed = capsys.readouterr().out
    assert "found 4 subsets: ImageNet_1K, OK-VQA, VisualNews_i2t, MSCOCO_t2i" in printed
    assert "not found (21):" in printed and "colpali_train_set: no --colpali" in printed
    assert "\n  N24News, HatefulMemes, VOC2007, SUN397, A-OKVQA, DocVQA, " in printed
    assert f"OK-VQA: instructions (inferred): query {QA_INST!r}, target ''" in printed

    okvqa = read_shards(out / "OK-VQA")
    assert sorted(okvqa) == ["000000000", "000000001", "000000002"]  # row 3's image is missing
    first = okvqa["000000000"]["pair"]
    assert first["query"]["instruction"] == QA_INST and first["query"]["text"] == "What is shown?"
    assert first["target"] == {"instruction": "", "text": "a cat", "image": None, "video": None}
    assert [n["text"] for n in first["negatives"]] == ["a dog"]
    assert okvqa["000000000"][first["query"]["image"]] == (root / "images/OK-VQA/0.jpg").read_bytes()
    manifest = read_manifest(out / "OK-VQA")
    assert manifest["skipped"] == {"missing_image": 1} and manifest["num_samples"] == 3
    assert manifest["query_instruction"] == QA_INST and manifest["row_cap"] == 10_000 and manifest["rows"] == 4
    assert manifest["inputs"][0].endswith("OK-VQA/original-00000-of-00001.parquet")

    t2i = read_shards(out / "MSCOCO_t2i")
    for sample in t2i.values():
        pair = sample["pair"]
        assert pair["query"]["instruction"] == T2I_INST and not pair["query"]["text"].startswith("Find")
        # The target is image-only: its constant prompt is an instruction, never decoder text.
        assert pair["target"]["instruction"] == IMAGE_INST and pair["target"]["text"] == ""
        assert pair["target"]["image"] is not None
    imagenet = read_shards(out / "ImageNet_1K")
    assert {s["pair"]["query"]["instruction"] for s in imagenet.values()} == {CLS_INST}
    assert {s["pair"]["query"]["text"] for s in imagenet.values()} == {""}
    assert sorted(s["pair"]["target"]["text"] for s in imagenet.values())[0] == "goldfish"
    news = read_shards(out / "VisualNews_i2t")
    assert sorted(s["pair"]["target"]["text"] for s in news.values()) == [
        "A man speaks at a rally.",
        "A man walks his dog.",
    ]
    # No target text anywhere starts with its subset's target instruction.
    for name in ("OK-VQA", "MSCOCO_t2i", "ImageNet_1K", "VisualNews_i2t"):
        instruction = read_manifest(out / name)["target_instruction"]
        for sample in read_shards(out / name).values():
            text = sample["pair"]["target"]["text"]
            assert not (instruction and text.startswith(instruction)), (name, text)


def test_mixture_yaml_lists_the_sets_written(tmp_path: Path) -> None:
    out = tmp_path / "out"
    subsets = "video_qa_240k,OK-VQA,colpali_train_set,visrag-indomain,video_caption_300k-video"
    mmeb_train.run(args(*source_args(tmp_path), "--out", out, "--subsets", subsets))
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
        assert count_samples(urls) == read_manifest(Path(item.shards))["num_samples"]


def test_visual_documents(tmp_path: Path) -> None:
    colpali, visrag = visdoc(tmp_path)
    out = tmp_path / "out"
    mmeb_train.run(args("--colpali", colpali, "--visrag", visrag, "--out", out))
    pages = read_shards(out / "colpali_train_set")
    assert sorted(pages) == ["000000000", "000000001", "000000002"]  # the test file is not read; row 3 has no image
    pair = pages["000000001"]["pair"]
    assert pair["query"] == {"instruction": "", "text": "What is on page 1?", "image": "query.png", "video": None}
    assert pair["target"]["text"] == "answer 1" and pair["target"]["image"] is None
    assert pages["000000001"]["query.png"] == image_bytes(41)
    assert read_manifest(out / "colpali_train_set")["skipped"] == {"missing_image": 1}
    docs = read_shards(out / "visrag-indomain")
    pair = docs["000000001"]["pair"]
    assert (
        pair["query"]["instruction"] == VISDOC_QUERY_INSTRUCTION and pair["query"]["text"] == "Which chart shows costs?"
    )
    assert pair["target"]["instruction"] == VISDOC_PAGE_TEXT and pair["target"]["text"] == ""
    assert docs["000000001"]["target.png"] == image_bytes(51)


def test_video_sets_sample_frames_and_count_empty_folders(tmp_path: Path) -> None:
    sft, frames_root, frames = video(tmp_path)
    out = tmp_path / "out"
    mmeb_train.run(args("--video-annotations", sft, "--video-frames", frames_root, "--out", out))
    captions = read_shards(out / "video_caption_300k")
    assert sorted(captions) == ["000000000", "000000001"]
    sample = captions["000000000"]
    pair = sample["pair"]
    assert pair["query"]["instruction"] == "Describe the video in detail." and pair["query"]["text"] == ""
    assert len(pair["query"]["video"]) == 8  # 10 frames -> VLM2Vec-V2's 8
    assert [sample[m] for m in pair["query"]["video"]] == [p.read_bytes() for p in frames["vid0"]]
    assert pair["target"]["text"] == "Caption of vid0." and pair["target"]["video"] is None
    assert len(captions["000000001"]["pair"]["query"]["video"]) == 3  # fewer frames than 8: all of them
    manifest = read_manifest(out / "video_caption_300k")
    assert manifest["skipped"] == {"empty_video": 1, "missing_video": 1} and manifest["num_frames"] == 8

    retrieval = read_shards(out / "video_caption_300k-video")["000000000"]["pair"]
    assert retrieval["query"] == {
        "instruction": VIDEO_RETRIEVAL_QUERY_INSTRUCTION,
        "text": "Caption of vid0.",
        "image": None,
        "video": None,
    }
    assert retrieval["target"]["instruction"] == VIDEO_RETRIEVAL_TARGET_INSTRUCTION
    assert retrieval["target"]["text"] == "" and len(retrieval["target"]["video"]) == 8

    qa = read_shards(out / "video_qa_240k")["000000000"]["pair"]  # from video_240k_caption_15k.jsonl
    assert qa["query"]["instruction"] == VIDEO_QA_INSTRUCTION and qa["query"]["text"] == "What happens first?"
    assert len(qa["query"]["video"]) == 3 and qa["target"]["text"] == "A door opens."

    mmeb_train.run(
        args(
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
    pair = read_shards(out / "video_caption_300k")["000000000"]["pair"]
    assert len(pair["query"]["video"]) == 2 and read_manifest(out / "video_caption_300k")["num_frames"] == 2


def test_shards_decode_through_the_datamodule(tmp_path: Path) -> None:
    root = mmeb_root(tmp_path)
    sft, frames_root, _ = video(tmp_path)
    out = tmp_path / "out"
    mmeb_train.run(
        args(
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
    root = mmeb_root(tmp_path)
    monkeypatch.setitem(SUBSET_BY_NAME, "ImageNet_1K", replace(SUBSET_BY_NAME["ImageNet_1K"], row_cap=3))
    out = tmp_path / "out"
    mmeb_train.run(args("--mmeb-root", root, "--subsets", "ImageNet_1K", "--out", out))
    manifest = read_manifest(out / "ImageNet_1K")
    assert manifest["num_samples"] == 3 and manifest["row_cap"] == 3 and manifest["rows"] == 3
    assert sorted(read_shards(out / "ImageNet_1K")) == ["000000000", "000000001", "000000002"]  # the first rows
    # The instruction is still read off every row, not only the capped ones.
    assert manifest["query_instruction"] == CLS_INST
    mmeb_train.run(args("--mmeb-root", root, "--subsets", "ImageNet_1K", "--out", out, "--overwrite", "--no-row-caps"))
    manifest = read_manifest(out / "ImageNet_1K")
    assert manifest["num_samples"] == 5 and manifest["row_cap"] is None
    mmeb_train.run(
        args("--mmeb-root", root, "--subsets", "ImageNet_1K", "--out", out, "--overwrite", "--max-rows", "2")
    )
    assert read_manifest(out / "ImageNet_1K")["num_samples"] == 2
    assert len(list((out / "ImageNet_1K").glob("shard-*.tar"))) == 1


def test_single_row_subset_needs_its_instructions(tmp_path: Path) -> None:
    root = tmp_path / "MMEB-train"
    write_image(root / "images/A-OKVQA/0.png", 0)
    parquet(
        root / "A-OKVQA" / "original-00000-of-00001.parquet",
        [mmeb_row(f"<|image_1|>\n{QA_INST} What is shown?\n", "images/A-OKVQA/0.png", "a cat", "")],
    )
    out = tmp_path / "out"
    with pytest.raises(DataError, match="single row.*--query-instruction and --target-instruction"):
        mmeb_train.run(args("--mmeb-root", root, "--out", out))
    assert not (out / "mixture.yaml").exists()
    mmeb_train.run(
        args(
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
    pair = read_shards(out / "A-OKVQA")["000000000"]["pair"]
    assert (pair["query"]["instruction"], pair["query"]["text"]) == (QA_INST, "What is shown?")
    assert (pair["target"]["instruction"], pair["target"]["text"]) == ("", "a cat")
    assert read_manifest(out / "A-OKVQA")["instruction_origin"] == "given"


def test_rows_that_miss_a_given_instruction_are_skipped_and_counted(tmp_path: Path) -> None:
    root = mmeb_root(tmp_path)
    out = tmp_path / "out"
    mmeb_train.run(
        args("--mmeb-root", root, "--out", out, "--subsets", "VisualNews_i2t", "--target-instruction", "A man speaks")
    )
    manifest = read_manifest(out / "VisualNews_i2t")
    assert manifest["num_samples"] == 1 and manifest["skipped"] == {"instruction_mismatch": 1}
    assert read_shards(out / "VisualNews_i2t")["000000000"]["pair"]["target"]["text"] == "at a rally."


def test_a_subset_with_nothing_left_fails_but_the_others_are_written(tmp_path: Path) -> None:
    root = mmeb_root(tmp_path)
    for image in (root / "images" / "MSCOCO_t2i").iterdir():
        image.unlink()
    out = tmp_path / "out"
    with pytest.raises(
        DataError,
        match=r"1 of 4 subsets failed: MSCOCO_t2i: no row could be written to .* \(MMEB-train image paths are read from --image-root",
    ):
        mmeb_train.run(args("--mmeb-root", root, "--out", out))
    assert not list((out / "MSCOCO_t2i").glob("*"))
    sets = yaml.safe_load((out / "mixture.yaml").read_text())["data"]["init_args"]["train_mixture"]
    assert [s["name"] for s in sets] == ["ImageNet_1K", "OK-VQA", "VisualNews_i2t"]


def test_bad_options_and_inputs_name_what_is_wrong(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = mmeb_root(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(SystemExit):
        args("--out", out, "--subsets", "ImageNet_1K,NoSuchSet")
    assert "unknown subset 'NoSuchSet'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        args("--out", out, "--no-row-caps", "--max-rows", "3")
    with pytest.raises(DataError, match="--mmeb-root '.*nowhere' is not a directory"):
        mmeb_train.run(args("--mmeb-root", tmp_path / "nowhere", "--out", out))
    with pytest.raises(DataError, match="--query-instruction applies to one MMEB-train subset"):
        mmeb_train.run(args("--mmeb-root", root, "--out", out, "--query-instruction", "x"))
    with pytest.raises(DataError, match="subset N24News: input not found"):
        mmeb_train.run(args("--mmeb-root", root, "--out", out, "--subsets", "N24News"))
    with pytest.raises(DataError, match="no input found for any subset"):
        mmeb_train.run(args("--out", out))
    with pytest.raises(DataError, match="OK-VQA holds no test-\\*.parquet"):
        mmeb_train.run(args("--mmeb-root", root, "--out", out, "--subsets", "OK-VQA", "--split", "test"))
    sft = tmp_path / "sft"
    jsonl(sft / "video_caption_300k.jsonl", [{"video": "v", "conversations": []}])
    with pytest.raises(DataError, match="--video-frames is not"):
        mmeb_train.run(args("--video-annotations", sft, "--out", out))
    with pytest.raises(DataError, match=r"video_caption_300k.jsonl:1: 'conversations' must be a list of at least two"):
        mmeb_train.run(
            args(
                "--video-annotations", sft, "--video-frames", tmp_path, "--out", out, "--subsets", "video_caption_300k"
            )
        )
    (sft / "video_caption_300k.jsonl").write_text('{"video": "v", "conversations": [}\n')
    with pytest.raises(DataError, match=r"video_caption_300k.jsonl:1: not valid JSON"):
        mmeb_train.run(
            args(
                "--video-annotations", sft, "--video-frames", tmp_path, "--out", out, "--subsets", "video_caption_300k"
            )
        )
    bad = tmp_path / "bad"
    parquet(bad / "CIRR" / "original-00000-of-00001.parquet", [{"qry": "x", "pos_text": "y"}])
    with pytest.raises(DataError, match=r"CIRR/original-00000-of-00001.parquet: missing column 'qry_image_path'"):
        mmeb_train.run(args("--mmeb-root", bad, "--out", out))
    parquet(bad / "NIGHTS" / "original-00000-of-00001.parquet", [{**mmeb_row("a", "", "b", ""), "qry": 3}])
    with pytest.raises(DataError, match=r"NIGHTS/original-00000-of-00001.parquet row 0: field 'qry' must be a string"):
        mmeb_train.run(args("--mmeb-root", bad, "--out", out, "--subsets", "NIGHTS"))
    with pytest.raises(DataError, match="--colpali '.*' does not exist"):
        mmeb_train.run(args("--colpali", tmp_path / "none.parquet", "--out", out))
    colpali = tmp_path / "only_test"
    parquet(colpali / "test-00000-of-00001.parquet", [{"query": "q", "image": None, "answer": "a"}])
    with pytest.raises(DataError, match="no train\\*.parquet or train\\*.jsonl file in the folder"):
        mmeb_train.run(args("--colpali", colpali, "--out", out))


def test_non_empty_output_needs_overwrite_and_bad_input_keeps_old_shards(tmp_path: Path) -> None:
    root = mmeb_root(tmp_path)
    out = tmp_path / "out"
    mmeb_train.run(args("--mmeb-root", root, "--out", out, "--subsets", "ImageNet_1K"))
    before = read_shards(out / "ImageNet_1K")
    with pytest.raises(DataError, match="ImageNet_1K.*not empty; pass --overwrite"):
        mmeb_train.run(args("--mmeb-root", root, "--out", out, "--subsets", "ImageNet_1K"))
    (root / "ImageNet_1K.jsonl").write_text('{"qry": "x"}\n')  # malformed now
    with pytest.raises(DataError, match="ImageNet_1K.jsonl:1: missing field 'qry_image_path'"):
        mmeb_train.run(args("--mmeb-root", root, "--out", out, "--subsets", "ImageNet_1K", "--overwrite"))
    assert read_shards(out / "ImageNet_1K").keys() == before.keys()  # the bad input cost nothing


def test_mixture_overlay_trains_through_the_datamodule(tmp_path: Path, tiny_spec) -> None:
    out = tmp_path / "out"
    mmeb_train.run(args(*source_args(tmp_path), "--subsets", "OK-VQA,colpali_train_set,video_qa_240k", "--out", out))
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

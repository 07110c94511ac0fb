"""A user's own corpus (a folder of images, a file of lines): predict -> index -> search, resume, bad inputs."""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_tool
from PIL import Image
from safetensors.torch import load_file

from lame_pl.cli import build_cli
from lame_pl.embeddings_folder import SUMMARY_FILE, load_embeddings, shard_metadata
from lame_pl.index import load_index
from lame_pl.module import LaMEModule

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "tests" / "conf" / "tiny.yaml"
IMAGES = ["a.png", "b.png", "c.jpg", "e.png", "sub/d.png"]  # readable; bad.png is not
LINES = [
    "a red circle at the top left",
    "",
    "two blue squares in the center",
    "three purple squares on the left",
    "a green triangle at the bottom right",
]


index_tool, search_tool = load_tool("index"), load_tool("search")


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    """LightningCLI warns when both sys.argv and ``args`` are given."""
    monkeypatch.setattr(sys, "argv", ["lightning"])


@pytest.fixture(scope="module")
def ckpt(module_tmp, synthetic_shards) -> Path:
    """A one-step fit of the tiny model: the weights every predict and search here uses."""
    tmp = module_tmp("fit")
    shards = synthetic_shards(8, 4, 4, 8)
    sys.argv = ["lightning"]
    build_cli(
        [
            "fit",
            f"--config={CONF}",
            f"--data.init_args.train_shards={shards / 'train'}",
            "--trainer.max_steps=1",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp}",
            "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
            f"--trainer.callbacks.dirpath={tmp / 'ckpt'}",
            "--trainer.callbacks.save_last=true",
        ]
    )
    return tmp / "ckpt" / "last.ckpt"


@pytest.fixture(scope="module")
def corpus(module_tmp) -> dict[str, Path]:
    """Five tiny images (one in a subfolder), a corrupt one, a non-image, and a text file with a blank line."""
    tmp = module_tmp("corpus")
    rng = random.Random(0)
    for name in IMAGES:
        (tmp / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.frombytes("RGB", (56, 56), bytes(rng.getrandbits(8) for _ in range(56 * 56 * 3))).save(
            tmp / "images" / name
        )
    (tmp / "images" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp / "images" / "notes.txt").write_text("not an image")
    (tmp / "lines.txt").write_text("\n".join(LINES) + "\n", encoding="utf-8")
    return {"images": tmp / "images", "texts": tmp / "lines.txt", "tmp": tmp}


TRAINED_QUERY_INSTRUCTION = "Find the caption that describes this image."  # ImageTextDataModule's default


def predict(
    ckpt: Path, out: Path, *data: str, resume: bool = False, rows_per_shard: int = 2, batch_size: int = 2
) -> None:
    """``lightning predict`` of a corpus into ``out``, two items a batch."""
    build_cli(
        [
            "predict",
            f"--config={CONF}",
            "--data=datamodules.CorpusDataModule",
            *data,
            f"--data.batch_size={batch_size}",
            f"--ckpt_path={ckpt}",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={out.parent}",
            "--trainer.callbacks+=callbacks.EmbeddingWriter",
            f"--trainer.callbacks.path={out}",
            f"--trainer.callbacks.rows_per_shard={rows_per_shard}",
            f"--trainer.callbacks.resume={resume}",
        ]
    )


@pytest.fixture(scope="module")
def image_embeddings(ckpt, corpus, module_tmp) -> Path:
    out = module_tmp("image_run") / "embeddings"
    with pytest.warns(UserWarning, match=r"5 rows in .* skipped 1 unreadable item\(s\), e\.g\. bad\.png"):
        predict(ckpt, out, f"--data.images={corpus['images']}")
    return out


def test_an_image_folder_is_embedded_as_queries_keyed_by_relative_path(image_embeddings):
    saved = load_embeddings(image_embeddings)
    assert saved.keys == sorted(IMAGES) and saved.texts == saved.keys
    assert saved.target is None and saved.query.shape[0] == len(IMAGES)
    assert torch.allclose(saved.query.norm(dim=-1), torch.ones(len(IMAGES)), atol=1e-4)
    # Laid out as the training run laid out its image queries: its query instruction (the default).
    assert (saved.corpus, saved.instruction, saved.skipped) == ("images", TRAINED_QUERY_INSTRUCTION, ["bad.png"])
    summary = json.loads((image_embeddings / SUMMARY_FILE).read_text())
    assert summary["rows"] == summary["computed"] == len(IMAGES) and summary["resumed"] == 0
    assert (summary["skipped"], summary["skipped_examples"], summary["corpus"]) == (1, ["bad.png"], "images")


def test_the_loader_reports_unreadable_images_by_key_and_a_batch_of_them_alone_is_written_as_nothing(
    ckpt, corpus, tiny_spec, tmp_path
):
    from lame_pl.datamodules import CorpusDataModule

    data = CorpusDataModule(tiny_spec, images=str(corpus["images"]), batch_size=2)
    batches = list(data.predict_dataloader())
    assert [b["keys"] for b in batches] == [["a.png", "b.png"], ["c.jpg"], ["e.png", "sub/d.png"]]
    assert batches[1]["skipped"] == {"bad_image": 1} and batches[1]["skipped_keys"] == ["bad.png"]
    assert all("query" in b and "target" not in b for b in batches)
    assert batches[0]["query"]["pixel_values"].shape[0] > 0
    lone = list(CorpusDataModule(tiny_spec, images=str(corpus["images"]), batch_size=1).predict_dataloader())[2]
    assert (lone["keys"], lone["skipped_keys"], "query" in lone) == ([], ["bad.png"], False)
    out = tmp_path / "embeddings"
    with pytest.warns(UserWarning, match=r"5 rows in .* skipped 1 unreadable"):
        predict(ckpt, out, f"--data.images={corpus['images']}", batch_size=1)
    assert load_embeddings(out).keys == sorted(IMAGES)


def test_fewer_items_left_than_ranks_is_an_error_naming_both(corpus, tiny_spec):
    from types import SimpleNamespace

    from lame_pl.datamodules import CorpusDataModule

    data = CorpusDataModule(tiny_spec, images=str(corpus["images"]), batch_size=2)
    data.trainer = SimpleNamespace(world_size=2)
    assert len(data.predict_dataloader()) == 3  # six items: every rank gets some
    data.skip_predicted(set(data.items.keys[1:]))  # a resume with one item left
    with pytest.raises(ValueError, match=r"1 item\(s\) of .* left to embed, fewer than the 2 ranks"):
        data.predict_dataloader()
    data.skip_predicted(set(data.items.keys))  # nothing left: an empty loader, as on one process
    assert len(data.predict_dataloader()) == 0


def test_an_image_corpus_indexes_its_side_and_an_image_finds_itself(image_embeddings, ckpt, corpus, capsys):
    out = image_embeddings.parent / "index"
    index_tool.main(["--embeddings", str(image_embeddings), "--out", str(out)])
    assert "indexed 5 query rows of the images corpus" in capsys.readouterr().out
    index = load_index(out)
    assert (index.meta["side"], index.meta["corpus"], index.keys) == ("query", "images", sorted(IMAGES))
    # An image query gets the corpus's instruction, so it embeds exactly as the corpus did.
    search_tool.main(
        [
            "--index",
            str(out),
            "--checkpoint",
            str(ckpt),
            "--image",
            str(corpus["images"] / "sub/d.png"),
            "-k",
            "3",
            "--json",
        ]
    )
    hits = json.loads(capsys.readouterr().out)["queries"][0]["hits"]
    assert hits[0]["key"] == "sub/d.png" and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert len(hits) == 3


def test_a_text_file_is_embedded_as_captions_and_a_line_finds_itself(ckpt, corpus, tmp_path, capsys):
    out = tmp_path / "embeddings"
    predict(ckpt, out, f"--data.texts={corpus['texts']}")
    saved = load_embeddings(out)
    assert saved.keys == ["line1", "line3", "line4", "line5"] and saved.texts == [t for t in LINES if t]
    assert saved.query is None and saved.corpus == "texts"
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert (summary["rows"], summary["blank_lines"], summary["skipped"]) == (4, 1, 0)
    index_tool.main(["--embeddings", str(out), "--out", str(tmp_path / "index")])
    capsys.readouterr()
    search_tool.main(["--index", str(tmp_path / "index"), "--checkpoint", str(ckpt), "--text", LINES[2], "-k", "10"])
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"query {LINES[2]}"
    assert printed[1].split()[0] == "1." and printed[1].split()[2:] == ["line3", *LINES[2].split()]
    assert float(printed[1].split()[1]) == pytest.approx(1.0, abs=1e-4)
    assert len(printed) == 1 + 4  # -k 10 over 4 rows: every row once


def test_resume_encodes_only_the_missing_rows_and_ends_as_a_fresh_run(
    image_embeddings, ckpt, corpus, tmp_path, monkeypatch
):
    fresh = image_embeddings  # two items a batch, two rows a shard: [a, b] | [bad, c] + [e, sub/d]
    shards = sorted(p.name for p in fresh.glob("*.safetensors"))
    assert shards == ["rank000-000000000.safetensors", "rank000-000000002.safetensors"]
    resumed = tmp_path / "embeddings"
    shutil.copytree(fresh, resumed)
    (resumed / shards[-1]).unlink()  # a run killed while writing its last shard: its .jsonl is left
    encoded: list[int] = []
    encode = LaMEModule.encode

    def counting(self, inputs, *args, **kwargs):
        encoded.append(int(inputs["input_ids"].shape[0]))
        return encode(self, inputs, *args, **kwargs)

    monkeypatch.setattr(LaMEModule, "encode", counting)
    with pytest.warns(UserWarning, match=r"\(3 computed, 2 kept\)"):
        predict(ckpt, resumed, f"--data.images={corpus['images']}", resume=True)
    assert sum(encoded) == 3  # c, e and sub/d; bad.png is tried again and skipped again
    summary = json.loads((resumed / SUMMARY_FILE).read_text())
    assert (summary["computed"], summary["resumed"], summary["rows"], summary["skipped"]) == (3, 2, 5, 1)
    assert sorted(p.name for p in resumed.iterdir()) == sorted(p.name for p in fresh.iterdir())
    for shard in shards:
        assert (resumed / shard).with_suffix(".jsonl").read_text() == (fresh / shard).with_suffix(".jsonl").read_text()
        assert shard_metadata(resumed / shard) == shard_metadata(fresh / shard)
        got, want = load_file(resumed / shard), load_file(fresh / shard)
        assert got.keys() == want.keys() and all(torch.allclose(got[k], want[k], atol=1e-5) for k in want)
    # Everything is there now: a third run encodes nothing and keeps the shards.
    encoded.clear()
    predict(ckpt, resumed, f"--data.images={corpus['images']}", resume=True)
    assert encoded == [] and json.loads((resumed / SUMMARY_FILE).read_text())["computed"] == 0
    assert load_embeddings(resumed).keys == sorted(IMAGES)


def test_resume_refuses_a_folder_of_another_corpus(image_embeddings, ckpt, corpus, tmp_path):
    other = tmp_path / "embeddings"
    shutil.copytree(image_embeddings, other)
    with pytest.raises(
        ValueError,
        match=r"EmbeddingWriter.resume: .*rank000-000000000.safetensors was embedded with "
        r"other corpus, source, .*lines.txt.*; give another path or resume false",
    ):
        predict(ckpt, other, f"--data.texts={corpus['texts']}", resume=True)
    assert len(list(other.glob("*.safetensors"))) == 2  # nothing removed


def test_resume_refuses_rows_of_another_checkpoint(image_embeddings, ckpt, corpus, tmp_path):
    """Rows embedded by one checkpoint are never kept for another (here: the same weights in another file)."""
    other = tmp_path / "embeddings"
    shutil.copytree(image_embeddings, other)
    second = tmp_path / "other.ckpt"
    shutil.copy(ckpt, second)
    with pytest.raises(ValueError, match=r"rank000-000000000.safetensors was embedded with other model .*other.ckpt"):
        predict(second, other, f"--data.images={corpus['images']}", resume=True)
    assert len(list(other.glob("*.safetensors"))) == 2  # nothing removed


def test_resume_refuses_a_text_file_that_changed(tmp_path, ckpt, corpus):
    lines = tmp_path / "lines.txt"
    lines.write_text(Path(corpus["texts"]).read_text())
    out = tmp_path / "embeddings"
    predict(ckpt, out, f"--data.texts={lines}", resume=True)
    lines.write_text(lines.read_text() + "one more line\n")
    with pytest.raises(ValueError, match=r"was embedded with other content"):
        predict(ckpt, out, f"--data.texts={lines}", resume=True)


def test_without_resume_a_rerun_replaces_the_earlier_shards(image_embeddings, ckpt, corpus, tmp_path):
    out = tmp_path / "embeddings"
    shutil.copytree(image_embeddings, out)
    predict(ckpt, out, f"--data.texts={corpus['texts']}", rows_per_shard=10)
    assert [p.name for p in out.glob("*.safetensors")] == ["rank000-000000000.safetensors"]
    assert load_embeddings(out).corpus == "texts"


@pytest.mark.parametrize(
    "data, message",
    [
        (["--data.images={tmp}/nowhere"], "data.images {tmp}/nowhere: no such folder"),
        (["--data.images={tmp}/empty"], "data.images {tmp}/empty: holds no png/jpg/jpeg/webp image"),
        (["--data.texts={tmp}/blank.txt"], "data.texts {tmp}/blank.txt: holds no text (2 blank lines)"),
        (["--data.texts={tmp}/missing.txt"], "data.texts {tmp}/missing.txt: no such file"),
        (
            ["--data.images={tmp}/empty", "--data.texts={tmp}/blank.txt"],
            "give data.images or data.texts, not both (got {tmp}/empty and {tmp}/blank.txt)",
        ),
        ([], "give data.images=FOLDER or data.texts=FILE"),
    ],
)
def test_bad_corpus_inputs_fail_in_one_line_naming_them(data, message, tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("no image here")
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(SystemExit) as done:
        build_cli(
            [
                "predict",
                f"--config={CONF}",
                "--data=datamodules.CorpusDataModule",
                *[d.format(tmp=tmp_path) for d in data],
                "--trainer.logger=false",
            ]
        )
    assert str(done.value.code) == "error: " + message.format(tmp=tmp_path)


def test_resume_on_a_streamed_split_warns_and_recomputes(ckpt, tmp_path, synthetic_shards):
    shards = synthetic_shards(8, 4, 4, 8)  # ckpt's
    out = tmp_path / "embeddings"
    common = [
        "predict",
        f"--config={CONF}",
        f"--data.init_args.test_shards={shards / 'test'}",
        f"--ckpt_path={ckpt}",
        "--trainer.logger=false",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.callbacks+=callbacks.EmbeddingWriter",
        f"--trainer.callbacks.path={out}",
        "--trainer.callbacks.resume=true",
    ]
    build_cli(common)
    first = load_embeddings(out)
    with pytest.warns(UserWarning, match="ImageTextDataModule streams its rows and cannot skip those already written"):
        build_cli(common)
    again = load_embeddings(out)
    assert again.keys == first.keys and json.loads((out / SUMMARY_FILE).read_text())["computed"] == 4
    assert torch.allclose(again.query, first.query, atol=1e-5)


def test_an_explicit_instruction_wins_over_the_trained_one(ckpt, corpus, tmp_path):
    out = tmp_path / "embeddings"
    predict(ckpt, out, f"--data.images={corpus['images']}", "--data.instruction=")
    assert load_embeddings(out).instruction == ""

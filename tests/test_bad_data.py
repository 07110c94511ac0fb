"""Bad data ends in an error naming the shards or in a counted skip, never in a hang or a silent result (issue 12)."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import tarfile
import textwrap
import tracemalloc
from pathlib import Path

import pytest
from lightning import Trainer
from PIL import Image
from test_data_robust import datamodule as eval_dm
from test_data_robust import read_all, write

from lame_pl import LaMEModule
from lame_pl.backbone import BackboneSpec, DecoderSpec, qwen2_tokenizer
from lame_pl.callbacks import DataHealth
from lame_pl.data.skips import BadSampleError, NoGoodSamplesError, SkipCounter
from lame_pl.datamodules import ImageTextDataModule
from lame_pl.datamodules.collate import PairCollator
from lame_pl.datamodules.shards import expand_shards
from lame_pl.datamodules.tar_reading import TarSamples
from lame_pl.decoder_vocab import caption_token_ids

SPEC = BackboneSpec(preset="tiny", min_pixels=56 * 56, max_pixels=56 * 56)
ROOT = Path(__file__).resolve().parents[1]


def png(seed: int = 0, side: int = 56, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (side, side), (seed * 37 % 256, seed * 91 % 256, 80)).save(out, format=fmt)
    return out.getvalue()


def good(key: str, seed: int = 0, text: str | None = None) -> dict:
    return {"__key__": key, "png": png(seed), "txt": text if text is not None else f"caption of {key}"}


def bad(key: str) -> dict:
    return {"__key__": key, "png": b"not an image", "txt": "x"}


# --- 7: a training set of only bad samples stops, it does not spin ------------------------------

TRAIN_SCRIPT = textwrap.dedent("""
    import sys
    from lame_pl.datamodules import ImageTextDataModule
    from lame_pl.backbone import BackboneSpec
    spec = BackboneSpec(preset="tiny", min_pixels=56 * 56, max_pixels=56 * 56)
    extra = dict(max_consecutive_skips=int(sys.argv[3])) if sys.argv[3] != "default" else {}
    dm = ImageTextDataModule(spec, train_shards=sys.argv[1], samples_per_epoch=8, batch_size=2,
                             num_workers=int(sys.argv[2]), shuffle_buffer=1, **extra)
    for batch in dm.train_dataloader():
        print("BATCH", batch["keys"], flush=True)
    print("END", flush=True)
""")


def run_training(shards: Path, workers: int, limit: str) -> subprocess.CompletedProcess:
    """Iterate the training loader in a subprocess, so that a regression (a spinning worker) fails, not hangs."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        return subprocess.run(
            [sys.executable, "-c", TRAIN_SCRIPT, str(shards), str(workers), limit],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=150,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"the training loader over {shards} still ran after 150 s: it spins on bad samples")


@pytest.mark.parametrize("workers", [0, 1])
def test_training_on_only_bad_samples_stops_naming_the_shards(tmp_path: Path, workers: int) -> None:
    for s in range(2):
        write(tmp_path / f"shard-{s:06d}.tar", [bad(f"s{s}_{i}") for i in range(10)])
    done = run_training(tmp_path, workers, "50")
    assert done.returncode != 0 and "BATCH" not in done.stdout
    last = done.stderr.strip().splitlines()[-1]
    assert "NoGoodSamplesError" in last and "50 samples in a row" in last and "bad_image 50" in last
    assert str(tmp_path / "shard-000000.tar") in last and str(tmp_path / "shard-000001.tar") in last


def test_training_on_empty_shards_stops_too(tmp_path: Path) -> None:
    # Valid tars with no sample skip nothing per sample; each draw of one counts as empty_shard.
    write(tmp_path / "shard-000000.tar", [])
    done = run_training(tmp_path, 0, "default")
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert "1000 samples in a row" in last and "empty_shard 1000" in last and "shard-000000.tar" in last


def test_a_run_of_skips_shorter_than_the_limit_trains(tmp_path: Path) -> None:
    write(tmp_path / "shard-000000.tar", [bad(f"b{i}") for i in range(5)] + [good(f"g{i}", i) for i in range(4)])
    done = run_training(tmp_path / "shard-000000.tar", 0, "6")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("BATCH") == 4 and "END" in done.stdout


def test_the_counter_resets_at_each_good_sample() -> None:
    skips = SkipCounter(max_consecutive=3, what="data.train_shards")
    for _ in range(5):
        skips.skip("bad_image", "a.tar", "k", "x")
        skips.skip("bad_image", "b.tar", "k", "x")
        skips.good()
    with pytest.raises(NoGoodSamplesError, match=r"^data.train_shards: 3 samples in a row .*'a.tar', 'b.tar'"):
        for _ in range(3):
            skips.skip("bad_image", "a.tar", "k", "x")
            skips.skip("bad_image", "b.tar", "k", "x")


@pytest.mark.parametrize("value", [0, -1, 2.5])
def test_max_consecutive_skips_is_checked(tmp_path: Path, value) -> None:
    write(tmp_path / "s.tar", [good("a")])
    with pytest.raises(ValueError, match=r"data.max_consecutive_skips must be an integer >= 1"):
        ImageTextDataModule(SPEC, val_shards=str(tmp_path / "s.tar"), max_consecutive_skips=value)


# --- 8: an evaluation split with no good sample is an error, and every skip is counted ------------


def test_validation_of_only_bad_samples_is_an_error_naming_split_and_shards(tmp_path: Path) -> None:
    write(tmp_path / "shard-000000.tar", [bad(f"b{i}") for i in range(60)])
    write(tmp_path / "shard-000001.tar", [{"__key__": f"e{i}", "png": png(i), "txt": " "} for i in range(40)])
    with pytest.raises(NoGoodSamplesError) as exc:
        list(eval_dm(str(tmp_path)).val_dataloader())
    message = str(exc.value)
    assert message.startswith("data.val_shards: no good sample in 2 shard(s)")
    assert "shard-000000.tar" in message and "shard-000001.tar" in message
    assert "skipped 100 (bad_image 60, empty_caption 40)" in message


@pytest.mark.parametrize("command", ["pipe:exit 3", "pipe:cat /nonexistent/shard.tar"])
def test_a_failing_pipe_shard_is_an_error(tmp_path: Path, command: str) -> None:
    with pytest.raises(NoGoodSamplesError, match=r"data.test_shards: no good sample in 1 shard\(s\) '" + command):
        list(ImageTextDataModule(SPEC, test_shards=command, num_workers=0).test_dataloader())


def test_a_worker_of_only_bad_samples_still_reports_its_skips(tmp_path: Path) -> None:
    write(tmp_path / "shard-000000.tar", [good(f"a{i}", i) for i in range(3)])
    write(
        tmp_path / "shard-000001.tar", [{"__key__": f"e{i}", "png": png(i), "txt": ""} for i in range(4)] + [bad("b")]
    )
    keys, skipped, batches = read_all(eval_dm(str(tmp_path), num_workers=2).val_dataloader())
    assert keys == ["a0", "a1", "a2"]
    assert skipped == {"empty_caption": 4, "bad_image": 1}
    assert all(type(b["skipped"]) is dict for b in batches)


def test_lightning_test_on_only_bad_samples_fails_rather_than_reporting_nothing(tmp_path: Path, caplog) -> None:
    write(tmp_path / "shard-000000.tar", [bad(f"b{i}") for i in range(4)])
    dm = ImageTextDataModule(SPEC, test_shards=str(tmp_path), eval_batch_size=2, num_workers=0)
    trainer = Trainer(
        accelerator="cpu",
        callbacks=[DataHealth()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.raises(NoGoodSamplesError, match="data.test_shards: no good sample"):
        trainer.test(LaMEModule(SPEC, DecoderSpec(preset="tiny"), num_reason_tokens=2), datamodule=dm)


# --- 9: a brace pattern naming shards that do not exist --------------------------------------------


def test_missing_shards_of_a_brace_pattern_are_an_error_or_with_the_option_a_warning(tmp_path: Path, caplog) -> None:
    for s in (0, 3, 7):
        write(tmp_path / f"shard-{s:06d}.tar", [good(f"k{s}")])
    pattern = str(tmp_path / "shard-{000000..000009}.tar")
    with pytest.raises(ValueError) as exc:
        ImageTextDataModule(SPEC, val_shards=pattern)
    message = str(exc.value)
    assert message.startswith("data.val_shards names 7 shard(s) that do not exist: ")
    assert "shard-000001.tar" in message and "shard-000006.tar" in message and "and 2 more" in message
    assert "shard-000008.tar" not in message and "data.allow_missing_shards" in message
    with caplog.at_level(logging.WARNING):
        dm = ImageTextDataModule(SPEC, val_shards=pattern, allow_missing_shards=True)
    assert [Path(u).name for u in dm.shards["val"]] == ["shard-000000.tar", "shard-000003.tar", "shard-000007.tar"]
    assert any("names 7 shard(s) that do not exist" in r.getMessage() for r in caplog.records)


def test_globs_and_brace_alternatives_of_globs(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write(tmp_path / "a" / "s0.tar", [good("k")])
    write(tmp_path / "a" / "s1.tar", [good("k")])
    assert len(expand_shards(str(tmp_path / "a" / "*.tar"), "k")) == 2
    with pytest.raises(ValueError, match=r"k names 1 shard\(s\) that do not exist: '.*/b/\*.tar'"):
        expand_shards(str(tmp_path / "{a,b}" / "*.tar"), "k")
    assert len(expand_shards(str(tmp_path / "{a,b}" / "*.tar"), "k", allow_missing=True)) == 2


# --- 10: GNU tar hard links ---------------------------------------------------------------------


def test_a_sample_stored_as_hard_links_is_counted(tmp_path: Path) -> None:
    folder = tmp_path / "loose"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i:06d}.png").write_bytes(png(i))
        (folder / f"{i:06d}.txt").write_text(f"caption {i}\n")
    # A repeated sample (the same files under another key) that GNU tar stores as two hard links.
    os.link(folder / "000001.png", folder / "000009.png")
    os.link(folder / "000001.txt", folder / "000009.txt")
    subprocess.run(["tar", "--sort=name", "-cf", str(tmp_path / "s.tar"), "-C", str(folder), "."], check=True)
    with tarfile.open(tmp_path / "s.tar") as tar:
        assert tar.getmember("./000009.png").islnk()
    keys, skipped, _ = read_all(eval_dm(str(tmp_path / "s.tar")).val_dataloader())
    assert keys == ["000000", "000001", "000002"]
    assert skipped == {"tar_link": 1}
    with pytest.raises(BadSampleError, match=r"'000009': tar_link \(member './000009.png' is a hard link"):
        list(eval_dm(str(tmp_path / "s.tar"), strict=True).val_dataloader())


# --- 11: a restricted decoder vocabulary --------------------------------------------------------


def test_decoder_vocab_covers_every_label_the_collator_builds(tmp_path: Path, processor) -> None:
    # Leading spaces and trailing newlines tokenize differently from the stripped captions training uses.
    captions = [" a red circle\n", "  two blue squares at the top\n", "\ta green triangle "]
    write(tmp_path / "shard-000000.tar", [good(f"k{i}", i, text) for i, text in enumerate(captions)])
    pair = {
        "query_instruction": "",
        "query_text": " what is left of the cat? ",
        "query_image": None,
        "query_video": None,
        "target_text": " a small dog\n",
        "target_image": None,
        "negatives": [],
    }
    write(tmp_path / "shard-000001.tar", [{"__key__": "p0", "json": json.dumps(pair).encode()}])
    vocab = set(caption_token_ids([tmp_path]))
    collate = PairCollator(processor, "q")
    samples = [{"key": f"k{i}", "image": Image.new("RGB", (56, 56)), "text": t.strip()} for i, t in enumerate(captions)]
    samples.append({"key": "p0", "image": Image.new("RGB", (56, 56)), "text": "a small dog"})
    samples.append({"key": "p0q", "image": Image.new("RGB", (56, 56)), "text": "what is left of the cat?"})
    ids = collate(samples)["decoder"]["input_ids"]
    assert set(ids.flatten().tolist()) <= vocab


def test_an_unseen_token_unlabels_its_row_and_is_counted(tmp_path: Path) -> None:
    tokenizer = qwen2_tokenizer()
    write(tmp_path / "s.tar", [good("k0", 0, "a red circle"), good("k1", 1, "a red zebra"), good("k2", 2, "a red")])
    known = {tokenizer.convert_tokens_to_ids("<|endoftext|>")}
    known.update(tokenizer("a red circle", add_special_tokens=False)["input_ids"])
    dm = eval_dm(str(tmp_path / "s.tar"))
    dm.set_decoder_output_ids(sorted(known))
    keys, skipped, batches = read_all(dm.val_dataloader())
    assert keys == ["k0", "k1", "k2"]
    assert skipped == {"decoder_unseen_token": 1}
    assert batches[0]["decoder"]["labelled"].tolist() == [True, False, True]
    assert set(batches[0]["decoder"]["input_ids"][[0, 2]].flatten().tolist()) <= known | {tokenizer.pad_token_id}
    assert "decoder_unseen" not in batches[0]

    strict = eval_dm(str(tmp_path / "s.tar"), strict=True)
    strict.set_decoder_output_ids(sorted(known))
    with pytest.raises(
        BadSampleError, match=r"shard '.*s.tar', sample 'k1': decoder_unseen_token \(decoder label token"
    ):
        list(strict.val_dataloader())


def _unseen_token_shard(tmp_path: Path) -> tuple[list[int], LaMEModule]:
    """A shard whose second caption has a token ("zebra") outside the vocabulary of its first, and a
    module whose decoder is restricted to that vocabulary."""
    tokenizer = qwen2_tokenizer()
    write(tmp_path / "s.tar", [good("k0", 0, "a red circle"), good("k1", 1, "a red zebra")])
    vocab = sorted(
        {tokenizer.convert_tokens_to_ids("<|endoftext|>")}
        | set(tokenizer("a red circle", add_special_tokens=False)["input_ids"])
    )
    module = LaMEModule(SPEC, DecoderSpec(preset="tiny"), num_reason_tokens=2)
    module.decoder.set_output_ids(vocab)
    return vocab, module


def test_restricted_decoder_trains_past_an_unseen_token(tmp_path: Path) -> None:
    vocab, module = _unseen_token_shard(tmp_path)
    dm = eval_dm(str(tmp_path / "s.tar"), eval_batch_size=2)
    dm.set_decoder_output_ids(vocab)
    batch = next(iter(dm.val_dataloader()))
    out = module.validation_step(batch, 0)  # raised "target token ids ... are not in ..." for row k1
    assert out.decoder_rows == 1


# --- 14: image formats and member sizes ---------------------------------------------------------


@pytest.mark.parametrize("fmt", ["TIFF", "PPM", "ICO"])
def test_only_allowed_image_formats_decode(tmp_path: Path, fmt: str) -> None:
    write(
        tmp_path / "s.tar",
        [
            good("a"),
            {"__key__": "b", "png": png(1, fmt=fmt), "txt": "x"},
            {"__key__": "c", "png": png(2, fmt="JPEG"), "txt": "y"},
            {"__key__": "d", "png": png(3, fmt="WEBP"), "txt": "z"},
            {"__key__": "e", "png": png(4, fmt="GIF"), "txt": "w"},
            {"__key__": "f", "png": png(5, fmt="BMP"), "txt": "v"},
        ],
    )
    keys, skipped, _ = read_all(eval_dm(str(tmp_path / "s.tar")).val_dataloader())
    assert keys == ["a", "c", "d", "e", "f"]
    assert skipped == {"bad_image": 1}


def test_a_member_over_the_cap_is_skipped_unread(tmp_path: Path) -> None:
    huge = 40 * 2**20
    write(tmp_path / "s.tar", [good("a"), {"__key__": "big", "png": png(1), "txt": b"x" * huge}, good("c", 2)])
    dm = eval_dm(str(tmp_path / "s.tar"), max_member_bytes=2**20)
    keys, skipped, _ = read_all(dm.val_dataloader())
    assert keys == ["a", "c"] and skipped == {"member_too_large": 1}
    # Read without the stages after it: what passing the member over costs in memory.
    skips = SkipCounter()
    tracemalloc.start()
    try:
        samples = list(TarSamples(skips, max_member_bytes=2**20).run(iter([{"url": str(tmp_path / "s.tar")}])))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [s["__key__"] for s in samples] == ["a", "big", "c"] and "__skip__" in samples[1]
    assert peak < huge / 4, f"peak {peak} bytes while passing over a {huge}-byte member"


def test_max_member_bytes_is_checked(tmp_path: Path) -> None:
    write(tmp_path / "s.tar", [good("a")])
    with pytest.raises(ValueError, match=r"data.max_member_bytes must be an integer >= 1, got 0"):
        eval_dm(str(tmp_path / "s.tar"), max_member_bytes=0)


def test_the_module_hands_its_decoder_vocabulary_to_the_data_module(tmp_path: Path) -> None:
    """Through the Trainer: no call by hand, the module's setup restricts the labels."""
    from lightning import Trainer

    _, module = _unseen_token_shard(tmp_path)
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    (metrics,) = trainer.validate(module, datamodule=eval_dm(str(tmp_path / "s.tar"), eval_batch_size=2))
    assert "val/loss/decoder" in metrics  # row k1 left out of the decoder term, not a crash

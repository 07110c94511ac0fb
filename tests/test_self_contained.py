"""``LaMEModule.load_from_checkpoint`` of a model whose backbone and decoder came from local
folders, once those folders are gone (the checkpoint stores their configs, not their weights)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
from test_embedder import _train

from lame_pl.checkpoint import BACKBONE_FILES, DECODER_FILES, read_checkpoint
from lame_pl.export import decoder_from_checkpoint

MAX_DIFF = 1e-6


def _outputs(module, batch: dict) -> dict[str, torch.Tensor]:
    """Embeddings of both sides and the decoder's logits on ``batch``, in eval mode."""
    module.eval()
    with torch.no_grad():
        query = module.encode(batch["query"])
        target = module.encode(batch["target"])
        logits = module.decoder(query.reason_states, **batch["decoder"]).logits
    return {"query": query.embedding, "target": target.embedding, "logits": logits}


def _assert_same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    for name, value in expected.items():
        assert got[name].shape == value.shape, name
        assert (got[name] - value).abs().max() <= MAX_DIFF, name


@pytest.fixture(scope="module")
def local_run(module_tmp, make_batch) -> dict:
    """A tiny Qwen2-VL and a tiny Qwen3 saved as Hugging Face folders, a stage-2 checkpoint of a
    module built from them (one step), what that module computed, and a backup of the folders."""
    from transformers import Qwen2VLForConditionalGeneration

    from lame_pl import BackboneSpec, DecoderSpec, LaMEModule
    from lame_pl.backbone import backbone_config, build_decoder, build_processor

    root = module_tmp("local")
    backup = root / "backup"
    Qwen2VLForConditionalGeneration(backbone_config("tiny", "sdpa")).save_pretrained(backup / "vlm")
    build_processor(BackboneSpec(preset="tiny", min_pixels=3136, max_pixels=3136)).save_pretrained(backup / "vlm")
    build_decoder(DecoderSpec(preset="tiny"), "sdpa").save_pretrained(backup / "decoder")
    folders = {"vlm": root / "weights" / "vlm", "decoder": root / "weights" / "decoder"}
    for name, folder in folders.items():
        shutil.copytree(backup / name, folder)
    module = LaMEModule(
        backbone=BackboneSpec(path=str(folders["vlm"]), min_pixels=3136, max_pixels=3136),
        decoder=DecoderSpec(path=str(folders["decoder"])),
        num_reason_tokens=2,
        stage=2,
        lr=1e-2,
    )
    batch = make_batch(4)
    checkpoint = _train(module, batch, root / "local.ckpt")
    return {
        "checkpoint": checkpoint,
        "folders": folders,
        "backup": backup,
        "batch": batch,
        "expected": _outputs(module, batch),
        "root": root,
    }


@pytest.fixture
def run(local_run, tmp_path, monkeypatch) -> dict:
    """``local_run`` with its folders in place, a fresh ``$LAME_PL_CACHE`` and another working directory."""
    for name, folder in local_run["folders"].items():
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(local_run["backup"] / name, folder)
    monkeypatch.setenv("LAME_PL_CACHE", str(tmp_path / "cache"))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    return local_run


def _remove_folders(run: dict) -> None:
    for folder in run["folders"].values():
        shutil.rmtree(folder)


def test_the_checkpoint_stores_both_folders_files_without_weights(run):
    saved = torch.load(run["checkpoint"], map_location="cpu", weights_only=True, mmap=True)
    assert "config.json" in saved[BACKBONE_FILES] and "tokenizer.json" in saved[BACKBONE_FILES]
    assert "config.json" in saved[DECODER_FILES]
    assert not any(name.endswith(".safetensors") for key in (BACKBONE_FILES, DECODER_FILES) for name in saved[key])


def test_restores_without_its_folders_equal_to_the_module_it_saved(run, tmp_path):
    from lame_pl import LaMEModule

    _remove_folders(run)
    with pytest.warns(UserWarning) as caught:
        module = LaMEModule.load_from_checkpoint(str(run["checkpoint"]), map_location="cpu")
    messages = [str(w.message) for w in caught if "is not here" in str(w.message)]
    for name, folder in (("backbone", run["folders"]["vlm"]), ("decoder", run["folders"]["decoder"])):
        named = [m for m in messages if m.startswith(f"{name}.path {str(folder)!r} is not here")]
        assert len(named) == 1, messages  # once each, naming the path and where the files went
        assert str(tmp_path / "cache") in named[0]
    assert Path(module.backbone_spec.path).is_relative_to(tmp_path / "cache")
    assert Path(module.decoder_spec.path).is_relative_to(tmp_path / "cache")
    _assert_same(_outputs(module, run["batch"]), run["expected"])

    # The exporter's (and the embedder's explain) decoder: built from the unpacked folder's config.
    with pytest.warns(UserWarning, match=r"decoder.path .* is not here"):
        decoder = decoder_from_checkpoint(read_checkpoint(run["checkpoint"]), hidden_size=64).eval()
    with torch.no_grad():
        states = module.encode(run["batch"]["query"]).reason_states
        logits = decoder(states, **run["batch"]["decoder"]).logits
    assert (logits - run["expected"]["logits"]).abs().max() <= MAX_DIFF

    # The restored module trains on and re-saves a checkpoint that restores the same way, even
    # once the folders it was restored from are gone in turn.
    resaved = _train(module.train(), run["batch"], tmp_path / "resaved.ckpt")
    expected = _outputs(module, run["batch"])
    assert (expected["query"] - run["expected"]["query"]).abs().max() > MAX_DIFF  # it did train
    shutil.rmtree(tmp_path / "cache")
    with pytest.warns(UserWarning, match="is not here"):
        again = LaMEModule.load_from_checkpoint(str(resaved), map_location="cpu")
    _assert_same(_outputs(again, run["batch"]), expected)


def test_restoring_reads_no_pretrained_weights(run):
    from lame_pl import LaMEModule

    for folder in run["folders"].values():
        for weights in folder.glob("*.safetensors"):
            weights.unlink()
    module = LaMEModule.load_from_checkpoint(str(run["checkpoint"]), map_location="cpu")
    assert module.backbone_spec.path == str(run["folders"]["vlm"])  # a folder that is here is used
    _assert_same(_outputs(module, run["batch"]), run["expected"])


def test_a_cli_checkpoint_of_config_dicts_restores_without_its_folders(run, tmp_path):
    """LightningCLI stores the specs as dicts and restores through its instantiator (jsonargparse),
    which checks the paths: they must be replaced before it runs."""
    from lame_pl import LaMEModule

    saved = torch.load(run["checkpoint"], map_location="cpu", weights_only=True)
    hparams = {
        k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in saved["hyper_parameters"].items()
    }
    hparams.update(_instantiator="lightning.pytorch.cli.instantiate_module", _class_path="lame_pl.LaMEModule")
    saved["hyper_parameters"] = hparams
    torch.save(saved, tmp_path / "cli.ckpt")
    _remove_folders(run)
    with pytest.warns(UserWarning, match="is not here"):
        module = LaMEModule.load_from_checkpoint(str(tmp_path / "cli.ckpt"), map_location="cpu")
    _assert_same(_outputs(module, run["batch"]), run["expected"])


@pytest.mark.parametrize(
    ("name", "key", "folder"), [("backbone", BACKBONE_FILES, "vlm"), ("decoder", DECODER_FILES, "decoder")]
)
def test_a_missing_folder_without_stored_files_is_one_line_naming_it(run, tmp_path, name, key, folder):
    from lame_pl import LaMEModule

    saved = torch.load(run["checkpoint"], map_location="cpu", weights_only=True)
    del saved[key]
    torch.save(saved, tmp_path / "old.ckpt")
    shutil.rmtree(run["folders"][folder])
    with pytest.raises(FileNotFoundError) as raised:
        LaMEModule.load_from_checkpoint(str(tmp_path / "old.ckpt"), map_location="cpu")
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"{name}.path {str(run['folders'][folder])!r} is not a directory here")

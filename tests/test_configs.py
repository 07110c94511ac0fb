"""The real-size configs parse, and run when their weight paths point at local checkpoints."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lame_pl.backbone import BackboneSpec, DecoderSpec, backbone_config, build_backbone, build_decoder, build_processor
from lame_pl.cli import build_cli

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT / "configs" / "qwen2vl-2b"


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning"])


@pytest.mark.parametrize("stage", [1, 2])
def test_real_configs_print_the_published_recipe(stage, capsys):
    with pytest.raises(SystemExit) as done:
        build_cli(["fit", f"--config={REAL / f'stage{stage}.yaml'}", "--print_config"])
    assert done.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    model = config["model"]["init_args"]
    assert model["num_reason_tokens"] == 8 and model["stage"] == stage
    assert model["temperature"] == 0.02 and model["lr"] == 5e-5 and model["warmup_steps"] > 0
    assert config["trainer"]["precision"] == "bf16-mixed"
    assert config["trainer"]["devices"] * config["data"]["init_args"]["batch_size"] == 1024
    spec = model[f"stage{stage}"]
    assert spec["train_vision_tower"] is False
    assert spec["train_language_model"] is (stage == 2)
    assert (spec["contrastive_loss_weight"] > 0) is (stage == 2)


def test_mmeb_train_mixture_config_composes_with_either_stage(capsys):
    with pytest.raises(SystemExit) as done:
        build_cli(["fit", f"--config={REAL / 'stage2.yaml'}", f"--config={REAL / 'data_mmeb_train.yaml'}",
                   "--print_config"])
    assert done.value.code in (0, None)
    data = yaml.safe_load(capsys.readouterr().out)["data"]
    assert data["class_path"] == "datamodules.InstructionPairDataModule"
    args = data["init_args"]
    assert args["train_shards"] is None and args["resampled"] is True
    assert args["batch_size"] == 128  # the stage config's batch survives the data config
    sets = args["train_mixture"]
    assert [s["homogeneous"] for s in sets] == [True, True, True, False]
    assert all(s["weight"] > 0 and s["shards"] for s in sets)


@pytest.fixture(scope="module")
def local_checkpoints(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny Qwen2-VL and a tiny Qwen3 saved as Hugging Face directories, as a user would have."""
    from transformers import Qwen2VLForConditionalGeneration

    root = tmp_path_factory.mktemp("weights")
    spec = BackboneSpec(preset="tiny", min_pixels=3136, max_pixels=3136)
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(backbone_config("tiny", "sdpa")).save_pretrained(root / "vlm")
    build_processor(spec).save_pretrained(root / "vlm")
    build_decoder(DecoderSpec(preset="tiny"), "sdpa").save_pretrained(root / "decoder")
    return root / "vlm", root / "decoder"


def test_backbone_loads_from_a_local_directory_with_its_weights(local_checkpoints):
    from safetensors.torch import load_file

    vlm, _ = local_checkpoints
    model = build_backbone(BackboneSpec(path=str(vlm)))
    saved = load_file(str(next(vlm.glob("*.safetensors"))))
    key = next(k for k in saved if k.endswith("layers.0.self_attn.q_proj.weight") and "visual" not in k)
    assert torch.equal(model.language_model.layers[0].self_attn.q_proj.weight, saved[key])
    processor = build_processor(BackboneSpec(path=str(vlm), min_pixels=3136, max_pixels=3136))
    assert processor.tokenizer.convert_tokens_to_ids("<|image_pad|>") == model.config.image_token_id


@pytest.mark.parametrize("stage", [1, 2])
def test_real_configs_fit_with_local_weights(stage, local_checkpoints, tmp_path):
    """The real recipe (bf16-mixed, gradient checkpointing, K=8) on tiny local weights, on the CPU."""
    vlm, decoder = local_checkpoints
    shards = tmp_path / "shards"
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "make_shards.py"), "synthetic", "--out", str(shards),
         "--train", "8", "--val", "4", "--test", "4", "--image-size", "56"],
        check=True, capture_output=True,
    )
    cli = build_cli([
        "fit", f"--config={REAL / f'stage{stage}.yaml'}",
        f"--model.init_args.backbone.path={vlm}", f"--model.init_args.decoder.path={decoder}",
        "--model.init_args.backbone.max_pixels=3136", "--model.init_args.init_from=null",
        *[f"--data.init_args.{split}_shards={shards / split}" for split in ("train", "val", "test")],
        "--data.init_args.batch_size=2", "--data.init_args.num_workers=0",
        "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto",
        "--trainer.fast_dev_run=1", f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.callbacks=[]",
    ])
    assert cli.model.stage == stage
    assert cli.trainer.global_step == 1

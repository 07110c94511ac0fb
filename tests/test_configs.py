"""The real-size configs: base + stage overlays parse to the recipe, and run end to end on tiny local
weights with shards converted from MMEB-train-layout files, through the same code path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lame_pl.backbone import BackboneSpec, DecoderSpec, backbone_config, build_backbone, build_decoder, build_processor
from lame_pl.cli import build_cli
from lame_pl.data.vlm2vec_mixture import SUBSETS

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT / "configs" / "qwen2vl-2b"
DEMO = ROOT / "configs" / "demo"


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning"])


def printed(capsys, *args: str) -> dict:
    """The config ``lightning fit ARGS --print_config`` resolves to."""
    with pytest.raises(SystemExit) as done:
        build_cli(["fit", *args, "--print_config"])
    assert done.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("stage", [1, 2])
def test_real_configs_print_the_published_recipe(stage, capsys):
    config = printed(capsys, f"--config={REAL / 'base.yaml'}", f"--config={REAL / f'stage{stage}.yaml'}")
    model = config["model"]["init_args"]
    assert model["num_reason_tokens"] == 8 and model["stage"] == stage and model["embed_dim"] == 3584
    assert model["temperature"] == 0.02 and model["lr"] == 5e-5 and model["warmup_steps"] == 100
    assert model["backbone"]["dtype"] == "bfloat16" and model["decoder"]["dtype"] == "float32"
    assert config["trainer"]["precision"] == "bf16-mixed"
    assert config["trainer"]["max_steps"] == (2000 if stage == 1 else 5000)
    assert config["trainer"]["logger"]["init_args"]["version"] == f"stage{stage}"
    assert config["trainer"]["devices"] * config["data"]["init_args"]["batch_size"] == 1024
    assert model["gradcache_chunk_size"] == 8  # VLM2Vec-V2's gc chunk size
    one, two = model["stage1"], model["stage2"]
    assert (one["train_vision_tower"], one["train_language_model"], one["lora"]) == (False, False, None)
    assert (one["contrastive_loss_weight"], one["decoder_loss_weight"]) == (0.0, 1.0)
    assert (two["train_vision_tower"], two["train_language_model"]) == (False, True)
    assert (two["contrastive_loss_weight"], two["decoder_loss_weight"]) == (1.0, 1.0)
    lora = two["lora"]
    assert (lora["r"], lora["alpha"], lora["dropout"], lora["use_dora"]) == (16, 64, 0.1, True)
    assert (model["init_from"] is None) is (stage == 1)


def test_a_partial_stage2_spec_on_stage1_keeps_stage2s_contrastive_weight(capsys, tmp_path):
    """The issue's check, on the 2B base without its stage2 block (which would fill every key
    itself): a partial spec merges over its own stage's defaults, as --print_config shows."""
    base = yaml.safe_load((REAL / "base.yaml").read_text())
    del base["model"]["init_args"]["stage2"]
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    for spec in ("{lora: {r: 16}}", "{train_language_model: true}"):
        config = printed(
            capsys,
            f"--config={tmp_path / 'base.yaml'}",
            f"--config={REAL / 'stage1.yaml'}",
            "--model.init_args.stage2",
            spec,
        )
        two = config["model"]["init_args"]["stage2"]
        assert two["contrastive_loss_weight"] == 1.0 and two["train_language_model"] is True, spec
        assert (two["lora"] or {}).get("r") == (16 if "lora" in spec else None)


def test_the_real_mixture_is_vlm2vec_v2s_with_its_weights(capsys):
    """Every subset the converter knows, weighted as VLM2Vec-V2 weights it, one subset per batch."""
    config = printed(capsys, f"--config={REAL / 'base.yaml'}", f"--config={REAL / 'stage2.yaml'}")
    data = config["data"]
    assert data["class_path"] == "datamodules.InstructionPairDataModule"
    args = data["init_args"]
    assert args["train_shards"] is None and args["resampled"] is True
    sets = args["train_mixture"]
    assert [(s["name"], s["shards"], s["weight"]) for s in sets] == [(s.name, s.name, s.weight) for s in SUBSETS]
    assert all(s["homogeneous"] for s in sets)


def test_the_caption_overlay_swaps_the_data(capsys):
    config = printed(
        capsys,
        f"--config={REAL / 'base.yaml'}",
        f"--config={REAL / 'stage2.yaml'}",
        f"--config={REAL / 'data_captions.yaml'}",
    )
    args = config["data"]["init_args"]
    assert config["data"]["class_path"] == "datamodules.ImageTextDataModule"
    assert args["train_mixture"] is None and args["mixture_root"] is None and args["train_shards"]
    assert args["batch_size"] == 128  # the base's batch survives the overlay
    # The instruction-pair base says no query instruction; the caption overlay says its own.
    assert args["query_instruction"] == "Find the caption that describes this image."


@pytest.mark.parametrize("stage", [1, 2])
def test_stage_overlays_only_add_to_the_base(stage):
    """No overlay repeats what its base says (a value given twice is a value that drifts)."""
    for folder in (REAL, DEMO):
        base = yaml.safe_load((folder / "base.yaml").read_text())
        overlay = yaml.safe_load((folder / f"stage{stage}.yaml").read_text())

        def repeated(over: dict, under: dict, path: str = "") -> list[str]:
            out = []
            for key, value in over.items():
                if key not in under:
                    continue
                if isinstance(value, dict) and isinstance(under[key], dict):
                    out += repeated(value, under[key], f"{path}{key}.")
                else:
                    out.append(f"{path}{key}")
            return out

        assert repeated(overlay, base) == [], folder


@pytest.fixture(scope="module")
def local_checkpoints(module_tmp) -> tuple[Path, Path]:
    """A tiny Qwen2-VL and a tiny Qwen3 saved as Hugging Face directories, as a user would have."""
    from transformers import Qwen2VLForConditionalGeneration

    root = module_tmp("weights")
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


@pytest.fixture(scope="module")
def converted(module_tmp) -> Path:
    """MMEB-train-layout files (image, text-to-image and classification subsets) and LLaVA-Hound
    video rows, converted by `tools/make_shards.py mmeb-train` as the README says."""
    from mmeb_train_fixtures import mmeb_root, video

    tmp = module_tmp("mmeb")
    mmeb = mmeb_root(tmp)
    sft, frames, _ = video(tmp)
    out = tmp / "shards"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "make_shards.py"),
            "mmeb-train",
            "--mmeb-root",
            str(mmeb),
            "--video-annotations",
            str(sft),
            "--video-frames",
            str(frames),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.parametrize("stage", [1, 2])
def test_real_recipe_fits_on_converted_mmeb_train_data(stage, local_checkpoints, converted, tmp_path):
    """The 2B recipe as written (bf16 weights, bf16-mixed, K=8, projection 3584, gradient
    checkpointing, GradCache, DoRA in stage 2, homogeneous mixture batches, video rows) on tiny
    local weights; batch 4 in chunks of 2 instead of 128 in chunks of 8."""
    vlm, decoder = local_checkpoints
    cli = build_cli(
        [
            "fit",
            f"--config={REAL / 'base.yaml'}",
            f"--config={REAL / f'stage{stage}.yaml'}",
            f"--config={converted / 'mixture.yaml'}",
            f"--model.init_args.backbone.path={vlm}",
            f"--model.init_args.decoder.path={decoder}",
            "--model.init_args.backbone.max_pixels=3136",
            "--model.init_args.init_from=null",
            "--data.init_args.batch_size=4",
            "--model.init_args.gradcache_chunk_size=2",
            "--data.init_args.num_workers=0",
            "--trainer.accelerator=cpu",
            "--trainer.devices=1",
            "--trainer.strategy=auto",
            "--trainer.max_steps=3",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.callbacks=[]",
            "--trainer.enable_progress_bar=false",
        ]
    )
    model = cli.model
    assert model.stage == stage and cli.trainer.global_step == 3
    assert torch.isfinite(cli.trainer.logged_metrics["train/loss"])
    assert model.encoder.backbone.dtype == torch.bfloat16 and model.encoder.embedding_dim == 3584
    lora = [n for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]
    assert bool(lora) is (stage == 2)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)

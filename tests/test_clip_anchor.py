"""The CLIP anchor: fit and test through the CLI on tiny shards, a loss that learns, the evaluators, the bench row."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_synthetic_shards, random_image
from test_eval_mmeb import write_mmeb

from lame_pl.benchmarks import encode as bench_encode
from lame_pl.cli import build_cli
from lame_pl.clip_anchor import CLIPAnchor
from lame_pl.clip_spec import CLIPSpec
from lame_pl.datamodules.clip import CLIPPairCollator, CLIPProcessor
from lame_pl.evaluation import run as eval_run
from lame_pl.evaluation.clip_encoder import CLIPEncoder, is_clip_checkpoint
from lame_pl.evaluation.task import Item

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "configs" / "demo" / "clip.yaml"
# A CLIP small enough for a test: two layers per tower, 64 wide.
TINY = {
    "embed_dim": 32,
    "vision_cfg": {"layers": 2, "width": 64, "patch_size": 16},
    "text_cfg": {"layers": 2, "width": 64, "heads": 2},
}
TINY_FLAGS = [
    "--model.init_args.backbone.image_size=56",
    "--model.init_args.backbone.context_length=24",
    f"--model.init_args.backbone.overrides={json.dumps(TINY)}",
]
CAPTIONS = [
    "a red circle at the top left",
    "two blue squares in the center",
    "a green triangle at the bottom",
    "three purple squares on the left",
    "a yellow circle on the right",
    "one red square at the top",
    "a blue triangle at the bottom left",
    "two green circles in the center",
]


@pytest.fixture(scope="module")
def shards(module_tmp) -> Path:
    return make_synthetic_shards(module_tmp("clip_shards"), 32, 8, 8)


def data_args(shards: Path) -> list[str]:
    return [f"--data.init_args.{split}_shards={shards / split}" for split in ("train", "val", "test")]


def run_args(tmp: Path) -> list[str]:
    """The demo config's logger, checkpoints and metrics file moved under ``tmp``; small batches, no worker."""
    return [
        *TINY_FLAGS,
        f"--trainer.logger.init_args.save_dir={tmp}",
        "--trainer.enable_progress_bar=false",
        "--trainer.callbacks=[]",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        f"--trainer.callbacks.dirpath={tmp / 'ckpt'}",
        "--trainer.callbacks.save_last=true",
        "--trainer.callbacks+=callbacks.MetricsFile",
        f"--trainer.callbacks.path={tmp / 'metrics.json'}",
        "--data.init_args.batch_size=4",
        "--data.init_args.num_workers=0",
    ]


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    """LightningCLI warns when both sys.argv and ``args`` are given."""
    monkeypatch.setattr(sys, "argv", ["lightning"])


@pytest.fixture(scope="module")
def fitted(shards, module_tmp) -> tuple[Path, dict]:
    """configs/demo/clip.yaml fit for 4 steps (validating at the 4th) on the tiny shards; its checkpoint and metrics."""
    tmp = module_tmp("clip_run")
    argv = sys.argv
    sys.argv = ["lightning"]
    try:
        cli = build_cli(
            [
                "fit",
                f"--config={CONF}",
                *data_args(shards),
                *run_args(tmp),
                "--trainer.max_steps=4",
                "--trainer.val_check_interval=4",
            ]
        )
    finally:
        sys.argv = argv
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    return tmp / "ckpt" / "last.ckpt", metrics


def test_the_demo_config_fits_and_tests_through_the_cli_with_lames_metric_names(fitted, shards, tmp_path):
    checkpoint, metrics = fitted
    assert {"train/loss", "train/loss/contrastive", "train/temperature", "val/loss"} <= set(metrics)
    assert {"val/recall@1", "val/recall@5", "val/recall@10", "val/mrr", "val/ndcg@10"} <= set(metrics)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    assert 0.0 <= metrics["val/recall@1"] <= metrics["val/recall@5"] <= 1.0
    assert is_clip_checkpoint(checkpoint)
    build_cli(["test", f"--config={CONF}", *data_args(shards), *run_args(tmp_path), f"--ckpt_path={checkpoint}"])
    tested = json.loads((tmp_path / "metrics.json").read_text())
    assert tested["test/num_candidates"] == 8 and tested["chance/recall@1"] == pytest.approx(1 / 8)
    assert 0.0 <= tested["test/recall@1"] <= tested["test/recall@10"] == 1.0  # 8 candidates: all in the top 10


def tiny_module(**kwargs) -> CLIPAnchor:
    return CLIPAnchor(CLIPSpec("ViT-S-32", overrides=TINY, image_size=56, context_length=24), **kwargs)


def test_loss_falls_when_overfitting_one_batch():
    module = tiny_module(lr=1e-3, weight_decay=0.0, lr_schedule="constant")
    rng = random.Random(0)
    samples = [{"key": str(i), "image": random_image(rng), "text": text} for i, text in enumerate(CAPTIONS)]
    batch = CLIPPairCollator(CLIPProcessor(module.spec))(samples)
    optimizer = module.configure_optimizers()
    losses = []
    for _ in range(12):
        optimizer.zero_grad()
        loss, _, _ = module.model_step(batch)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses


def test_clip_encoder_embeds_items_as_the_module_encodes_sides(tmp_path):
    module = tiny_module().eval()
    encoder = CLIPEncoder(module=module)
    image_path = tmp_path / "img.png"
    random_image(random.Random(1)).save(image_path)
    items = [
        Item("", "", (str(image_path),)),
        Item("an instruction", "a red circle"),
        Item("", "a red circle", (str(image_path),)),
        Item("only an instruction", ""),
    ]
    got = encoder.encode(items)
    processor = CLIPProcessor(module.spec)
    from PIL import Image

    with torch.no_grad(), Image.open(image_path) as opened:
        image = module.encode({"image": processor.images([opened.convert("RGB")])})[0]
        text = module.encode({"text": processor.texts(["a red circle"])})[0]
        both = module.encode(
            {"image": processor.images([opened.convert("RGB")]), "text": processor.texts(["a red circle"])}
        )[0]
        instruction = module.encode({"text": processor.texts(["only an instruction"])})[0]
    assert got.shape == (4, 32) and torch.allclose(got.norm(dim=-1), torch.ones(4), atol=1e-5)
    for row, expected in enumerate((image, text, both, instruction)):
        assert torch.allclose(got[row], expected, atol=1e-5), row
    assert torch.allclose(both, F.normalize(image + text, dim=-1), atol=1e-5)
    # The LaMEEmbedder-style rows: texts, images (paths or PIL), or both per row.
    with Image.open(image_path) as opened:
        rows = encoder.embed(texts=["", "a red circle", "a red circle"], images=[str(image_path), None, opened.copy()])
    assert torch.allclose(rows, got[:3], atol=1e-5)
    with pytest.raises(ValueError, match="2 texts but 1 images"):
        encoder.embed(texts=["a", "b"], images=[str(image_path)])
    # LaMEEmbedder.encode's arguments: batching does not change a row; an instruction is refused, not dropped.
    one_by_one = encoder.embed(
        texts=["", "a red circle"], images=[str(image_path), None], batch_size=1, device="cpu", instructions=""
    )
    assert torch.allclose(one_by_one, got[:2], atol=1e-5)
    with pytest.raises(ValueError, match="embeds no instruction"):
        encoder.embed(texts=["a red circle"], instructions="Find the caption.")


def test_eval_mmeb_picks_the_clip_encoder_for_a_clip_checkpoint(fitted, tmp_path, monkeypatch, capsys):
    checkpoint, _ = fitted

    def refuse(*args, **kwargs):
        raise AssertionError("a CLIP checkpoint went to the LaME encoder")

    monkeypatch.setattr(eval_run, "CheckpointEncoder", refuse)
    data = write_mmeb(tmp_path / "mmeb")
    summary = eval_run.main(
        "mmeb",
        [
            "--checkpoint",
            str(checkpoint),
            "--data-root",
            str(data),
            "--output-dir",
            str(tmp_path / "out"),
            "--batch-size",
            "3",
        ],
    )
    tasks = {t["task"]: t for t in summary["tasks"]}
    assert set(tasks) == {"ImageNet-1K", "MSCOCO_t2i", "MSR-VTT", "ViDoRe_arxivqa"}
    assert all(0.0 <= t["main_score"] <= 1.0 and t["encoded"] > 0 for t in tasks.values())
    assert "overall" in capsys.readouterr().out


def test_a_lame_checkpoint_is_not_taken_for_a_clip_one(tmp_path):
    lame = tmp_path / "lame.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"_class_path": "lame_pl.LaMEModule"}}, lame)
    clip = tmp_path / "clip.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}, "encoder_kind": "clip"}, clip)
    assert not is_clip_checkpoint(lame) and is_clip_checkpoint(clip) and not is_clip_checkpoint(tmp_path / "none")


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("--model.init_args.backbone.arch=ViT-Nope-99", "backbone.arch 'ViT-Nope-99' is not a built-in open_clip"),
        ("--model.init_args.backbone.weights=/no/such/clip.pt", "backbone.weights '/no/such/clip.pt' is not a file"),
        ("--model.init_args.backbone.overrides={vision: {layers: 1}}", "backbone.overrides has keys ['vision']"),
    ],
)
def test_bad_config_fails_with_one_line_naming_it(flag, message, shards):
    with pytest.raises(SystemExit) as error:
        build_cli(["fit", f"--config={CONF}", *data_args(shards), flag])
    text = str(error.value.code)
    assert message in text and "\n" not in text.strip()
    assert "Namespace(" not in text


def test_weights_that_do_not_fit_the_architecture_name_the_file(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "wrong.safetensors"
    save_file({"logit_scale": torch.zeros(())}, str(path))
    with pytest.raises(ValueError, match=r"^backbone.weights '.*wrong.safetensors' do not load into ViT-S-32"):
        CLIPAnchor(CLIPSpec("ViT-S-32", weights=str(path), overrides=TINY))


def test_local_weights_load_into_the_anchor(tmp_path):
    from safetensors.torch import save_file

    source = tiny_module()
    path = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in source.clip.state_dict().items()}, str(path))
    loaded = CLIPAnchor(CLIPSpec("ViT-S-32", weights=str(path), overrides=TINY, image_size=56, context_length=24))
    for key, value in source.clip.state_dict().items():
        assert torch.equal(loaded.clip.state_dict()[key], value), key


def test_bench_encode_has_a_clip_row(tmp_path):
    out = tmp_path / "bench.json"
    options = (
        "--preset tiny --device cpu --image-size 56 --text-tokens 6 -K 2 -T 2 --batch-sizes 2 --warmup 0"
        " --repeats 1 --train-steps 0 --clip-arch ViT-S-32"
    )
    argv = [*options.split(), "--json", str(out)]
    assert bench_encode.main(argv) == 0
    report = json.loads(out.read_text())
    row = report["encode"]["2"]["clip"]
    assert row["batch_size"] == 2 and row["ms_per_sample"] > 0
    assert report["clip"]["arch"] == "ViT-S-32" and report["clip"]["context_length"] == 77


@pytest.mark.slow  # two DDP launches: ~70 s on 2 busy cores
def test_two_process_fit_gathers_and_test_ranks_the_whole_split(tmp_path):
    """DDP on the CPU (gloo): ClipLoss gathers across the ranks in training, and test ranks every
    rank's captions though the ranks hold different numbers of test batches (5 + 4 rows)."""
    shards = tmp_path / "shards"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "make_shards.py"),
            "synthetic",
            "--out",
            str(shards),
            "--train",
            "16",
            "--val",
            "10",
            "--test",
            "9",
            "--image-size",
            "56",
            "--samples-per-shard",
            "5",
        ],
        check=True,
        capture_output=True,
    )
    out = tmp_path / "metrics.json"
    common = [
        f"--config={CONF}",
        *data_args(shards),
        *TINY_FLAGS,
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
        "--trainer.callbacks=[]",
        "--trainer.callbacks+=callbacks.MetricsFile",
        f"--trainer.callbacks.path={out}",
        "--data.init_args.batch_size=4",
        "--data.init_args.num_workers=0",
    ]
    lightning = Path(sys.executable).with_name("lightning")
    fit = subprocess.run(
        [
            str(lightning),
            "fit",
            *common,
            "--trainer.max_steps=2",
            "--trainer.limit_val_batches=0",
            "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
            f"--trainer.callbacks.dirpath={tmp_path / 'ckpt'}",
            "--trainer.callbacks.save_last=true",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert fit.returncode == 0, fit.stderr[-3000:]
    test = subprocess.run(
        [str(lightning), "test", *common, f"--ckpt_path={tmp_path / 'ckpt' / 'last.ckpt'}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert test.returncode == 0, test.stderr[-3000:]
    metrics = json.loads(out.read_text())
    assert metrics["test/num_candidates"] == 9 and metrics["chance/recall@1"] == pytest.approx(1 / 9)

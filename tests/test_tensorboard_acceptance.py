"""Acceptance: a run of the demo config leaves scalars, the heatmap, the layout and the projector in TensorBoard.

The demo's own stage-2 config runs (its callbacks unchanged) for two steps on a few synthetic
scenes, validating once; the run folder is then read with TensorBoard's own event reader and
projector-config parser.
"""

from __future__ import annotations

import csv
import importlib.util
import re
import sys
from pathlib import Path

import pytest
import yaml
from google.protobuf import text_format
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig

from callbacks.dashboard_layout import LAYOUT
from lame_pl.cli import build_cli

ROOT = Path(__file__).resolve().parents[1]
DIAGNOSTICS = ["DashboardLayout", "EmbeddingHealth", "ReasonDiagnostics", "SimilarityHeatmap", "EmbeddingProjector"]
VAL_SAMPLES = 8
STEP = 1  # Lightning logs a validation inside training at the optimiser steps before its batch


def tool(name: str):
    """A script of tools/ as a module (in this process, which has torch and the tokenizer loaded already)."""
    spec = importlib.util.spec_from_file_location(f"tools_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "tools"))  # as when run as a script: its sibling modules import
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "tools"))
    return module


@pytest.fixture(scope="module")
def shards(module_tmp) -> Path:
    out = module_tmp("shards")
    assert tool("make_shards").main(
        ["synthetic", "--out", str(out), "--overwrite", "--train", "16", "--val", str(VAL_SAMPLES), "--test", "8",
         "--image-size", "56", "--samples-per-shard", "8"]
    ) == 0
    splits = [str(out / split) for split in ("train", "val", "test")]
    assert tool("decoder_vocab").main([*splits, "--out", str(out / "vocab.json")]) == 0
    return out


def test_demo_configs_switch_the_diagnostics_on():
    demo = ROOT / "configs" / "demo"
    config = yaml.safe_load((demo / "base.yaml").read_text())
    names = [c["class_path"] for c in config["trainer"]["callbacks"]]
    assert [f"callbacks.{name}" for name in DIAGNOSTICS] == [n for n in names if n.split(".")[-1] in DIAGNOSTICS]
    # The stage overlays keep the base's callbacks (a list in an overlay would replace them all).
    for stage in ("stage1", "stage2"):
        assert "callbacks" not in yaml.safe_load((demo / f"{stage}.yaml").read_text()).get("trainer", {})


def test_demo_run_writes_scalars_heatmap_layout_and_projector(shards, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the demo config's checkpoint and metrics paths are relative
    monkeypatch.setattr(sys, "argv", ["lightning"])
    build_cli([
        "fit", f"--config={ROOT / 'configs' / 'demo' / 'base.yaml'}", f"--config={ROOT / 'configs' / 'demo' / 'stage2.yaml'}",
        *[f"--data.init_args.{split}_shards={shards / split}" for split in ("train", "val", "test")],
        f"--model.init_args.decoder.vocab_file={shards / 'vocab.json'}", "--model.init_args.init_from=null",
        "--data.init_args.batch_size=4", "--data.init_args.num_workers=0",
        "--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'tb'}",
    ])
    run = tmp_path / "tb" / "stage2"
    events = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()

    expected = {
        "val/recall@1", "val/recall@5", "val/recall@10", "val/mrr", "val/ndcg@10", "val/loss/decoder",
        "diag/alignment", "diag/uniformity/query", "diag/uniformity/target", "diag/cosine/positive",
        "diag/cosine/hardest_negative", "diag/cosine/gap", "diag/std_ratio/query", "diag/std_ratio/target",
        "diag/effective_rank/query", "diag/effective_rank/target", "diag/norm/query", "diag/norm/target",
        "diag/temperature", "diag/reason/norm/mean", "diag/reason/norm/token0", "diag/reason/norm/token7",
        "diag/reason/pairwise_cosine", "diag/attention/input", "diag/attention/reason", "diag/attention/embed",
        "diag/decoder_loss/stage2", "diag/latent_text/word_f1", "diag/latent_text/chance_word_f1",
        "diag/latent_text/information",
    }
    expected |= {"train/loss", "train/decoder/labelled_fraction"}  # training scalars get a chart too
    assert expected <= set(tags["scalars"]), expected - set(tags["scalars"])

    def value(tag: str) -> float:
        (event,) = events.Scalars(tag)  # one validation run: one value
        assert event.step == STEP
        return event.value

    shares = sum(value(f"diag/attention/{part}") for part in ("input", "reason", "embed"))
    assert shares == pytest.approx(1.0, abs=1e-4)
    assert value("diag/temperature") == pytest.approx(0.05)  # the demo's temperature
    assert 1.0 <= value("diag/effective_rank/query") <= VAL_SAMPLES + 1e-4
    assert value("diag/decoder_loss/stage2") == pytest.approx(value("val/loss/decoder"), rel=1e-5)

    # The latent decoder's texts beside their labels, one row per decoded query (8 by default).
    (text_event,) = events.Tensors("diag/latent_text/text_summary")
    table = text_event.tensor_proto.string_val[0].decode()
    assert text_event.step == STEP and table.startswith("| label | decoded from the reason states |")
    assert len(table.splitlines()) == 2 + min(8, VAL_SAMPLES)
    assert 0.0 <= value("diag/latent_text/chance_word_f1") <= 1.0 and 0.0 <= value("diag/latent_text/word_f1") <= 1.0

    (heatmap,) = events.Images("diag/similarity")
    assert (heatmap.width, heatmap.height, heatmap.step) == (VAL_SAMPLES * 4, VAL_SAMPLES * 4, STEP)
    # The custom-scalars layout is there, and every scalar of the run has a chart in it.
    (config_event,) = events.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(config_event.tensor_proto.string_val[0])
    assert [category.title for category in layout.category] == list(LAYOUT)
    patterns = [tag for c in layout.category for chart in c.chart for tag in chart.multiline.tag]
    unplaced = [tag for tag in tags["scalars"] if tag != "epoch" and not any(re.search(p, tag) for p in patterns)]
    assert not unplaced, unplaced

    config = text_format.Parse((run / "projector_config.pbtxt").read_text(), ProjectorConfig())
    (embedding,) = config.embeddings
    assert embedding.tensor_path.startswith(f"{STEP:05d}/")
    vectors = (run / embedding.tensor_path).read_text().splitlines()
    with (run / embedding.metadata_path).open() as f:
        metadata = list(csv.reader(f, delimiter="\t"))
    assert len(vectors) == 2 * VAL_SAMPLES  # the subset's queries, then their targets
    assert metadata[0] == ["side", "key", "text"] and len(metadata) == 2 * VAL_SAMPLES + 1
    assert [row[0] for row in metadata[1:]] == ["query"] * VAL_SAMPLES + ["target"] * VAL_SAMPLES
    assert all(row[2] for row in metadata[1:])  # every row carries its caption
    assert (run / embedding.sprite.image_path).is_file() and list(embedding.sprite.single_image_dim) == [32, 32]

"""Acceptance: a run of the demo config leaves scalars, the heatmap, the layout and the projector in TensorBoard.

The demo's own stage-2 config runs (its callbacks unchanged) for three steps on a few synthetic
scenes, validating every two steps (so at step 2 and, at the end of training, at step 3), and
is then tested from its last checkpoint into the same run, as ``make demo`` does; the run
folder is read with TensorBoard's own event reader and projector-config parser.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from google.protobuf import text_format
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig

from lame_pl.callbacks.dashboard_layout import LAYOUT, layout_for
from lame_pl.callbacks.similarity_heatmap import figure_size
from lame_pl.cli import build_cli
from lame_pl.decoder_vocab import write_decoder_vocab

ROOT = Path(__file__).resolve().parents[1]
DIAGNOSTICS = ["DashboardLayout", "EmbeddingHealth", "ReasonDiagnostics", "SimilarityHeatmap", "EmbeddingProjector"]
VAL_SAMPLES = 8
MAX_STEPS = 3
# Lightning logs a validation inside training at the optimiser steps before its batch: the ones
# after steps 2 and 3 (the end of training, though 3 is no multiple of val_check_interval 2).
VAL_STEPS = [1, 2]
STEP = VAL_STEPS[-1]


@pytest.fixture(scope="module")
def shards(synthetic_shards) -> Path:
    return synthetic_shards(16, VAL_SAMPLES, 8, 8)


@pytest.fixture(scope="module")
def vocab(shards, module_tmp) -> Path:
    """The shards' decoder vocabulary, as ``tools/decoder_vocab.py`` writes it (beside the shared shards, not in them)."""
    out = module_tmp("vocab") / "vocab.json"
    write_decoder_vocab([shards / split for split in ("train", "val", "test")], out)
    return out


def test_demo_configs_switch_the_diagnostics_on():
    demo = ROOT / "configs" / "demo"
    config = yaml.safe_load((demo / "base.yaml").read_text())
    names = [c["class_path"] for c in config["trainer"]["callbacks"]]
    assert [f"callbacks.{name}" for name in DIAGNOSTICS] == [n for n in names if n.split(".")[-1] in DIAGNOSTICS]
    # The stage overlays keep the base's callbacks (a list in an overlay would replace them all).
    for stage in ("stage1", "stage2"):
        assert "callbacks" not in yaml.safe_load((demo / f"{stage}.yaml").read_text()).get("trainer", {})


@pytest.fixture(scope="module")
def demo_run(shards, vocab, module_tmp) -> Path:
    """The stage-2 demo config fitted for MAX_STEPS steps, then tested from its last checkpoint: its run folder."""
    root = module_tmp("demo_run")
    common = [
        f"--config={ROOT / 'configs' / 'demo' / 'base.yaml'}",
        f"--config={ROOT / 'configs' / 'demo' / 'stage2.yaml'}",
        *[f"--data.init_args.{split}_shards={shards / split}" for split in ("train", "val", "test")],
        f"--model.init_args.decoder.vocab_file={vocab}",
        "--model.init_args.init_from=null",
        "--data.init_args.batch_size=4",
        "--data.init_args.num_workers=0",
        "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={root / 'tb'}",
    ]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)  # the demo config's checkpoint and metrics paths are relative
        patch.setattr(sys, "argv", ["lightning"])
        build_cli(
            [
                "fit",
                *common,
                f"--trainer.max_steps={MAX_STEPS}",
                "--trainer.val_check_interval=2",
                "--trainer.log_every_n_steps=1",
            ]
        )
        run = root / "tb" / "stage2"
        build_cli(["test", *common, f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"])
    return run


def read_events(run: Path) -> EventAccumulator:
    events = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return events


def read_layout(events: EventAccumulator) -> layout_pb2.Layout:
    """The run's custom-scalars layout: the first written, the one TensorBoard shows (the fit's and the test's are one)."""
    layouts = [
        layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
        for event in events.Tensors("custom_scalars__config__")
    ]
    assert layouts and all(layout == layouts[0] for layout in layouts)
    return layouts[0]


def test_demo_run_writes_scalars_heatmap_layout_and_projector(demo_run):
    run = demo_run
    events = read_events(run)
    tags = events.Tags()

    expected = {
        "val/recall@1",
        "val/recall@5",
        "val/recall@10",
        "val/mrr",
        "val/ndcg@10",
        "val/loss/decoder",
        "diag/alignment",
        "diag/uniformity/query",
        "diag/uniformity/target",
        "diag/cosine/positive",
        "diag/cosine/hardest_negative",
        "diag/cosine/gap",
        "diag/std_ratio/query",
        "diag/std_ratio/target",
        "diag/effective_rank/query",
        "diag/effective_rank/target",
        "diag/norm/query",
        "diag/norm/target",
        "diag/temperature",
        "diag/reason/norm/mean",
        "diag/reason/norm/token0",
        "diag/reason/norm/token7",
        "diag/reason/pairwise_cosine",
        "diag/attention/input",
        "diag/attention/reason",
        "diag/attention/embed",
        "diag/decoder_loss/stage2",
        "diag/latent_text/word_f1",
        "diag/latent_text/chance_word_f1",
        "diag/latent_text/information",
    }
    expected |= {"train/loss", "train/decoder/labelled_fraction"}  # training scalars get a chart too
    assert expected <= set(tags["scalars"]), expected - set(tags["scalars"])

    def value(tag: str) -> float:
        scalars = events.Scalars(tag)  # one value per validation run: the last one's
        assert [event.step for event in scalars] == VAL_STEPS
        return scalars[-1].value

    shares = sum(value(f"diag/attention/{part}") for part in ("input", "reason", "embed"))
    assert shares == pytest.approx(1.0, abs=1e-4)
    assert value("diag/temperature") == pytest.approx(0.05)  # the demo's temperature
    assert 1.0 <= value("diag/effective_rank/query") <= VAL_SAMPLES + 1e-4
    assert value("diag/decoder_loss/stage2") == pytest.approx(value("val/loss/decoder"), rel=1e-5)

    # The latent decoder's texts beside their labels, one row per decoded query (8 by default).
    text_event = events.Tensors("diag/latent_text/text_summary")[-1]
    table = text_event.tensor_proto.string_val[0].decode()
    assert text_event.step == STEP and table.startswith("| label | decoded from the reason states |")
    assert len(table.splitlines()) == 2 + min(8, VAL_SAMPLES)
    assert 0.0 <= value("diag/latent_text/chance_word_f1") <= 1.0 and 0.0 <= value("diag/latent_text/word_f1") <= 1.0

    heatmaps = events.Images("diag/similarity")
    assert [heatmap.step for heatmap in heatmaps] == VAL_STEPS
    # The matrix (4 pixels a cell) framed by its axis labels and colour scale.
    assert (heatmaps[-1].height, heatmaps[-1].width) == figure_size(VAL_SAMPLES, VAL_SAMPLES, cell=4)
    # The custom-scalars layout is there, and every scalar of the run has a chart in it.
    layout = read_layout(events)
    assert [category.title for category in layout.category] == list(LAYOUT)
    patterns = [tag for c in layout.category for chart in c.chart for tag in chart.multiline.tag]
    # Not curves: the epoch counter, and the test split's size (show_metrics prints it).
    unplaced = [
        tag
        for tag in tags["scalars"]
        if tag not in ("epoch", "test/num_candidates") and not any(re.search(p, tag) for p in patterns)
    ]
    assert not unplaced, unplaced

    config = text_format.Parse((run / "projector_config.pbtxt").read_text(), ProjectorConfig())
    assert [e.tensor_path.split("/")[0] for e in config.embeddings] == [f"{step:05d}" for step in VAL_STEPS]
    embedding = config.embeddings[-1]
    vectors = (run / embedding.tensor_path).read_text().splitlines()
    with (run / embedding.metadata_path).open() as f:
        metadata = list(csv.reader(f, delimiter="\t"))
    assert len(vectors) == 2 * VAL_SAMPLES  # the subset's queries, then their targets
    assert metadata[0] == ["side", "key", "text"] and len(metadata) == 2 * VAL_SAMPLES + 1
    assert [row[0] for row in metadata[1:]] == ["query"] * VAL_SAMPLES + ["target"] * VAL_SAMPLES
    assert all(row[2] for row in metadata[1:])  # every row carries its caption
    assert (run / embedding.sprite.image_path).is_file() and list(embedding.sprite.single_image_dim) == [32, 32]


def test_every_chart_of_the_layout_shows_a_tag_the_demo_logs(demo_run):
    """No chart of the dashboard opens empty on the demo: each matches a scalar of the run (fit and test)."""
    events = read_events(demo_run)
    tags = events.Tags()["scalars"]
    layout = read_layout(events)
    empty = [
        f"{category.title} / {chart.title}: {list(chart.multiline.tag)}"
        for category in layout.category
        for chart in category.chart
        if not any(re.search(pattern, tag) for pattern in chart.multiline.tag for tag in tags)
    ]
    assert not empty, f"charts that match no tag of the demo run: {empty}"
    # Each pattern is anchored, so that a family does not catch another's tags (data/ and val/data/).
    assert all(p.startswith("^") for c in layout.category for chart in c.chart for p in chart.multiline.tag)


def test_test_metrics_sit_at_the_step_of_the_checkpoint_tested(demo_run):
    """`lightning test --ckpt_path` starts a trainer at step 0; its metrics go to the checkpoint's step instead."""
    events = read_events(demo_run)
    for tag in ("test/recall@1", "test/mrr", "test/loss", "chance/recall@1", "chance/mrr"):
        assert [event.step for event in events.Scalars(tag)] == [MAX_STEPS], tag
    # The metrics file names the step too (MetricsFile writes the test's callback metrics).
    (path,) = demo_run.parents[1].rglob("test_metrics.json")
    metrics = json.loads(path.read_text())
    assert metrics["step"] == MAX_STEPS and "test/recall@1" in metrics


def test_the_mixture_chart_is_only_in_runs_that_train_on_a_mixture():
    """The demo logs no data/mixture/ tag, so its layout has no such chart; a mixture run's has it."""
    plain = layout_for(SimpleNamespace(datamodule=SimpleNamespace(mixture=None)))
    mixed = layout_for(SimpleNamespace(datamodule=SimpleNamespace(mixture=["set a", "set b"])))
    assert "mixture shares" not in plain["5 data"] and mixed["5 data"]["mixture shares"] == [
        "Multiline",
        [r"^data/mixture/"],
    ]
    assert "mixture shares" not in LAYOUT["5 data"]  # the module's own layout is left as it was
    assert layout_for(SimpleNamespace()) == plain  # no data module (the loaders given to fit directly)

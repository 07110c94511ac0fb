"""Two processes on the CPU (gloo): the gathered contrastive loss trains, and test ranks the whole split."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "tests" / "conf" / "tiny.yaml"
LIGHTNING = Path(sys.executable).with_name("lightning")


# 32 training, 10 validation and 10 test scenes, 5 a shard: each rank reads its own shards of every split.
SIZES = (32, 10, 10, 5)


def two_ranks(tmp_path: Path, subcommand: str, *args: str) -> subprocess.CompletedProcess:
    """``lightning SUBCOMMAND`` with the tiny config on two gloo ranks, run in ``tmp_path``; fails on an error."""
    run = subprocess.run(
        [str(LIGHTNING), subcommand, f"--config={CONF}", "--trainer.devices=2", "--trainer.strategy=ddp",
         f"--trainer.default_root_dir={tmp_path}", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def test_two_process_fit_and_test(tmp_path, synthetic_shards):
    shards = synthetic_shards(*SIZES)
    common = [
        *[f"--data.init_args.{s}_shards={shards / s}" for s in ("train", "val", "test")],
        "--model.init_args.stage=2",
    ]
    two_ranks(tmp_path, "fit", *common, "--trainer.max_steps=2", "--trainer.limit_val_batches=0")
    out = tmp_path / "metrics.json"
    two_ranks(
        tmp_path, "test", *common, "--trainer.callbacks+=callbacks.MetricsFile", f"--trainer.callbacks.path={out}"
    )
    metrics = json.loads(out.read_text())
    # Each rank read one of the two test shards; the ranking saw all ten captions.
    assert metrics["test/num_candidates"] == 10
    assert abs(metrics["chance/recall@1"] - 0.1) < 1e-6


def test_two_process_fit_on_instruction_pairs_with_uneven_hard_negatives(tmp_path):
    """Ranks draw batches with different numbers of hard negatives (or none); the gather copes."""
    from test_pairs import ROWS, write_pair_shards

    write_pair_shards(tmp_path / "src", tmp_path / "pairs", ROWS * 2, 3)
    two_ranks(
        tmp_path,
        "fit",
        "--data=datamodules.InstructionPairDataModule",
        f"--data.init_args.train_shards={tmp_path / 'pairs' / 'train'}",
        "--data.init_args.batch_size=2",
        "--data.init_args.num_workers=0",
        "--model.init_args.stage=2",
        "--trainer.max_steps=3",
        "--trainer.limit_val_batches=0",
    )


def test_two_process_validation_diagnostics_match_one_process(tmp_path, monkeypatch, synthetic_shards):
    """The diagnostics callbacks neither deadlock nor change a number under DDP, and the ranking is whole-split.

    Each rank ranks its own queries against both ranks' targets; the result must equal one
    process ranking all ten. The subset statistics come from rank 0's first four samples, which
    are the first four of one process too (shard 0 is read first by both).
    """
    from lame_pl.cli import build_cli

    shards = synthetic_shards(*SIZES)
    callbacks = []
    for name in ("EmbeddingHealth", "ReasonDiagnostics", "SimilarityHeatmap", "EmbeddingProjector"):
        callbacks += [f"--trainer.callbacks+=callbacks.{name}", "--trainer.callbacks.num_samples=4"]
    callbacks += ["--trainer.callbacks+=callbacks.DashboardLayout", "--trainer.callbacks+=callbacks.MetricsFile"]

    def args(name: str) -> list[str]:
        return [
            f"--data.init_args.val_shards={shards / 'val'}",
            "--model.init_args.stage=2",
            "--trainer.logger=lightning.pytorch.loggers.TensorBoardLogger",
            f"--trainer.logger.save_dir={tmp_path}",
            "--trainer.logger.name=",
            f"--trainer.logger.version={name}",
            *callbacks,
            f"--trainer.callbacks.path={tmp_path / name}.json",
        ]

    two_ranks(tmp_path, "validate", *args("two"))
    monkeypatch.setattr(sys, "argv", ["lightning"])
    build_cli(["validate", f"--config={CONF}", *args("one")])
    one, two = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("one", "two"))
    compared = [
        name
        for name in one
        if name.startswith(("val/recall", "val/mrr", "val/ndcg", "diag/")) and "decoder" not in name
    ]
    assert "val/ndcg@10" in compared and "diag/attention/reason" in compared and "diag/effective_rank/query" in compared
    for name in compared:
        assert abs(one[name] - two[name]) < 1e-5, (name, one[name], two[name])
    # The decoder loss is summed over both ranks: it is the validation split's, as val/loss/decoder is.
    assert abs(two["diag/decoder_loss/stage2"] - two["val/loss/decoder"]) < 1e-5
    assert (tmp_path / "two" / "projector_config.pbtxt").is_file()


def test_two_process_stage1_with_projection_and_learnable_temperature(tmp_path, synthetic_shards):
    """Stage 1 has no InfoNCE: [EMBED], the projection and the logit scale must not wait for gradients."""
    shards = synthetic_shards(*SIZES)
    fit = two_ranks(
        tmp_path,
        "fit",
        f"--data.init_args.train_shards={shards / 'train'}",
        "--data.init_args.batch_size=2",
        "--model.init_args.stage=1",
        "--model.init_args.embed_dim=16",
        "--model.init_args.learnable_temperature=true",
        "--trainer.max_steps=2",
        "--trainer.limit_val_batches=0",
    )
    assert "`Trainer.fit` stopped: `max_steps=2` reached" in fit.stdout + fit.stderr
    assert "stage 1 trains" in fit.stdout + fit.stderr


def test_two_process_stage1_when_no_row_has_a_decoder_label(tmp_path):
    """Image-only targets: every batch's decoder loss is the connected zero, and DDP still reduces."""
    from test_pairs import ROWS, write_pair_shards

    image_only = [row for row in ROWS if "target_text" not in row]
    assert len(image_only) == 2
    write_pair_shards(tmp_path / "src", tmp_path / "pairs", image_only * 4, 2)
    fit = two_ranks(
        tmp_path,
        "fit",
        "--data=datamodules.InstructionPairDataModule",
        f"--data.init_args.train_shards={tmp_path / 'pairs' / 'train'}",
        "--data.init_args.batch_size=2",
        "--data.init_args.decoder_label=target_text",
        "--data.init_args.num_workers=0",
        "--model.init_args.stage=1",
        "--trainer.max_steps=2",
        "--trainer.limit_val_batches=0",
    )
    assert "`Trainer.fit` stopped: `max_steps=2` reached" in fit.stdout + fit.stderr

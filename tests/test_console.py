"""What a fit prints (issue 13, items 4, 5 and 7): a step progress bar with samples/s, no noise, a help that
names the project's classes."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lame_pl.callbacks.console import ParameterSummary, SamplesPerSecond, StepProgressBar
from lame_pl.cli import build_cli, console_callbacks, silence_noise
from lame_pl.decoder_vocab import caption_token_ids

ROOT = Path(__file__).resolve().parents[1]
LIGHTNING = Path(sys.executable).with_name("lightning")
DEMO = ROOT / "configs" / "demo"
MAX_STEPS = 4

# What every fit printed before (issue 13 item 5), none of which applies to the demo.
NOISE = {
    "IterableDataset length": "Your `IterableDataset` has `__len__` defined",
    "pytree deprecation": "isinstance(treespec, LeafSpec)",
    "FLOPs not measured": "FLOPs",
    "litlogger tip": "litlogger",
    "empty skip summary": "skipped 0 samples",
    "our own summary callback": "Trainer already configured with model summary callbacks",
    "checkpoint weights_only default": "`weights_only` was not set",
}


@pytest.fixture(scope="module")
def demo_fit(small_shards, module_tmp) -> tuple[str, Path]:
    """The stage-1 demo config (its callbacks, the demo's log interval) on the tiny backbone, as a user runs
    it: ``lightning fit`` in a subprocess, without a terminal. Its stdout and stderr together, and its run."""
    root = module_tmp("console")
    vocab = root / "vocab.json"
    vocab.write_text(json.dumps(caption_token_ids([small_shards / "train", small_shards / "val"])))
    cmd = [
        str(LIGHTNING),
        "fit",
        f"--config={DEMO / 'base.yaml'}",
        f"--config={DEMO / 'stage1.yaml'}",
        "--model.init_args.backbone.preset=tiny",
        "--model.init_args.backbone.min_pixels=3136",
        "--model.init_args.backbone.max_pixels=3136",
        "--model.init_args.decoder.preset=tiny",
        f"--model.init_args.decoder.vocab_file={vocab}",
        "--model.init_args.num_reason_tokens=2",
        *(f"--data.init_args.{split}_shards={small_shards / split}" for split in ("train", "val", "test")),
        "--data.init_args.batch_size=4",
        "--data.init_args.num_workers=0",
        f"--trainer.max_steps={MAX_STEPS}",
        f"--trainer.val_check_interval={MAX_STEPS}",
        f"--trainer.logger.init_args.save_dir={root}",
    ]
    result = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    return output, root / "stage1"


@pytest.mark.parametrize("name", NOISE)
def test_a_demo_fit_prints_no_noise(name, demo_fit):
    output, run = demo_fit
    assert (run / "checkpoints" / "last.ckpt").exists()  # a checkpoint was saved: its INFO would have shown
    assert NOISE[name] not in output, f"{name} printed"


def test_a_real_warning_still_shows(demo_fit):
    """8 training batches under the demo's log interval of 10: Lightning's warning applies, and is printed."""
    output, _ = demo_fit
    assert "is smaller than the logging interval Trainer(log_every_n_steps=10)" in output
    # The project's own lines go through the logger the litlogger tip is filtered from.
    assert "stage 1 trains" in output


def test_the_progress_bar_counts_steps_of_max_steps_with_samples_per_sec(demo_fit):
    output, _ = demo_fit
    lines = output.replace("\r", "\n").splitlines()
    final = [line for line in lines if f"{MAX_STEPS}/{MAX_STEPS} [" in line and line.startswith("stage1 epoch 0:")]
    assert final, "\n".join(lines[-20:])
    bar = final[-1]
    assert "step/s" in bar and re.search(r"samples/s=\d+\.\d", bar), bar
    assert re.search(r"loss=\d", bar) and re.search(r"loss/decoder=\d", bar) and re.search(r"val/loss=\d", bar), bar
    assert "v_num" not in output and "Epoch 0/" not in output


def test_samples_per_sec_reach_tensorboard(demo_fit):
    _, run = demo_fit
    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    rates = events.Scalars("throughput/samples_per_sec")
    # From the second step on (the first has no earlier batch to time from), at the demo's log interval.
    assert rates and all(event.value > 0 for event in rates)


def test_the_summary_keeps_flops_when_measured(caplog):
    data = [
        (" ", ["0"]),
        ("Name", ["net"]),
        ("Type", ["Linear"]),
        ("Params", ["10"]),
        ("Mode", ["train"]),
        ("FLOPs", ["0"]),
    ]
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.callbacks.model_summary"):
        ParameterSummary.summarize(data, 10, 10, 0.0, {"train": 1, "eval": 0}, total_flops=0)
        ParameterSummary.summarize(
            data[:-1] + [("FLOPs", ["2 K"])], 10, 10, 0.0, {"train": 1, "eval": 0}, total_flops=2000
        )
    unmeasured, measured = (record.getMessage() for record in caplog.records)
    assert "Trainable params" in unmeasured and "FLOPs" not in unmeasured and "Total Flops" not in unmeasured
    assert "FLOPs" in measured and "Total Flops" in measured


def test_only_the_noise_is_silenced(caplog):
    """The filters match the noise's text and origin: the same text from elsewhere, or another message from
    the same place, still shows."""
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        silence_noise()
        pytree = "`isinstance(treespec, LeafSpec)` is deprecated, use ... instead."
        warnings.warn_explicit(pytree, FutureWarning, "_pytree.py", 21, module="lightning.pytorch.utilities._pytree")
        warnings.warn_explicit(pytree, FutureWarning, "mine.py", 1, module="mine")
        warnings.warn_explicit(
            "something else", FutureWarning, "_pytree.py", 21, module="lightning.pytorch.utilities._pytree"
        )
        warnings.warn("an unrelated UserWarning", UserWarning, stacklevel=1)
    assert [str(w.message) for w in shown] == [pytree, "something else", "an unrelated UserWarning"]
    # A shard data module answers Lightning's iterable-dataset warnings; another data module keeps them.
    length = "Your `IterableDataset` has `__len__` defined. In combination with multi-process data loading ..."
    resume = (
        "You're resuming from a checkpoint that ended before the epoch ended and your dataloader is not "
        "resumable. This can cause unreliable results ..."
    )
    for shard_data in (False, True):
        with warnings.catch_warnings(record=True) as shown:
            warnings.simplefilter("always")
            silence_noise(shard_data=shard_data)
            warnings.warn_explicit(length, UserWarning, "data.py", 123, module="lightning.pytorch.utilities.data")
            warnings.warn_explicit(
                resume,
                PossibleUserWarning,
                "training_epoch_loop.py",
                224,
                module="lightning.pytorch.loops.training_epoch_loop",
            )
            warnings.warn_explicit("another", UserWarning, "data.py", 1, module="lightning.pytorch.utilities.data")
        assert [str(w.message) for w in shown] == ([] if shard_data else [length, resume]) + ["another"]
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO):
        log.info("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger](x) ...")
        log.info("stage 1 trains 1 of 2 parameters")
    assert [record.getMessage() for record in caplog.records] == ["stage 1 trains 1 of 2 parameters"]


def test_console_callbacks_leave_a_configs_own_choices():
    added = console_callbacks({}, [])
    assert [type(c) for c in added] == [StepProgressBar, SamplesPerSecond, ParameterSummary]
    assert [type(c) for c in console_callbacks({"enable_progress_bar": False, "enable_model_summary": False}, [])] == [
        SamplesPerSecond
    ]
    own = [RichProgressBar(), SamplesPerSecond(window=3)]
    assert [type(c) for c in console_callbacks({}, own)] == [ParameterSummary]
    with pytest.raises(ValueError, match="window 0"):
        SamplesPerSecond(window=0)


def test_help_names_the_project_and_lists_its_classes(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning"])
    with pytest.raises(SystemExit):
        build_cli(["--help"])
    top = capsys.readouterr().out
    assert "LaME" in top and "Lightning Trainer command line tool" not in top
    with pytest.raises(SystemExit):
        build_cli(["fit", "--help"])
    fit = capsys.readouterr().out
    for name in (
        "lame_pl.LaMEModule",
        "lame_pl.clip_anchor.CLIPAnchor",
        "datamodules.ImageTextDataModule",
        "datamodules.InstructionPairDataModule",
        "datamodules.clip.CLIPImageTextDataModule",
        "datamodules.CorpusDataModule",
    ):
        assert name in top and name in re.sub(r"\s+", "", fit), name

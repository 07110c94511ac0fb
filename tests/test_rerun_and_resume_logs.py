"""Reruns and resumes leave one coherent run (issue 12, items 5 and 6).

- A resumed fit hides from TensorBoard what the killed run logged after its checkpoint, so every
  ``train/loss`` step appears once, with the resumed run's value.
- A fresh fit into a checkpoint folder that holds an earlier run's checkpoints is refused with one
  line, unless ``--start_over true`` (old checkpoints deleted, old TensorBoard steps hidden).
- ``test`` does not overwrite the training run's ``config.yaml``.
- ``data/skipped/*`` in TensorBoard holds the epoch summary's totals at the end of every epoch.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning import LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lame_pl.callbacks import DataHealth
from lame_pl.cli import build_cli

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "tests" / "conf" / "tiny.yaml"
LIGHTNING = Path(sys.executable).with_name("lightning")


@pytest.fixture(scope="module")
def shards(small_shards) -> Path:
    return small_shards


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    """LightningCLI warns when both sys.argv and ``args`` are given."""
    monkeypatch.setattr(sys, "argv", ["lightning"])


def run_args(shards: Path, save_dir: Path, *extra: str, subcommand: str = "fit") -> list[str]:
    """The tiny config, logging every step to a TensorBoard run with a pinned version, and an
    AtomicCheckpoint in that run's default folder (``<save_dir>/tb/run/checkpoints``)."""
    return [
        subcommand,
        f"--config={CONF}",
        f"--data.init_args.train_shards={shards / 'train'}",
        f"--data.init_args.test_shards={shards / 'test'}",
        "--trainer.limit_val_batches=0",
        "--trainer.logger=lightning.pytorch.loggers.TensorBoardLogger",
        f"--trainer.logger.save_dir={save_dir}",
        "--trainer.logger.name=tb",
        "--trainer.logger.version=run",
        "--trainer.logger.default_hp_metric=false",
        "--trainer.callbacks+=callbacks.AtomicCheckpoint",
        "--trainer.callbacks.keep_last_n=5",
        *extra,
    ]


def run_folder(save_dir: Path) -> Path:
    return save_dir / "tb" / "run"


def losses(path: Path) -> list[tuple[int, float]]:
    """``train/loss`` as TensorBoard reads it from a run folder (or one event file): (step, value)."""
    events = EventAccumulator(str(path), size_guidance={"scalars": 0})
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars("train/loss")]


def event_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("events.out.tfevents.*"))


@pytest.fixture(scope="module")
def killed(shards, module_tmp) -> Path:
    """A run that checkpointed at step 3 and went on logging steps 3 and 4 (killed after step 5)."""
    save_dir = module_tmp("killed")
    build_cli(run_args(shards, save_dir, "--trainer.max_steps=5", "--trainer.callbacks.every_n_train_steps=3"))
    return save_dir


def copy_run(killed: Path, tmp_path: Path) -> Path:
    shutil.copytree(killed, tmp_path / "runs", symlinks=True)
    return tmp_path / "runs"


# --- Item 5: a resume hides the steps the killed run logged after its checkpoint ------------------------


def test_a_resumed_run_shows_each_step_once_with_the_resumed_values(killed, shards, tmp_path, monkeypatch):
    save_dir = copy_run(killed, tmp_path)
    folder = run_folder(save_dir)
    killed_losses = dict(losses(folder))
    assert sorted(killed_losses) == [0, 1, 2, 3, 4]
    assert (folder / "checkpoints" / "last.ckpt").resolve().name == "epoch=0-step=3.ckpt"
    monkeypatch.chdir(tmp_path)
    build_cli(
        run_args(
            shards, save_dir, "--trainer.max_steps=6", "--trainer.callbacks.every_n_train_steps=3", "--ckpt_path=last"
        )
    )
    resumed_file = event_files(folder)[-1]
    resumed = dict(losses(resumed_file))
    assert sorted(resumed) == [3, 4, 5]  # the resumed run logs from the checkpoint's global step on
    # The resumed steps train on other batches: were the old events kept, they would show.
    assert all(resumed[step] != killed_losses[step] for step in (3, 4))

    shown = losses(folder)
    steps = [step for step, _ in shown]
    assert steps == [0, 1, 2, 3, 4, 5]  # each step once, none lost
    assert dict(shown) == {**{s: killed_losses[s] for s in (0, 1, 2)}, **resumed}


def test_a_sigkilled_fit_resumed_with_ckpt_path_last_shows_each_step_once(shards, tmp_path):
    """The real `lightning fit`, SIGKILLed once it has logged a step past its checkpoint, then resumed."""
    save_dir = tmp_path / "runs"
    folder = run_folder(save_dir)
    # A checkpoint every 4 steps and a kill as soon as step 5 is logged: the next save is 3 steps away.
    args = run_args(shards, save_dir, "--trainer.callbacks.every_n_train_steps=4")
    killed = subprocess.Popen(
        [str(LIGHTNING), *args, "--trainer.max_steps=100"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    past_checkpoint = False
    while not past_checkpoint and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
        # The logger flushes after every step: the events file shows what the run has logged.
        past_checkpoint = (
            (folder / "checkpoints" / "last.ckpt").exists()
            and folder.is_dir()
            and any(step > 4 for step, _ in (losses(folder) if event_files(folder) else []))
        )
    killed.send_signal(signal.SIGKILL)
    stderr = killed.communicate(timeout=60)[1]
    assert past_checkpoint, f"the run never logged a step past its checkpoint: {stderr[-3000:]}"
    killed_losses = dict(losses(folder))
    checkpoint = torch.load(folder / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True, mmap=True)
    restored, logged = checkpoint["global_step"], max(killed_losses)
    assert sorted(killed_losses) == list(range(logged + 1)) and logged >= restored  # logged past it

    resumed = subprocess.run(
        [str(LIGHTNING), *args, f"--trainer.max_steps={logged + 2}", "--ckpt_path=last"],
        cwd=tmp_path,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    resumed_losses = dict(losses(event_files(folder)[-1]))
    assert sorted(resumed_losses) == list(range(restored, logged + 2))
    shown = losses(folder)
    assert [step for step, _ in shown] == list(range(logged + 2))  # each step once, none lost
    assert dict(shown) == {**{s: killed_losses[s] for s in range(restored)}, **resumed_losses}


# --- Item 6: a fresh fit into a run with checkpoints, start over, and config.yaml -----------------------


def test_a_fresh_fit_into_a_folder_with_checkpoints_is_refused_in_one_line(killed, shards, tmp_path):
    save_dir = copy_run(killed, tmp_path)
    checkpoints = run_folder(save_dir) / "checkpoints"
    before = {p.name: p.stat().st_mtime_ns for p in checkpoints.iterdir()}
    with pytest.raises(SystemExit) as error:
        build_cli(run_args(shards, save_dir, "--trainer.max_steps=1"))
    text = str(error.value.code)
    assert "\n" not in text
    assert text.startswith(f"error: checkpoint folder {checkpoints} already holds an earlier run's checkpoints")
    assert "--ckpt_path last" in text and "--start_over true" in text
    assert {p.name: p.stat().st_mtime_ns for p in checkpoints.iterdir()} == before  # nothing written


def test_start_over_deletes_the_old_checkpoints_and_hides_the_old_steps(killed, shards, tmp_path):
    save_dir = copy_run(killed, tmp_path)
    folder = run_folder(save_dir)
    old = dict(losses(folder))
    cli = build_cli(
        run_args(
            shards,
            save_dir,
            "--trainer.max_steps=2",
            "--trainer.callbacks.every_n_train_steps=1",
            "--data.init_args.batch_size=2",
            "--start_over=true",
        )
    )
    assert cli.trainer.global_step == 2
    checkpoints = folder / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt", "last.ckpt"]
    assert (checkpoints / "last.ckpt").resolve().name == "epoch=0-step=2.ckpt"  # last.ckpt is the newest
    new = dict(losses(event_files(folder)[-1]))
    assert all(new[step] != old[step] for step in new)
    assert losses(folder) == sorted(new.items())  # the earlier run's steps 0-4 no longer shown
    # The saved config does not delete again when fitted from.
    assert "start_over: false" in (folder / "config.yaml").read_text()


def test_start_over_with_ckpt_path_or_outside_fit_is_refused(killed, shards, tmp_path):
    save_dir = copy_run(killed, tmp_path)
    with pytest.raises(SystemExit, match=r"^error: --start_over true and --ckpt_path last contradict: give one$"):
        build_cli(run_args(shards, save_dir, "--trainer.max_steps=6", "--start_over=true", "--ckpt_path=last"))
    with pytest.raises(SystemExit, match=r"^error: --start_over is for fit, not test$"):
        build_cli(run_args(shards, save_dir, "--start_over=true", subcommand="test"))


def test_a_test_run_leaves_the_training_config_alone(killed, shards, tmp_path):
    save_dir = copy_run(killed, tmp_path)
    folder = run_folder(save_dir)
    trained_config = (folder / "config.yaml").read_bytes()
    build_cli(run_args(shards, save_dir, f"--ckpt_path={folder / 'checkpoints' / 'last.ckpt'}", subcommand="test"))
    assert (folder / "config.yaml").read_bytes() == trained_config
    assert (folder / "config_test.yaml").is_file()


# --- Item 6: data/skipped/* reaches TensorBoard at the end of every epoch ------------------------------


class _Linear(LightningModule):
    """The smallest model that trains on ``{"x": tensor, "skipped": {...}}`` batches."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch["x"]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_skip_counts_in_tensorboard_agree_with_every_epoch_summary(tmp_path, caplog):
    """Skips in batches after the last logged step used to miss TensorBoard (log_every_n_steps > batches)."""
    skipped = [
        {},
        {"bad_image": 2},
        {"bad_image": 1, "empty_caption": 3},  # epoch 0
        {"empty_caption": 1},
        {},
        {"bad_image": 4},
    ]  # epoch 1
    batches = [{"x": torch.ones(2, 2), "skipped": s} for s in skipped]

    class Loader(torch.utils.data.Dataset):
        def __init__(self, epoch_batches):
            self.batches = epoch_batches

        def __len__(self):
            return 3

        def __getitem__(self, index):
            return self.batches.pop(0)

    logger = TensorBoardLogger(tmp_path, name="", version="run", default_hp_metric=False)
    trainer = Trainer(
        max_epochs=2,
        log_every_n_steps=50,
        logger=logger,
        callbacks=[DataHealth()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = torch.utils.data.DataLoader(Loader(list(batches)), batch_size=None)
    with caplog.at_level(logging.INFO):
        trainer.fit(_Linear(), loader)

    summaries = [int(m) for m in re.findall(r"train epoch \d: skipped \d+ samples \((\d+) in all\)", caplog.text)]
    assert summaries == [6, 11]
    events = EventAccumulator(str(tmp_path / "run"), size_guidance={"scalars": 0})
    events.Reload()
    tags = sorted(t for t in events.Tags()["scalars"] if t.startswith("data/skipped/"))
    assert tags == ["data/skipped/bad_image", "data/skipped/empty_caption", "data/skipped/total"]
    per_epoch = {tag: [e.value for e in events.Scalars(tag)] for tag in tags}
    assert per_epoch == {
        "data/skipped/bad_image": [3, 7],
        "data/skipped/empty_caption": [3, 4],
        "data/skipped/total": [6, 11],
    }
    assert per_epoch["data/skipped/total"] == summaries

"""Checkpoint files that survive a kill, and damaged or foreign files named in one line (issue 12, items 3, 4
and item 1's keep-last-N policy).

The kill test runs the real command line in a subprocess and SIGKILLs it in the middle of writing a
checkpoint, with ``$TMPDIR`` on another directory tree (a tmpfs where there is one).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import torch
from test_eval_mmeb import write_mmeb
from test_eval_mrmr import write_mrmr

from lame_pl.callbacks.checkpointing import AtomicCheckpointIO, atomic_link, is_temp_file
from lame_pl.cli import build_cli
from lame_pl.evaluation.run import main as eval_main

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "tests" / "conf" / "tiny.yaml"
LIGHTNING = Path(sys.executable).with_name("lightning")

# The command line with checkpoint writes interrupted: the KILL_AT_SAVE-th checkpoint written to disk
# is written half-way, KILL_MARKER is created and the process waits for its SIGKILL. A checkpoint
# reaches the disk either by torch.save into an open file or, in Lightning's own writer, by
# shutil.move out of $TMPDIR (a copy when $TMPDIR is another filesystem): both are caught.
KILL_MID_SAVE = """
import io, os, shutil, sys, time
import torch
save, move, calls = torch.save, shutil.move, [0]
def killed_here(data, f):
    f.write(data[: len(data) // 2])
    f.flush()
    open(os.environ["KILL_MARKER"], "w").close()
    time.sleep(600)
def is_due():
    calls[0] += 1
    return calls[0] >= int(os.environ["KILL_AT_SAVE"])
def slow_save(obj, f, *args, **kwargs):
    if not hasattr(f, "name") or not is_due():  # in-memory buffers are not writes to disk
        return save(obj, f, *args, **kwargs)
    buffer = io.BytesIO()
    save(obj, buffer, *args, **kwargs)
    killed_here(buffer.getvalue(), f)
def slow_move(src, dst, *args, **kwargs):
    if not str(dst).endswith(".ckpt") or not is_due():
        return move(src, dst, *args, **kwargs)
    with open(src, "rb") as source, open(dst, "wb") as target:
        killed_here(source.read(), target)
torch.save, shutil.move = slow_save, slow_move
sys.argv = ["lightning", *sys.argv[1:]]
from lame_pl.cli import main
main()
"""


@pytest.fixture(scope="module")
def shards(small_shards) -> Path:
    return small_shards


def fit_args(shards: Path, ckpt_dir: Path, *extra: str) -> list[str]:
    """The tiny config with an AtomicCheckpoint saving every step into ``ckpt_dir``."""
    return [
        "fit",
        f"--config={CONF}",
        f"--data.init_args.train_shards={shards / 'train'}",
        "--trainer.limit_val_batches=0",
        "--trainer.logger=false",
        f"--trainer.default_root_dir={ckpt_dir.parent}",
        "--trainer.callbacks+=callbacks.AtomicCheckpoint",
        f"--trainer.callbacks.dirpath={ckpt_dir}",
        "--trainer.callbacks.every_n_train_steps=1",
        *extra,
    ]


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    """LightningCLI warns when both sys.argv and ``args`` are given."""
    monkeypatch.setattr(sys, "argv", ["lightning"])


@pytest.fixture
def other_tmpdir(tmp_path, monkeypatch) -> Path:
    """``$TMPDIR`` on another directory tree than the checkpoints (tmpfs where there is one)."""
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else tmp_path / "elsewhere"
    folder = base / f"lame-tmpdir-{uuid.uuid4().hex[:8]}"
    folder.mkdir(parents=True)
    monkeypatch.setenv("TMPDIR", str(folder))
    monkeypatch.setattr(tempfile, "tempdir", None)  # Python caches the temporary directory
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def trained(shards, module_tmp) -> Path:
    """A checkpoint folder of 3 steps, saved every step, the newest 2 kept (keep_last_n)."""
    ckpt_dir = module_tmp("trained") / "checkpoints"
    argv, sys.argv = sys.argv, ["lightning"]
    try:
        build_cli(fit_args(shards, ckpt_dir, "--trainer.max_steps=3", "--trainer.callbacks.keep_last_n=2"))
    finally:
        sys.argv = argv
    return ckpt_dir


def step_of(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"]


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and (is_temp_file(p) or "tmp" in p.name)]


def test_last_is_a_link_to_the_newest_and_the_newest_n_steps_are_kept(trained):
    files = sorted(p.name for p in trained.iterdir())
    assert files == ["epoch=0-step=2.ckpt", "epoch=0-step=3.ckpt", "last.ckpt"]
    last = trained / "last.ckpt"
    assert last.is_symlink() and last.resolve() == (trained / "epoch=0-step=3.ckpt").resolve()
    assert step_of(last) == 3 and step_of(trained / "epoch=0-step=2.ckpt") == 2


def test_a_save_is_written_beside_its_file_never_in_tmpdir(tmp_path, other_tmpdir, monkeypatch):
    """Lightning's writer goes through $TMPDIR (a copy across filesystems, which a kill truncates)."""
    seen: list[str] = []
    real_open = open

    def spy(file, *args, **kwargs):
        seen.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", spy)
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(3)}}, tmp_path / "ckpt" / "a.ckpt")
    monkeypatch.undo()
    assert torch.equal(torch.load(tmp_path / "ckpt" / "a.ckpt", weights_only=True)["state_dict"]["w"], torch.ones(3))
    assert seen and all(Path(name).parent == tmp_path / "ckpt" for name in seen)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["a.ckpt"]


def test_a_link_falls_back_to_a_hard_link_where_symlinks_fail(tmp_path, monkeypatch):
    target = tmp_path / "epoch=0-step=1.ckpt"
    target.write_bytes(b"checkpoint")
    (tmp_path / "last.ckpt").write_bytes(b"older")

    def no_symlink(*args, **kwargs):
        raise OSError("symlinks not supported here")

    monkeypatch.setattr(os, "symlink", no_symlink)
    atomic_link(target, tmp_path / "last.ckpt")
    assert not (tmp_path / "last.ckpt").is_symlink()
    assert os.path.samefile(tmp_path / "last.ckpt", target)  # a hard link, not a second copy
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch=0-step=1.ckpt", "last.ckpt"]


@pytest.mark.parametrize("ckpt_path", ["last", "last.ckpt"])
def test_resume_skips_a_truncated_newest_checkpoint_with_a_warning(ckpt_path, trained, shards, tmp_path, other_tmpdir):
    """The newest checkpoint cut short (as a kill during a copy leaves it): the one before it resumes."""
    ckpt_dir = tmp_path / "checkpoints"
    shutil.copytree(trained, ckpt_dir, symlinks=True)
    newest = (ckpt_dir / "last.ckpt").resolve()
    newest.write_bytes(newest.read_bytes()[:4096])
    given = "last" if ckpt_path == "last" else str(ckpt_dir / "last.ckpt")
    with pytest.warns(UserWarning, match=rf"checkpoint {newest} is truncated or damaged .*: skipped"):
        cli = build_cli(
            fit_args(
                shards, ckpt_dir, "--trainer.max_steps=4", "--trainer.callbacks.keep_last_n=2", f"--ckpt_path={given}"
            )
        )
    assert Path(cli.trainer.ckpt_path).resolve() == (ckpt_dir / "epoch=0-step=2.ckpt").resolve()
    assert cli.trainer.global_step == 4
    last = ckpt_dir / "last.ckpt"
    assert step_of(last) == 4 and last.is_symlink()
    assert temp_files(ckpt_dir) == [] and temp_files(other_tmpdir) == []


def test_a_kill_during_a_save_resumes_from_the_newest_intact_checkpoint(shards, tmp_path, other_tmpdir):
    """`lightning fit` SIGKILLed halfway through writing its 4th checkpoint, then `--ckpt_path last`."""
    ckpt_dir = tmp_path / "run" / "checkpoints"
    marker = tmp_path / "saving"
    env = dict(os.environ, KILL_AT_SAVE="4", KILL_MARKER=str(marker), TMPDIR=str(other_tmpdir))
    args = fit_args(shards, ckpt_dir, "--trainer.callbacks.keep_last_n=2")
    killed = subprocess.Popen(
        [sys.executable, "-c", KILL_MID_SAVE, *args, "--trainer.max_steps=8"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not marker.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    stderr = killed.communicate(timeout=60)[1]
    assert marker.exists(), f"the run never reached its 4th save: {stderr[-3000:]}"
    assert killed.returncode == -signal.SIGKILL
    assert temp_files(other_tmpdir) == []  # no checkpoint-sized orphan in $TMPDIR
    assert sorted(p.name for p in ckpt_dir.glob("*.ckpt")) == [
        "epoch=0-step=2.ckpt",
        "epoch=0-step=3.ckpt",
        "last.ckpt",
    ]
    assert (ckpt_dir / "last.ckpt").resolve() == (ckpt_dir / "epoch=0-step=3.ckpt").resolve()
    assert step_of(ckpt_dir / "last.ckpt") == 3  # whole: the kill did not touch it
    partial = [p for p in ckpt_dir.iterdir() if is_temp_file(p)]
    assert len(partial) == 1 and partial[0].name.startswith(".epoch=0-step=4.ckpt.tmp-")  # killed mid-write

    resumed = subprocess.run(
        [str(LIGHTNING), *args, "--trainer.max_steps=5", "--ckpt_path=last"],
        cwd=tmp_path,
        env=dict(os.environ, TMPDIR=str(other_tmpdir)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Restoring states from the checkpoint path at {ckpt_dir / 'last.ckpt'}" in resumed.stderr
    assert step_of(ckpt_dir / "last.ckpt") == 5
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["epoch=0-step=4.ckpt", "epoch=0-step=5.ckpt", "last.ckpt"]
    assert temp_files(ckpt_dir) == [] and temp_files(other_tmpdir) == []


def test_a_sharded_checkpoint_folder_is_taken_as_it_is(tmp_path):
    """DeepSpeed saves a folder per checkpoint: only its strategy reads it, so it is not opened here."""
    from lame_pl.callbacks.checkpointing import newest_loadable_checkpoint

    older = tmp_path / "epoch=0-step=1.ckpt"
    torch.save({"state_dict": {}}, older)
    os.utime(older, (1, 1))
    (tmp_path / "epoch=0-step=2.ckpt" / "checkpoint").mkdir(parents=True)
    atomic_link(tmp_path / "epoch=0-step=2.ckpt", tmp_path / "last.ckpt")
    assert (tmp_path / "last.ckpt").is_symlink()
    assert newest_loadable_checkpoint(tmp_path) == tmp_path / "last.ckpt"


def test_keep_last_n_is_checked():
    from lame_pl.callbacks.checkpointing import AtomicCheckpoint

    with pytest.raises(ValueError, match="keep_last_n must be an integer >= 1, got 0"):
        AtomicCheckpoint(keep_last_n=0)
    with pytest.raises(ValueError, match="give neither monitor nor save_top_k"):
        AtomicCheckpoint(keep_last_n=2, monitor="val/loss")


# --- Item 4: a damaged or foreign file ends in one line naming it -------------------------------------

BAD_FILES = {
    "truncated.ckpt": "is truncated or damaged",
    "random.ckpt": "is not a torch checkpoint file (no zip archive header",
    "tensor.pt": "holds a Tensor, not a Lightning checkpoint",
}


@pytest.fixture(scope="module")
def bad_files(trained, module_tmp) -> dict[str, Path]:
    """A checkpoint cut in half, random bytes, and a torch file of a plain tensor."""
    folder = module_tmp("bad")
    whole = (trained / "epoch=0-step=2.ckpt").read_bytes()
    (folder / "truncated.ckpt").write_bytes(whole[: len(whole) // 2])
    (folder / "random.ckpt").write_bytes(os.urandom(4096))
    torch.save(torch.zeros(4), folder / "tensor.pt")
    return {name: folder / name for name in BAD_FILES}


def one_line_error(error: pytest.ExceptionInfo) -> str:
    text = str(error.value.code)
    assert text.startswith("error: ") and "\n" not in text and "Traceback" not in text, text
    return text


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_a_bad_ckpt_path_is_named_in_one_line(name, bad_files, shards, tmp_path):
    path = bad_files[name]
    with pytest.raises(SystemExit) as error:
        build_cli(fit_args(shards, tmp_path / "ckpt", "--trainer.max_steps=1", f"--ckpt_path={path}"))
    assert one_line_error(error).startswith(f"error: --ckpt_path {path} {BAD_FILES[name]}")


def test_a_last_ckpt_with_nothing_that_loads_beside_it_is_named(bad_files, shards, tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "last.ckpt").write_bytes(bad_files["truncated.ckpt"].read_bytes())
    with pytest.warns(UserWarning, match="is truncated or damaged"), pytest.raises(SystemExit) as error:
        build_cli(fit_args(shards, tmp_path / "ckpt", "--trainer.max_steps=1", f"--ckpt_path={folder / 'last.ckpt'}"))
    assert one_line_error(error).startswith(f"error: --ckpt_path {folder / 'last.ckpt'} is truncated or damaged")


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_a_bad_init_from_is_named_in_one_line(name, bad_files, shards, tmp_path):
    path = bad_files[name]
    with pytest.raises(SystemExit) as error:
        build_cli(fit_args(shards, tmp_path / "ckpt", "--trainer.max_steps=1", f"--model.init_args.init_from={path}"))
    assert one_line_error(error).startswith(f"error: model.init_from {path} {BAD_FILES[name]}")


@pytest.mark.parametrize("benchmark", ["mmeb", "mrmr"])
@pytest.mark.parametrize("name", list(BAD_FILES))
def test_a_bad_evaluator_checkpoint_is_named_in_one_line(benchmark, name, bad_files, tmp_path):
    path = bad_files[name]
    data = write_mmeb(tmp_path / "mmeb") if benchmark == "mmeb" else write_mrmr(tmp_path / "mrmr")
    with pytest.raises(SystemExit) as error:
        eval_main(benchmark, ["--checkpoint", str(path), "--data-root", str(data), "--output-dir", str(tmp_path / "o")])
    assert one_line_error(error).startswith(f"error: --checkpoint {path} {BAD_FILES[name]}")


def test_a_remote_ckpt_path_is_refused_unless_allowed(shards, tmp_path):
    """Lightning would fetch a URL over the network and unpickle it (issue 12 item 13). Through the
    console script: the refusal comes before anything is built."""
    url = "http://127.0.0.1:9/model.ckpt"  # nothing listens there: an allowed fetch fails locally
    command = [
        str(Path(sys.executable).with_name("lightning")),
        *fit_args(shards, tmp_path / "ckpt"),
        "--trainer.max_steps=1",
        "--ckpt_path",
        url,
    ]
    env = {k: v for k, v in os.environ.items() if k != "LAME_PL_ALLOW_REMOTE_CHECKPOINTS"}
    refused = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0
    assert (
        refused.stderr.strip()
        .splitlines()[-1]
        .startswith(f"error: --ckpt_path {url} is a URL: remote checkpoints are refused")
    )
    allowed = subprocess.run(
        command,
        cwd=tmp_path,
        env={**env, "LAME_PL_ALLOW_REMOTE_CHECKPOINTS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (
        f"--ckpt_path {url}: a remote checkpoint, allowed by LAME_PL_ALLOW_REMOTE_CHECKPOINTS=1, read weights-only"
        in allowed.stdout + allowed.stderr
    )
    assert allowed.returncode != 0  # nothing to fetch there

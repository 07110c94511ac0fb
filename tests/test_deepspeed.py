"""DeepSpeed ZeRO-2 and ZeRO-3 on two gloo ranks (where the optional ``deepspeed`` extra is installed).

Lightning refuses DeepSpeed off CUDA; ``tests/gradcache_ddp_run.py`` runs it through a subclass
that skips those checks. Rank 0's queries hold images and rank 1's are text, so under ZeRO-3
the ranks run the same submodules only through ``lame_pl.sharding.uniform_submodules``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_gradcache import assert_same

pytest.importorskip("deepspeed")


def _run(tmp_path: Path, devices: int, strategy: str, chunk: int, *options: str, name: str = "") -> tuple[dict, dict]:
    script = Path(__file__).with_name("gradcache_ddp_run.py")
    out = tmp_path / (name or f"{devices}-{strategy}-{chunk}")
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(script.parents[1]), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run(
        [
            sys.executable,
            str(script),
            "--devices",
            str(devices),
            "--strategy",
            strategy,
            "--chunk",
            str(chunk),
            "--out",
            str(out),
            *options,
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(out / "grads.pt", weights_only=True), json.loads((out / "losses.json").read_text())


def test_zero2_and_zero3_updates_equal_the_single_process_gradient(tmp_path):
    """SGD at lr 1: DeepSpeed's update is the gradient it reduced, which must be the one-process
    gradient of the global batch, plain and with GradCache."""
    reference, logged = _run(tmp_path, 1, "ddp", 0)
    for strategy, chunk in (("deepspeed3", 0), ("deepspeed3", 2), ("deepspeed2", 2)):
        update, losses = _run(tmp_path, 2, strategy, chunk)
        assert losses.keys() == logged.keys()
        assert all(losses[k] == pytest.approx(v, rel=1e-5) for k, v in logged.items()), (strategy, chunk)
        try:
            # Updates are differences of float32 weights: they resolve ~1e-9.
            assert_same(reference, update, rtol=1e-3, atol=1e-8)
        except AssertionError as err:
            raise AssertionError(f"{strategy}, chunk {chunk}: {err}") from None


def test_zero3_with_gradcache_resumes_where_it_stopped(tmp_path):
    """Two steps, then a third from the checkpoint folder, log the loss of three steps in one run."""
    _, straight = _run(tmp_path, 2, "deepspeed3", 2, "--steps", "3", name="straight")
    _run(tmp_path, 2, "deepspeed3", 2, "--steps", "2", name="first")
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    assert last.is_dir()  # DeepSpeed writes a folder of partitions
    _, resumed = _run(tmp_path, 2, "deepspeed3", 2, "--steps", "3", "--resume", str(last), name="resumed")
    assert resumed["train/loss"] == pytest.approx(straight["train/loss"], rel=1e-6)

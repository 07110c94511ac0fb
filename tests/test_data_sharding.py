"""Sharding over simulated ranks and workers, per-epoch seeding, and resuming mid-epoch."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from lightning import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lame_pl import LaMEModule
from lame_pl.backbone import BackboneSpec
from lame_pl.datamodules import ImageTextDataModule

ROOT = Path(__file__).resolve().parents[1]
SPEC = BackboneSpec(preset="tiny", min_pixels=56 * 56, max_pixels=56 * 56)
PER_SHARD = 4
SIZES = {"train": 32, "val": 20}  # 8 train shards: 2 per (rank, worker) slot of 2 x 2


@pytest.fixture(scope="module")
def data_dir(module_tmp) -> Path:
    out = module_tmp("shards")
    cmd = [
        sys.executable,
        str(ROOT / "tools" / "make_shards.py"),
        "synthetic",
        "--out",
        str(out),
        "--overwrite",
        "--image-size",
        "56",
        "--samples-per-shard",
        str(PER_SHARD),
        "--seed",
        "5",
        "--test",
        "4",
    ]
    for split, n in SIZES.items():
        cmd += [f"--{split}", str(n)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out


def _dm(data_dir: Path, **kwargs) -> ImageTextDataModule:
    defaults = dict(
        train_shards=str(data_dir / "train"),
        val_shards=str(data_dir / "val"),
        batch_size=2,
        num_workers=2,
        shuffle_buffer=8,
        seed=1,
    )
    return ImageTextDataModule(SPEC, **{**defaults, **kwargs})


def _as_rank(monkeypatch: pytest.MonkeyPatch, rank: int, world_size: int = 2) -> None:
    # webdataset's pytorch_worker_info reads these when no process group is initialised.
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world_size))


def _keys(batches) -> list[str]:
    return [k for b in batches for k in b["keys"]]


def test_val_split_seen_exactly_once_over_two_ranks_of_two_workers(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []
    for rank in (0, 1):
        _as_rank(monkeypatch, rank)
        seen += _keys(_dm(data_dir).val_dataloader())
    assert len(seen) == SIZES["val"] and len(set(seen)) == SIZES["val"]


def test_val_split_over_more_ranks_than_shards_leaves_the_extra_ranks_empty(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    per_rank = []
    for rank in range(8):  # 5 val shards
        _as_rank(monkeypatch, rank, world_size=8)
        per_rank.append(_keys(_dm(data_dir).val_dataloader()))
    assert [len(keys) for keys in per_rank] == [PER_SHARD] * 5 + [0] * 3
    assert len({k for keys in per_rank for k in keys}) == SIZES["val"]


def test_resampled_train_gives_every_rank_the_same_batch_count(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    counts = []
    for rank in (0, 1):
        _as_rank(monkeypatch, rank)
        dm = _dm(data_dir, samples_per_epoch=16)
        loader = dm.train_dataloader()
        counts.append(len(list(loader)))
        assert counts[-1] == len(loader) == 16 // (2 * 2)
    assert counts[0] == counts[1]


def test_non_resampled_epoch_reads_every_sample_once_over_ranks(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    epochs: list[list[list[str]]] = [[], []]
    for rank in (0, 1):
        _as_rank(monkeypatch, rank)
        dm = _dm(data_dir, resampled=False)
        loader = dm.train_dataloader()
        assert len(loader) == 8  # 2 workers x (2 shards x 4 samples / batch of 2)
        for epoch in (0, 1):
            batches = list(loader)
            assert len(batches) == len(loader)
            epochs[epoch].append(_keys(batches))
    for ranks in epochs:
        assert Counter(ranks[0] + ranks[1]) == Counter({k: 1 for k in ranks[0] + ranks[1]})
        assert len(ranks[0]) + len(ranks[1]) == SIZES["train"]
    assert epochs[0] != epochs[1]  # a new shard deal and shuffle each epoch
    # The same seed and epoch give the same order, whatever came before.
    _as_rank(monkeypatch, 1)
    dm = _dm(data_dir, resampled=False)
    dm.set_epoch(1)
    assert _keys(dm.train_dataloader()) == epochs[1][1]


def test_too_few_shards_for_ranks_and_workers_raise_naming_them(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _as_rank(monkeypatch, 0)
    with pytest.raises(ValueError, match=r"data\.train_shards has 8 shards.* 2 x 5 = 10"):
        _dm(data_dir, resampled=False, num_workers=5)
    _dm(data_dir, resampled=True, num_workers=5)  # resampling draws from any number of shards


def test_resume_does_not_replay_the_epoch_from_its_start(data_dir: Path) -> None:
    for resampled in (True, False):
        first = _dm(data_dir, resampled=resampled, samples_per_epoch=32)
        loader = iter(first.train_dataloader())
        taken = [next(loader) for _ in range(3)]
        state = first.state_dict()
        assert state["epoch"] == 0 and state["batches"] == 3
        whole = _keys(taken) + _keys(loader)

        resumed = _dm(data_dir, resampled=resampled, samples_per_epoch=32)
        resumed.load_state_dict(state)
        rest = list(resumed.train_dataloader())
        assert _keys(rest[:1]) != _keys(taken[:1])
        # The resumed epoch ends where the whole one would have.
        assert len(rest) == len(whole) // 2 - 3 and resumed.state_dict()["batches"] == len(whole) // 2
        if not resampled:
            # The same order, carried on where it stopped, though the 2 workers had each given a
            # different number of batches (the loader asks worker 0 first on every epoch).
            assert _keys(rest) == whole[6:]
        fresh = _dm(data_dir, resampled=resampled, samples_per_epoch=32)
        assert _keys([next(iter(fresh.train_dataloader()))]) == _keys(taken[:1])  # a fresh one starts over


class _RecordKeys(Callback):
    def __init__(self) -> None:
        self.keys: dict[int, list[str]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.keys[trainer.global_step] = list(batch["keys"])


def _fit(data_dir: Path, root: Path, max_steps: int, ckpt_path: str | None = None) -> _RecordKeys:
    record = _RecordKeys()
    trainer = Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[record, ModelCheckpoint(dirpath=root, save_last=True, every_n_train_steps=3)],
    )
    model = LaMEModule(SPEC, num_reason_tokens=1, stage=2, lr=1e-4)
    trainer.fit(model, _dm(data_dir, resampled=False), ckpt_path=ckpt_path)
    return record


def test_trainer_resumed_mid_epoch_continues_the_epoch_where_it_stopped(data_dir: Path, tmp_path: Path) -> None:
    whole = _fit(data_dir, tmp_path / "whole", max_steps=6).keys  # an epoch is 8 batches
    _fit(data_dir, tmp_path / "cut", max_steps=3)
    resumed = _fit(data_dir, tmp_path / "cut", max_steps=6, ckpt_path=str(tmp_path / "cut" / "last.ckpt")).keys
    assert sorted(resumed) == [3, 4, 5]
    assert [resumed[step] for step in (3, 4, 5)] == [whole[step] for step in (3, 4, 5)]

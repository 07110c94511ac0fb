"""A weighted mixture of shard sets: weights respected, homogeneous sets give whole batches, bad config named."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from datamodules import InstructionPairDataModule
from datamodules.mixture import ShardSet, check_mixture
from lame_pl.backbone import BackboneSpec
from lame_pl.cli import build_cli

ROOT = Path(__file__).resolve().parents[1]
SPEC = BackboneSpec(preset="tiny", min_pixels=56 * 56, max_pixels=56 * 56)
SETS = ("cats", "dogs", "birds")


@pytest.fixture(scope="module")
def sets_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three small text-only instruction-pair sets (text only: the mixture, not decoding, is under test)."""
    root = tmp_path_factory.mktemp("mixture")
    for name in SETS:
        rows = [{"query_instruction": f"Find the {name}.", "query_text": f"{name} query {i}",
                 "target_text": f"{name} answer {i}"} for i in range(12)]
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        subprocess.run([sys.executable, str(ROOT / "tools" / "make_shards.py"), "manifest", "--manifest",
                        str(root / f"{name}.jsonl"), "--out", str(root / name), "--split-name", "train",
                        "--samples-per-shard", "4"], check=True, capture_output=True, text=True)
    return root


def _mixture(sets_dir: Path, weights: dict[str, float], homogeneous: tuple[str, ...] = ()) -> list[ShardSet]:
    return [ShardSet(str(sets_dir / name / "train"), weight, name in homogeneous, name)
            for name, weight in weights.items()]


def _datamodule(mixture: list[ShardSet], **kwargs) -> InstructionPairDataModule:
    defaults = dict(batch_size=8, num_workers=0, shuffle_buffer=8, samples_per_epoch=8 * 150, seed=3)
    return InstructionPairDataModule(SPEC, train_mixture=mixture, **{**defaults, **kwargs})


def _texts_match_sources(batch: dict) -> bool:
    return all(text.startswith(source) for text, source in zip(batch["texts"], batch["sources"], strict=True))


def test_mixture_respects_its_weights_within_tolerance(sets_dir: Path) -> None:
    weights = {"cats": 1.0, "dogs": 2.0, "birds": 5.0}
    batches = list(_datamodule(_mixture(sets_dir, weights)).train_dataloader())
    assert len(batches) == 150
    assert all(_texts_match_sources(b) for b in batches)  # each sample really came from its set
    counts = Counter(s for b in batches for s in b["sources"])
    total = sum(counts.values())
    for name, weight in weights.items():
        expected = weight / sum(weights.values())
        # 1200 draws: one standard deviation of a share is at most 0.015.
        assert abs(counts[name] / total - expected) < 0.05, (name, counts)
    assert sum(len(set(b["sources"])) > 1 for b in batches) > 140  # mixed sets share batches


def test_homogeneous_set_fills_whole_batches(sets_dir: Path) -> None:
    weights = {"cats": 1.0, "dogs": 1.0, "birds": 2.0}
    batches = list(_datamodule(_mixture(sets_dir, weights, homogeneous=("cats", "birds"))).train_dataloader())
    whole = Counter(b["sources"][0] for b in batches if len(set(b["sources"])) == 1)
    # A homogeneous set never shares a batch; the mixed set fills the batches drawn for it.
    for b in batches:
        assert len(set(b["sources"])) == 1
    share = {name: whole[name] / len(batches) for name in SETS}
    assert abs(share["cats"] - 0.25) < 0.1 and abs(share["birds"] - 0.5) < 0.1 and abs(share["dogs"] - 0.25) < 0.1


def test_mixture_draws_are_seeded_and_differ_by_worker(sets_dir: Path) -> None:
    mixture = _mixture(sets_dir, {"cats": 1.0, "dogs": 1.0})
    first = [b["sources"] for b in _datamodule(mixture, num_workers=2, samples_per_epoch=64).train_dataloader()]
    again = [b["sources"] for b in _datamodule(mixture, num_workers=2, samples_per_epoch=64).train_dataloader()]
    assert first == again and len(first) == 8
    assert first[0] != first[1]  # batches alternate between the two workers, which draw differently


def test_mixture_sample_count_defaults_to_the_manifests(sets_dir: Path) -> None:
    dm = _datamodule(_mixture(sets_dir, {"cats": 1.0, "dogs": 3.0}), samples_per_epoch=None)
    assert dm.samples_per_epoch == 24
    assert len(dm.train_dataloader()) == 3


@pytest.mark.parametrize(
    ("mixture", "kwargs", "message"),
    [
        ([], {}, r"data\.train_mixture is an empty list"),
        ([ShardSet("X", 0.0)], {}, r"data\.train_mixture\[0\]\.weight must be a positive number, got 0\.0"),
        ([ShardSet("X", 1.0, name="a"), ShardSet("X", 1.0, name="a")], {}, r"data\.train_mixture\[1\]\.name 'a'"),
        ([ShardSet("X")], {"resampled": False}, r"needs data\.resampled true"),
        ([ShardSet("X")], {"train_shards": "X"}, r"data\.train_shards or data\.train_mixture, not both"),
    ],
)
def test_bad_mixture_config_is_named(sets_dir: Path, mixture, kwargs, message) -> None:
    mixture = [ShardSet(str(sets_dir / "cats" / "train") if s.shards == "X" else s.shards, s.weight,
                        s.homogeneous, s.name) for s in mixture]
    if kwargs.get("train_shards") == "X":
        kwargs["train_shards"] = str(sets_dir / "cats" / "train")
    with pytest.raises(ValueError, match=message):
        _datamodule(mixture, **kwargs)


def test_missing_set_path_names_the_set(sets_dir: Path) -> None:
    mixture = _mixture(sets_dir, {"cats": 1.0}) + [ShardSet(str(sets_dir / "nowhere"), 1.0, name="x")]
    with pytest.raises(FileNotFoundError, match=r"data\.train_mixture\[1\]\.shards directory .*nowhere"):
        _datamodule(mixture)


def test_check_mixture_fills_names_and_accepts_dicts() -> None:
    checked = check_mixture([{"shards": "a", "weight": 2}, ShardSet("b")])
    assert [(s.name, s.weight) for s in checked] == [("0", 2.0), ("1", 1.0)]


def test_mixture_from_yaml_through_the_cli(sets_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["lightning"])
    config = {"data": {"class_path": "datamodules.InstructionPairDataModule", "init_args": {
        "train_mixture": [{"name": "cats", "shards": str(sets_dir / "cats" / "train"), "weight": 1.0,
                           "homogeneous": True},
                          {"name": "dogs", "shards": str(sets_dir / "dogs" / "train"), "weight": 3.0}],
        "batch_size": 4, "num_workers": 0, "samples_per_epoch": 16}}}
    path = tmp_path / "mixture.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = build_cli(["fit", f"--config={ROOT / 'tests' / 'conf' / 'tiny.yaml'}", f"--config={path}",
                     "--trainer.max_steps=2", "--trainer.logger=false", "--trainer.enable_checkpointing=false",
                     f"--trainer.default_root_dir={tmp_path}",
                     "--trainer.callbacks+=callbacks.DataHealth"])
    assert cli.trainer.global_step == 2
    shares = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("data/mixture/")}
    assert set(shares) <= {"data/mixture/cats", "data/mixture/dogs"} and shares
    assert abs(sum(shares.values()) - 1.0) < 1e-6
    assert [s.name for s, _ in cli.datamodule.mixture] == ["cats", "dogs"]
    assert cli.datamodule.mixture[0][0].homogeneous is True


def test_sets_share_the_shuffle_buffer(sets_dir: Path) -> None:
    dm = _datamodule(_mixture(sets_dir, {"cats": 1.0, "dogs": 1.0, "birds": 1.0}), shuffle_buffer=30)
    mixture = dm.train_dataloader().dataset.pipeline[0]
    buffers = [stage.bufsize for stream in mixture.streams for stage in stream.pipeline if hasattr(stage, "bufsize")]
    assert buffers == [10, 10, 10]  # raw samples held per worker stay at data.shuffle_buffer

"""A weighted mixture of shard sets: weights respected, homogeneous sets give whole batches, bad config named."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from lame_pl.backbone import BackboneSpec
from lame_pl.cli import build_cli
from lame_pl.datamodules import InstructionPairDataModule
from lame_pl.datamodules.mixture import ShardSet, check_mixture

ROOT = Path(__file__).resolve().parents[1]
SPEC = BackboneSpec(preset="tiny", min_pixels=56 * 56, max_pixels=56 * 56)
SETS = ("cats", "dogs", "birds")


@pytest.fixture(scope="module")
def sets_dir(module_tmp) -> Path:
    """Three small text-only instruction-pair sets (text only: the mixture, not decoding, is under test)."""
    root = module_tmp("mixture")
    for name in SETS:
        rows = [
            {
                "query_instruction": f"Find the {name}.",
                "query_text": f"{name} query {i}",
                "target_text": f"{name} answer {i}",
            }
            for i in range(12)
        ]
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "tools" / "make_shards.py"),
                "manifest",
                "--manifest",
                str(root / f"{name}.jsonl"),
                "--out",
                str(root / name),
                "--split-name",
                "train",
                "--samples-per-shard",
                "4",
            ],
            check=True,
            capture_output=True,
            text=True,
        )
    return root


def _mixture(sets_dir: Path, weights: dict[str, float], homogeneous: tuple[str, ...] = ()) -> list[ShardSet]:
    return [
        ShardSet(str(sets_dir / name / "train"), weight, name in homogeneous, name) for name, weight in weights.items()
    ]


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
    mixture = [
        ShardSet(str(sets_dir / "cats" / "train") if s.shards == "X" else s.shards, s.weight, s.homogeneous, s.name)
        for s in mixture
    ]
    if kwargs.get("train_shards") == "X":
        kwargs["train_shards"] = str(sets_dir / "cats" / "train")
    with pytest.raises(ValueError, match=message):
        _datamodule(mixture, **kwargs)


def test_missing_set_path_names_the_set(sets_dir: Path) -> None:
    mixture = _mixture(sets_dir, {"cats": 1.0}) + [ShardSet(str(sets_dir / "nowhere"), 1.0, name="x")]
    with pytest.raises(FileNotFoundError, match=r"data\.train_mixture\[1\] \(x\): shards directory .*nowhere"):
        _datamodule(mixture)


def test_mixture_root_resolves_relative_sets_and_keeps_absolute_ones(
    sets_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)  # relative paths must not be read from the working directory
    mixture = [
        ShardSet("cats/train", 1.0, name="cats"),
        ShardSet(["dogs/train"], 1.0, name="dogs"),
        ShardSet(str(sets_dir / "birds" / "train"), 1.0, name="birds"),
    ]
    dm = _datamodule(mixture, mixture_root=str(sets_dir), samples_per_epoch=None)
    resolved = {s.name: (s.shards, urls) for s, urls in dm.mixture}
    assert resolved["cats"][0] == str(sets_dir / "cats" / "train")
    assert resolved["dogs"][0] == [str(sets_dir / "dogs" / "train")]
    assert resolved["birds"][0] == str(sets_dir / "birds" / "train")
    for name, (_, urls) in resolved.items():
        assert urls == sorted(str(p) for p in (sets_dir / name / "train").glob("shard-*.tar")) and len(urls) == 3
    assert dm.samples_per_epoch == 36  # every set's manifest found through the root
    batch = next(iter(dm.train_dataloader()))
    assert _texts_match_sources(batch)


def test_mixture_root_errors_name_the_entry_and_the_path(sets_dir: Path) -> None:
    mixture = [
        ShardSet("cats/train", name="cats"),
        ShardSet("dogs/train", name="dogs"),
        ShardSet("MSCOCO_t2i", name="MSCOCO_t2i"),
    ]
    missing = re.escape(
        f"data.train_mixture[2] (MSCOCO_t2i): shards directory '{sets_dir / 'MSCOCO_t2i'}' does "
        f"not exist (relative paths start at data.mixture_root '{sets_dir}')"
    )
    with pytest.raises(FileNotFoundError, match=missing):
        _datamodule(mixture, mixture_root=str(sets_dir))
    with pytest.raises(ValueError, match=r"data\.train_mixture\[0\] \(empty\): shards directory .* holds no \.tar"):
        _datamodule([ShardSet("cats", name="empty")], mixture_root=str(sets_dir))  # cats/ holds train/, no tar
    with pytest.raises(FileNotFoundError, match=r"data\.mixture_root '.*nowhere' is not a directory"):
        _datamodule(mixture, mixture_root=str(sets_dir / "nowhere"))
    with pytest.raises(ValueError, match=r"data\.mixture_root is set but data\.train_mixture is not"):
        InstructionPairDataModule(SPEC, train_shards=str(sets_dir / "cats" / "train"), mixture_root=str(sets_dir))


def test_check_mixture_fills_names_and_accepts_dicts() -> None:
    checked = check_mixture([{"shards": "a", "weight": 2}, ShardSet("b")])
    assert [(s.name, s.weight) for s in checked] == [("0", 2.0), ("1", 1.0)]


def _mixture_yaml(sets_dir: Path, tmp_path: Path, cats: str) -> Path:
    """A data config whose cats set is ``cats`` (relative: to data.mixture_root) and dogs set absolute."""
    config = {
        "data": {
            "class_path": "datamodules.InstructionPairDataModule",
            "init_args": {
                "train_mixture": [
                    {"name": "cats", "shards": cats, "weight": 1.0, "homogeneous": True},
                    {"name": "dogs", "shards": str(sets_dir / "dogs" / "train"), "weight": 3.0},
                ],
                "batch_size": 4,
                "num_workers": 0,
                "samples_per_epoch": 16,
            },
        }
    }
    path = tmp_path / "mixture.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_mixture_from_yaml_through_the_cli(sets_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["lightning"])
    monkeypatch.chdir(tmp_path)
    path = _mixture_yaml(sets_dir, tmp_path, "cats/train")
    cli = build_cli(
        [
            "fit",
            f"--config={ROOT / 'tests' / 'conf' / 'tiny.yaml'}",
            f"--config={path}",
            f"--data.init_args.mixture_root={sets_dir}",
            "--trainer.max_steps=2",
            "--trainer.logger=false",
            "--trainer.enable_checkpointing=false",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.callbacks+=callbacks.DataHealth",
        ]
    )
    assert cli.trainer.global_step == 2
    assert cli.datamodule.mixture[0][0].shards == str(sets_dir / "cats" / "train")
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


def test_mixture_root_error_through_the_cli(sets_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["lightning"])
    path = _mixture_yaml(sets_dir, tmp_path, "kittens/train")
    with pytest.raises(SystemExit) as exc:
        build_cli(
            [
                "fit",
                f"--config={ROOT / 'tests' / 'conf' / 'tiny.yaml'}",
                f"--config={path}",
                f"--data.init_args.mixture_root={sets_dir}",
                "--trainer.max_steps=1",
                "--trainer.logger=false",
            ]
        )
    message = str(exc.value)
    assert "data.train_mixture[0] (cats): shards directory" in message
    assert str(sets_dir / "kittens" / "train") in message and "\n" not in message

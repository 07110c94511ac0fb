"""Shared fixtures: a tiny random backbone and real processor batches, all built offline."""

from __future__ import annotations

import importlib.util
import os
import random
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image

from lame_pl.backbone import BackboneSpec, DecoderSpec, build_processor
from lame_pl.datamodules.collate import PairCollator

IMAGE_SIDE = 56
CAPTIONS = [
    "a red circle at the top left",
    "two blue squares in the center",
    "a green triangle at the bottom right and a yellow circle at the top",
    "three purple squares on the left",
]


@pytest.fixture(scope="session")
def tiny_spec() -> BackboneSpec:
    return BackboneSpec(preset="tiny", min_pixels=IMAGE_SIDE * IMAGE_SIDE, max_pixels=IMAGE_SIDE * IMAGE_SIDE)


@pytest.fixture(scope="session")
def tiny_decoder() -> DecoderSpec:
    return DecoderSpec(preset="tiny")


@pytest.fixture(scope="session")
def processor(tiny_spec):
    return build_processor(tiny_spec)


def load_tool(name: str):
    """``tools/<name>.py`` imported as the module ``tools_<name>`` (the tools are scripts, not a package), once.

    It is registered in ``sys.modules`` before it runs, as an import does: dataclasses look their module up there.
    """
    module_name = f"tools_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def random_image(rng: random.Random, side: int = IMAGE_SIDE) -> Image.Image:
    return Image.frombytes("RGB", (side, side), bytes(rng.getrandbits(8) for _ in range(side * side * 3)))


@pytest.fixture(scope="session")
def make_batch(processor):
    """Builds a real collated batch of ``n`` random images with captions of different lengths."""

    def build(n: int = 4, seed: int = 0) -> dict:
        rng = random.Random(seed)
        collate = PairCollator(processor, query_instruction="Find the caption of this image.")
        samples = [
            {"key": f"{i:04d}", "image": random_image(rng), "text": CAPTIONS[i % len(CAPTIONS)]} for i in range(n)
        ]
        return collate(samples)

    return build


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _same_working_directory() -> Iterator[None]:
    """Fails a test that leaves the process in another folder (use ``monkeypatch.chdir``).

    Its tmp_path is removed when it passes, so a bare ``os.chdir`` there breaks every later test
    that reads the working directory.
    """
    here = os.getcwd()
    yield
    try:
        moved = os.getcwd() != here
    except FileNotFoundError:
        moved = True
    if moved:
        os.chdir(here)
        pytest.fail(f"the test left the working directory changed (from {here}); use monkeypatch.chdir")


def make_synthetic_shards(out: Path, train: int, val: int, test: int, samples_per_shard: int = 16) -> Path:
    """Synthetic demo scenes (56 px) written by ``tools/make_shards.py synthetic``'s command line, in this process
    (torch and the rest are imported already; tests/test_make_shards.py runs the script as a user does)."""
    code = load_tool("make_shards").main(
        [
            "synthetic",
            "--out",
            str(out),
            "--overwrite",
            "--train",
            str(train),
            "--val",
            str(val),
            "--test",
            str(test),
            "--image-size",
            "56",
            "--samples-per-shard",
            str(samples_per_shard),
        ]
    )
    assert code in (0, None), f"make_shards synthetic exited {code}"
    return out


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory) -> Callable[..., Path]:
    """``synthetic_shards(train, val, test, samples_per_shard=16)``: ``make_synthetic_shards``'s folder, written
    once a session for each set of sizes; tests only read it.

    The scenes are seeded, so every caller of one set of sizes gets the very shards it would have written itself.
    """
    made: dict[tuple[int, int, int, int], Path] = {}

    def get(train: int, val: int, test: int, samples_per_shard: int = 16) -> Path:
        sizes = (train, val, test, samples_per_shard)
        if sizes not in made:
            made[sizes] = make_synthetic_shards(tmp_path_factory.mktemp("shards-{}-{}-{}-{}".format(*sizes)), *sizes)
        return made[sizes]

    return get


@pytest.fixture(scope="session")
def small_shards(synthetic_shards) -> Path:
    """32 training, 4 validation and 4 test scenes, shared by the tests that only read them."""
    return synthetic_shards(32, 4, 4)


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory) -> Iterator[Callable[[str], Path]]:
    """Makes folders for a module's fixtures and removes them when the module's tests are done.

    A tiny run's checkpoint is about 180 MB (the Qwen2 vocabulary's embeddings and their Adam state), so
    keeping every module's runs until the session ends filled CI's disk; with pytest's
    ``tmp_path_retention_policy = failed`` (setup.cfg) a passing test's own folder goes at once as well.
    """
    made: list[Path] = []

    def make(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield make
    for path in made:
        shutil.rmtree(path, ignore_errors=True)

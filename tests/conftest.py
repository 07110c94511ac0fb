"""Shared fixtures: a tiny random backbone and real processor batches, all built offline."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from datamodules.collate import PairCollator
from lame_pl.backbone import BackboneSpec, DecoderSpec, build_processor

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
    """``tools/<name>.py`` imported as a module (the tools are scripts, not a package)."""
    path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"tools_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_image(rng: random.Random, side: int = IMAGE_SIDE) -> Image.Image:
    return Image.frombytes("RGB", (side, side), bytes(rng.getrandbits(8) for _ in range(side * side * 3)))


@pytest.fixture(scope="session")
def make_batch(processor):
    """Builds a real collated batch of ``n`` random images with captions of different lengths."""

    def build(n: int = 4, seed: int = 0) -> dict:
        rng = random.Random(seed)
        collate = PairCollator(processor, query_instruction="Find the caption of this image.")
        samples = [{"key": f"{i:04d}", "image": random_image(rng), "text": CAPTIONS[i % len(CAPTIONS)]} for i in range(n)]
        return collate(samples)

    return build


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

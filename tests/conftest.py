"""Shared fixtures: small seeded nnU-Net datasets written into temporary folders."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from ncatool.data.io import Image, write_image

#: `--set` overrides that make a grow / digits run train in about a second.
TINY_GROW = [
    "img_size=8",
    "padding=2",
    "pool_size=16",
    "train_steps=3,5",
    "hidden=16",
    "iters_per_epoch=2",
    "val_steps=4",
]
TINY_DIGITS = [
    "img_size=8",
    "steps=6",
    "hidden=16",
    "channels=6",
    "embed_dim=4",
    "iters_per_epoch=2",
    "batch_size=4",
]


def write_toy_dataset(root: Path, dim: int, cases: int = 4, size: int = 24, seed: int = 0) -> Path:
    """A tiny nnU-Net raw dataset: one noisy bright ball per case, label 1 inside it.

    Returns:
        The dataset folder ``root/Dataset001_Toy``.
    """
    ds = root / "Dataset001_Toy"
    rng = np.random.default_rng(seed)
    for i in range(cases):
        shape = (size,) * dim
        grids = np.ogrid[tuple(slice(0, s) for s in shape)]
        centre = rng.uniform(size * 0.35, size * 0.65, dim)
        radius = rng.uniform(size * 0.15, size * 0.3)
        mask = (sum((g - c) ** 2 for g, c in zip(grids, centre, strict=True)) < radius**2).astype(np.uint8)
        image = (0.8 * mask + 0.1 + rng.normal(0, 0.1, shape)).astype(np.float32)
        write_image(Image.from_array(image), ds / "imagesTr" / f"toy_{i:03d}_0000.nii.gz")
        write_image(Image.from_array(mask), ds / "labelsTr" / f"toy_{i:03d}.nii.gz")
    meta = {
        "channel_names": {"0": "MR"},
        "labels": {"background": 0, "ball": 1},
        "numTraining": cases,
        "file_ending": ".nii.gz",
    }
    (ds / "dataset.json").write_text(json.dumps(meta))
    return ds


@pytest.fixture
def toy_dataset(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``toy_dataset(dim, cases=4, size=24)`` → dataset folder under ``tmp_path``."""

    def make(dim: int, cases: int = 4, size: int = 24) -> Path:
        return write_toy_dataset(tmp_path / f"raw{dim}d", dim, cases, size)

    return make


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a module of tiny tensors: OpenMP threads spin and wait on a busy machine
    (5x slower here) and gain nothing on tensors this small. Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)

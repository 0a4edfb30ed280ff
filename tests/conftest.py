"""Shared fixtures: tiny generated image datasets and recipes (no network, seconds to build)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import edgetl  # noqa: F401  (sets TF_USE_LEGACY_KERAS before any test imports TensorFlow)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
COLORS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220)}


def draw_image(color, rng, size: int = 40) -> np.ndarray:
    """A noisy image of one dominant colour with a random darker square: easy but not trivial."""
    img = rng.normal(0, 18, (size, size, 3)) + np.array(color)
    x, y = rng.integers(0, size // 2, 2)
    img[y:y + size // 3, x:x + size // 3] *= 0.6
    return np.clip(img, 0, 255).astype(np.uint8)


def make_image_folder(root: Path, per_class: int = 12, size: int = 40, seed: int = 0,
                      classes=COLORS, ext: str = "png") -> Path:
    """root/<class>/<i>.<ext> with `per_class` generated images per class."""
    rng = np.random.default_rng(seed)
    for name, color in classes.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(draw_image(color, rng, size)).save(folder / f"{name}_{i:03d}.{ext}")
    return root


def tiny_recipe_dict(source, **sections) -> dict:
    """A recipe for a seconds-long run: MobileNetV2 alpha 0.35 at 32 px, random weights."""
    raw = {
        "name": "tiny",
        "seed": 7,
        "data": {"source": str(source), "image_size": 32, "batch_size": 8, "val_split": 0.15, "test_split": 0.25},
        "model": {"backbone": "mobilenet_v2", "alpha": 0.35, "weights": None, "dropout": 0.0},
        "train": {"stage1": {"epochs": 4, "learning_rate": 0.01}, "stage2": {"epochs": 1, "learning_rate": 1e-4},
                  "early_stopping_patience": 0},
    }
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return raw


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """Three colour classes, 16 images each, single folder (split by ratios)."""
    return make_image_folder(tmp_path_factory.mktemp("tiny_data"), per_class=16)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_data):
    """One trained tiny run shared by the tests that only read it."""
    from edgetl.recipe import recipe_from_dict
    from edgetl.training import train

    recipe = recipe_from_dict(tiny_recipe_dict(tiny_data))
    return train(recipe, run_dir=tmp_path_factory.mktemp("tiny_run") / "run", echo=lambda *_: None)


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """A tiny nested-model run exported once to every variant (tests/export_support.py), shared by the tests that
    only read it; tests that export again copy the run first."""
    from export_support import export_tiny_run

    return export_tiny_run(tmp_path_factory.mktemp("tiny_export"))

"""The inputs of an export: the run's recipe, labels and trained model, and the training data the variants need.

The model is loaded at once (every variant converts it, and a damaged model.keras should stop the export with
one message, not fail every variant); the dataset only when a variant needs calibration images or a fine-tune.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

from edgetl.backbones import image_size_for
from edgetl.rundir import RunDir

if TYPE_CHECKING:
    from edgetl.data import DatasetSplits
    from edgetl.recipe import Recipe


@dataclass(frozen=True)
class FinetuneData:
    """Batches for a QAT or pruning fine-tune: shuffled and augmented as in training; val None without a val split."""

    train: Any  # tf.data.Dataset of (float32 images 0..255, int32 labels)
    val: Any
    steps_per_epoch: int


class ExportInputs:
    """One trained run as an export reads it; the dataset parts load on first use and are kept."""

    def __init__(self, run: RunDir, recipe: Recipe):
        run.require(run.recipe_path, run.labels_path, run.model_path)
        self.run, self.recipe = run, recipe
        self.labels: list[str] = run.labels()
        self.head_labels: dict[str, list[str]] = run.head_labels()  # {} unless multi-task
        self.size: int = image_size_for(recipe)
        self.model = run.load_model()

    @cached_property
    def splits(self) -> DatasetSplits:
        from edgetl.data import load_splits

        return load_splits(self.recipe)

    @cached_property
    def _calibration_picks(self) -> np.ndarray:
        """Indices into the training split of the calibration images: a seeded choice, in split order."""
        train = self.splits.train
        count = min(self.recipe.export.representative_samples, len(train))
        return np.sort(np.random.default_rng(self.recipe.seed).choice(len(train), count, replace=False))

    @cached_property
    def calibration(self) -> np.ndarray:
        """float32 (N,S,S,3) training images: a seeded choice of `export.representative_samples`."""
        from edgetl.data import load_arrays

        train = self.splits.train
        images, _ = load_arrays([train[i] for i in self._calibration_picks], self.size, self.recipe.data.resize)
        images = images.astype(np.float32)
        # One black and one white pixel pin the calibrated input range to the full byte range, so an integer
        # input covers every camera byte and bright pixels never clip: scale 1 on raw pixels, or 1/127.5 where the
        # input quantization carries MobileNet's x / 127.5 - 1 (edgetl.export.tflite).
        images[0, 0, 0], images[0, 0, 1] = 0.0, 255.0
        return images

    def training_images(self, count: int) -> np.ndarray:
        """float32 raw training images: the calibration images, topped up to `count` with the other training
        images in split order (the repair scores on these; loaded now, not kept)."""
        from edgetl.data import load_arrays

        calibration = self.calibration[:count]
        chosen = set(self._calibration_picks.tolist())
        others = [s for i, s in enumerate(self.splits.train) if i not in chosen][:count - len(calibration)]
        if not others:
            return calibration
        extra = load_arrays(others, self.size, self.recipe.data.resize)[0].astype(np.float32)
        return np.concatenate([calibration, extra])

    @cached_property
    def finetune_data(self) -> FinetuneData:
        """The training split as in training (export.batch_size, else data.batch_size), and the val split."""
        from edgetl.data import make_dataset

        splits, d = self.splits, self.recipe.data
        batch_size = self.recipe.export.batch_size or d.batch_size
        common = dict(image_size=self.size, resize=d.resize, batch_size=batch_size, cache=d.cache)
        train = make_dataset(splits.train, shuffle=True, seed=self.recipe.seed, augment=self.recipe.augment, **common)
        val = make_dataset(splits.val, **common) if splits.val else None
        return FinetuneData(train, val, -(-len(splits.train) // batch_size))

    def check_image(self) -> np.ndarray:
        """One (1,S,S,3) float32 image of seeded random pixels: runs every artifact once, needs no dataset."""
        pixels = np.random.default_rng(self.recipe.seed).integers(0, 256, (1, self.size, self.size, 3))
        return pixels.astype(np.float32)

"""Training: a recipe's model trained into a run directory (model.keras, labels, metrics, history, manifest).

`train` is the one entry point: domain-adversarial training (`dann`) when the recipe names `adapt.target_data`,
else two-stage supervised transfer training (`supervised`). Both build on `common` (run setup, the classifier,
cached backbone features, the run files); `distribute` maps the recipe's distribution settings onto tf.distribute.
"""
from __future__ import annotations

from pathlib import Path

from edgetl.recipe import Recipe
from edgetl.training.common import TrainResult
from edgetl.training.supervised import train_supervised

__all__ = ["TrainResult", "train"]


def train(recipe: Recipe, data_dir=None, run_dir: str | Path | None = None, out_root: str | Path = "models",
          echo=print) -> TrainResult:
    """Train the recipe's model and write its run directory; returns its path and test metrics.

    The caller's recipe is left unchanged (recipe.yaml records the resolved copy).
    """
    if recipe.adapt.target_data:
        from edgetl.training.dann import train_dann  # imports TensorFlow: only when the recipe asks for DANN

        return train_dann(recipe, data_dir=data_dir, run_dir=run_dir, out_root=out_root, echo=echo)
    return train_supervised(recipe, data_dir=data_dir, run_dir=run_dir, out_root=out_root, echo=echo)

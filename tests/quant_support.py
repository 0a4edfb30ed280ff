"""A tiny trained run with one deliberately damaged layer, for the per-layer report and repair tests.

The damage leaves the float model's function unchanged and wrecks int8: one channel of the backbone's
output (`out_relu`) is made always zero (its BatchNorm scale 0, shift -10), and the classifier's weights
reading that channel are set to 1e4. Float: 0 x 1e4 = 0. Int8: each class's weight scale is set by the
1e4 outlier, so every real weight of the classifier rounds to zero and it predicts one class.
"""
from __future__ import annotations

import functools
from pathlib import Path

from export_support import SIZE, write_fitted_run, write_images

from edgetl.recipe import recipe_from_dict

DAMAGED = "predictions"  # the classifier: nothing downstream can hide its damage from top-1


def damage(model, outlier: float = 1e4) -> None:
    """Kill channel 0 of out_relu and give `predictions` an `outlier` weight on it (in place, on a model this module
    built). 1e4 crushes the real weights even in int16 (a step of 0.3); 300 only in int8 (int16 step 0.009)."""
    backbone = model.get_layer("tiny_backbone")
    gamma, beta, mean, var = backbone.get_layer("Conv_1_bn").get_weights()
    gamma[0], beta[0] = 0.0, -10.0
    backbone.get_layer("Conv_1_bn").set_weights([gamma, beta, mean, var])
    kernel, bias = model.get_layer(DAMAGED).get_weights()
    kernel[0, :] = outlier
    model.get_layer(DAMAGED).set_weights([kernel, bias])


def make_damaged_run(root: Path, outlier: float = 1e4, **int8) -> Path:
    """A finished run (recipe.yaml, labels.txt, model.keras) of the model damaged with `outlier`, with a val split."""
    recipe = recipe_from_dict({
        "name": "damaged", "seed": 1,
        "data": {"source": str(write_images(root / "data", per_class=24)), "image_size": SIZE, "batch_size": 16,
                 "val_split": 0.2},
        "model": {"backbone": "mobilenet_v2", "alpha": 0.35, "weights": None},
        "export": {"tflite": ["int8_repaired"], "onnx": ["int8_repaired"], "io": "uint8",
                   "representative_samples": 16, "int8": {"max_drop_pp": 5.0, "step": 1, **int8}}})
    return write_fitted_run(root / "run", recipe, change=functools.partial(damage, outlier=outlier))

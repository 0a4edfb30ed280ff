"""A tiny trained run for the export tests, exported once to every variant (conftest's `tiny_export` fixture).

The model is a nested MobileNetV2-style network (Rescaling -> backbone Model with Conv-BN-ReLU6, ZeroPadding,
depthwise, projection and a residual Add -> pooling -> Dropout -> Dense), trained on generated coloured
squares: every path of the export stage (flattening, QAT, pruning, both formats) runs in seconds.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from edgetl.export import ExportResult, export_run
from edgetl.io import atomic_write_text
from edgetl.recipe import recipe_from_dict
from edgetl.rundir import RunDir

SIZE = 32
CLASSES = ("red", "green", "blue")
ALL_TFLITE = ["fp32", "fp16", "dynamic", "int8", "qat_int8", "pruned_int8"]
ALL_ONNX = ["fp32", "int8", "qat_int8"]


@dataclass(frozen=True)
class TinyExport:
    """The run directory, what `export_run` returned for it, and the lines it printed."""

    run_dir: Path
    result: ExportResult
    lines: list[str]


def write_images(root: Path, per_class: int = 20, seed: int = 0) -> Path:
    """Class folders of noisy 40 px images with a bright square in the class colour."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 90, (40, 40, 3), dtype=np.uint8)
            lo = int(rng.integers(2, 20))
            pixels[lo:lo + 18, lo:lo + 18, c] = rng.integers(200, 256)
            Image.fromarray(pixels).save(root / name / f"{name}_{i}.png")
    return root


def tiny_nested_model(num_classes: int):
    """Input -> Rescaling -> nested MobileNetV2-style backbone (training=False) -> pool -> Dropout -> Dense."""
    import tf_keras as keras

    L = keras.layers
    inp = keras.Input((SIZE, SIZE, 3))
    x = L.Conv2D(8, 3, strides=2, padding="same", use_bias=False, name="Conv1")(inp)
    x = L.ReLU(6.0, name="Conv1_relu")(L.BatchNormalization(name="bn_Conv1")(x))
    shortcut = x
    x = L.ZeroPadding2D(1, name="pad")(x)
    x = L.DepthwiseConv2D(3, use_bias=False, name="dw")(x)
    x = L.ReLU(6.0, name="dw_relu")(L.BatchNormalization(name="dw_BN")(x))
    x = L.BatchNormalization(name="project_BN")(L.Conv2D(8, 1, use_bias=False, name="project")(x))
    x = L.Add(name="add")([shortcut, x])
    x = L.ReLU(6.0, name="out_relu")(L.BatchNormalization(name="Conv_1_bn")(L.Conv2D(16, 1, use_bias=False,
                                                                                     name="Conv_1")(x)))
    backbone = keras.Model(inp, x, name="tiny_backbone")
    image = keras.Input((SIZE, SIZE, 3), name="image")
    y = L.Rescaling(1 / 127.5, offset=-1.0, name="preprocess")(image)
    y = backbone(y, training=False)
    y = L.Dropout(0.1, name="dropout")(L.GlobalAveragePooling2D(name="pool")(y))
    return keras.Model(image, L.Dense(num_classes, activation="softmax", name="predictions")(y), name="tiny")


def make_run(root: Path) -> Path:
    """A finished tiny run under `root`: recipe.yaml (every variant), labels.txt and model.keras, as `edgetl train`
    writes them."""
    recipe = recipe_from_dict({
        "name": "tiny", "seed": 1,
        "data": {"source": str(write_images(root / "data")), "image_size": SIZE, "batch_size": 16},
        "model": {"backbone": "mobilenet_v2", "alpha": 0.35, "weights": None},
        "export": {"tflite": ALL_TFLITE, "onnx": ALL_ONNX, "io": "uint8", "representative_samples": 24,
                   "qat": {"epochs": 1, "learning_rate": 1e-4},
                   "pruning": {"target_sparsity": 0.5, "epochs": 4, "learning_rate": 1e-2}}})
    return write_fitted_run(root / "run", recipe)


def write_fitted_run(folder: Path, recipe, change=None) -> Path:
    """Fit the tiny nested model on `recipe`'s training split (seeded), apply `change(model)`, and write the run
    directory `edgetl train` would: recipe.yaml, labels.txt and model.keras."""
    import tf_keras as keras

    from edgetl.data import load_arrays, load_splits

    splits = load_splits(recipe)
    images, labels = load_arrays(splits.train, SIZE)
    keras.utils.set_random_seed(0)
    model = tiny_nested_model(len(CLASSES))
    model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    model.fit(images.astype(np.float32), labels, epochs=12, batch_size=16, verbose=0)
    if change is not None:
        change(model)
    run = RunDir(folder)
    run.path.mkdir()
    atomic_write_text(run.recipe_path, recipe.to_yaml())
    atomic_write_text(run.labels_path, "\n".join(splits.class_names) + "\n")
    model.save(run.model_path)
    return run.path


def tflite_bytes(model, calibration: np.ndarray | None = None) -> bytes:
    """fp32 TFLite of `model`, or full integer with uint8 input/output calibrated on `calibration` (raw pixels).

    Converted from a concrete function without the model as trackable object: no SavedModel export, many times
    faster than from_keras_model.
    """
    import tensorflow as tf

    call = tf.function(lambda x: model(x, training=False))
    spec = tf.TensorSpec((None, *model.input_shape[1:]), tf.float32)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([call.get_concrete_function(spec)])
    if calibration is not None:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([image[None].astype(np.float32)] for image in calibration)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = converter.inference_output_type = tf.uint8
    return converter.convert()


def export_tiny_run(root: Path) -> TinyExport:
    """`make_run(root)`, exported to every variant of both formats (the recipe's lists), in this process (the
    isolated export is tested in test_isolate.py; a process per group would add seconds of start-up to each)."""
    run_dir = make_run(root)
    lines: list[str] = []
    return TinyExport(run_dir, export_run(run_dir, echo=lines.append, isolate=False), lines)

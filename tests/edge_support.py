"""Shared helpers for the edge runner tests: tiny converted models, image folders, minimal virtualenvs."""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

import edgetl

REPO_ROOT = Path(edgetl.__file__).resolve().parent.parent
HOST_SITE = Path(sysconfig.get_paths()["purelib"])
CLASSES = ("blue", "green", "red")
# Each package is its import folder plus the bundled shared libraries its extensions load.
NUMPY_PILLOW = ("numpy", "numpy.libs", "PIL", "pillow.libs")
LITERT = ("ai_edge_litert",)


def env_with_repo() -> dict:
    """This environment with the repository first on PYTHONPATH (edgetl need not be pip-installed)."""
    paths = [str(REPO_ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def tiny_model(heads=(("probs", 3),)):
    """Input(32,32,3) raw RGB -> Rescaling -> Conv2D(4) -> GAP -> one softmax Dense per head."""
    import tf_keras as keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3), name="image")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = [keras.layers.Dense(n, activation="softmax", name=name)(x) for name, n in heads]
    return keras.Model(inputs, outputs if len(outputs) > 1 else outputs[0])


def to_tflite(model, path: Path, io_dtype=None) -> Path:
    """fp32 TFLite, or full-integer with `io_dtype` ("uint8"/"int8") inputs and outputs."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if io_dtype:
        rng = np.random.default_rng(0)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: (
            [rng.integers(0, 256, (1, 32, 32, 3)).astype(np.float32)] for _ in range(16))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = converter.inference_output_type = getattr(tf, io_dtype)
    with warnings.catch_warnings():  # "Statistics for quantized inputs were expected": raw 0..255 input needs none
        warnings.simplefilter("ignore", UserWarning)
        path.write_bytes(converter.convert())
    return path


def to_onnx(model, path: Path) -> Path:
    """ONNX via tf2onnx.convert.from_keras (works for tf_keras models with TF_USE_LEGACY_KERAS=1)."""
    import tensorflow as tf
    import tf2onnx

    spec = [tf.TensorSpec((None, 32, 32, 3), tf.float32, name="image")]
    tf2onnx.convert.from_keras(model, input_signature=spec, opset=13, output_path=str(path))
    return path


def write_images(root: Path, per_class: int = 3, size: int = 40, seed: int = 0) -> Path:
    """Class folders of coloured squares on noise (PNG), sized unlike the model input so decoding resizes."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
            lo, hi = sorted(rng.integers(4, size - 4, 2))
            pixels[lo:hi + 4, lo:hi + 4, c] = 255
            Image.fromarray(pixels).save(root / name / f"{name}_{i}.png")
    return root


def make_venv(root: Path, packages) -> Path:
    """A virtualenv without pip whose only third-party packages are links to `packages` of this venv.

    No network: the packages are symlinked into a folder named by a .pth file. Returns its python.
    """
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    links = root / "linked-packages"
    links.mkdir()
    for name in packages:
        (links / name).symlink_to(HOST_SITE / name)
    python = root / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True, timeout=60).stdout.strip()
    Path(site, "linked-packages.pth").write_text(f"{links}\n", encoding="utf-8")
    return python

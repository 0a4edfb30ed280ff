"""An affine preprocessing carried by the integer input's quantization: no preprocessing ops, camera bytes in.

The tiny nested run (tests/export_support.py) bakes in MobileNet's Rescaling(1/127.5, offset=-1); its full-integer
TFLite artifacts with integer io are converted without that layer, calibrated on the images put through it.
"""
from __future__ import annotations

import importlib.util
import shutil

import numpy as np
import pytest
import tf_keras as keras
from export_support import SIZE, tflite_bytes

from edgetl.backbones import preprocessing_layer
from edgetl.data import load_arrays, load_splits
from edgetl.edge.runtime import open_model
from edgetl.export import export_run
from edgetl.export.inputs import ExportInputs
from edgetl.export.metadata import read_metadata
from edgetl.export.tflite import Affine, input_affine
from edgetl.io import read_json
from edgetl.rundir import RunDir


def _with_preprocess(layer):
    image = keras.Input((8, 8, 3), name="image")
    x = layer(image) if layer is not None else image
    return keras.Model(image, keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(x)))


def test_input_affine_reads_one_per_tensor_preprocess_layer():
    assert input_affine(_with_preprocess(preprocessing_layer("tf"))) == Affine(1 / 127.5, -1.0)
    assert Affine(1 / 127.5, -1.0).normalization == pytest.approx((127.5, 127.5))
    same = keras.layers.Normalization(mean=[100.0] * 3, variance=[400.0] * 3, name="preprocess")
    affine = input_affine(_with_preprocess(same))
    assert (affine.scale, affine.offset) == pytest.approx((1 / 20, -5.0))
    # Per-channel statistics (torch), a channel swap (caffe) and no preprocessing layer cannot be carried.
    for layer in (preprocessing_layer("torch"), preprocessing_layer("caffe"), None):
        assert input_affine(_with_preprocess(layer)) is None


def _ops(path) -> list[str]:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    return [op["op_name"] for op in interpreter._get_ops_details() if op["op_name"] != "DELEGATE"]


@pytest.fixture(scope="module")
def int8_io(tiny_export, tmp_path_factory):
    """A copy of the tiny run exported to tflite int8 with int8 io; (run, test images, Keras top-1, ops artifact)."""
    run_dir = tmp_path_factory.mktemp("affine") / "run"
    shutil.copytree(tiny_export.run_dir, run_dir, ignore=shutil.ignore_patterns("exports"))
    run = RunDir(run_dir)
    recipe = run.load_recipe()
    recipe.export.io = "int8"
    run.recipe_path.write_text(recipe.to_yaml(), encoding="utf-8")
    assert not export_run(run_dir, tflite=["int8"], onnx=[], echo=lambda _: None).failed
    images = load_arrays(load_splits(recipe).test, SIZE)[0]
    model = run.load_model()
    # The artifact edgetl made before: preprocessing as ops, uint8 input scale 1, zero point 0.
    with_ops = run_dir / "with_ops.tflite"
    with_ops.write_bytes(tflite_bytes(model, ExportInputs(run, run.load_recipe()).calibration))
    return run, images, model.predict(images.astype(np.float32), verbose=0).argmax(1), with_ops


@pytest.mark.parametrize("io", ["uint8", "int8"])
def test_integer_input_carries_the_rescaling_instead_of_ops(tiny_export, int8_io, io):
    run, images, keras_top1, with_ops = int8_io
    folder = (tiny_export.run_dir if io == "uint8" else run.path) / "exports"
    entry = _entry(folder, "tflite-int8")
    assert entry["input"]["dtype"] == io and entry["input"]["scale"] == pytest.approx(1 / 127.5)
    assert entry["input"]["zero_point"] == {"uint8": 127, "int8": -1}[io]  # as Google's reference MobileNetV2
    assert entry["quantization"]["input_affine"]["mean"] == 127.5
    ops, old_ops = _ops(folder / entry["path"]), _ops(with_ops)
    first_conv, old_first_conv = ops.index("CONV_2D"), old_ops.index("CONV_2D")
    assert "MUL" in old_ops[:old_first_conv] and {"MUL", "ADD"}.isdisjoint(ops[:first_conv])
    assert ops[:first_conv] == (["QUANTIZE"] if io == "uint8" else [])  # uint8 -> int8 shift only, as the reference
    compute = [op for op in ops if op != "QUANTIZE"]  # the io shifts aside, the graph is the old one without MUL, ADD
    assert compute == [op for op in old_ops if op != "QUANTIZE"][2:]
    meta = read_metadata(folder / entry["path"])
    assert (meta["input_mean"], meta["input_std"]) == ([127.5], [127.5]) and "(x - 127.5) / 127.5" in meta["description"]
    # Every runner feeds the camera bytes; the model reads them as preprocessed and agrees with Keras and the
    # artifact with preprocessing ops.
    runner = open_model(folder / entry["path"], threads=1)
    top1 = runner.predict(images).argmax(1)
    assert np.mean(top1 == keras_top1) >= 0.85
    assert np.mean(top1 == open_model(with_ops, threads=1).predict(images).argmax(1)) >= 0.9
    if importlib.util.find_spec("openvino") is not None:
        openvino = open_model(folder / entry["path"], threads=1, runtime="openvino").predict(images)
        np.testing.assert_allclose(openvino, runner.predict(images), atol=0.05)


def _entry(folder, name: str) -> dict:
    """Artifact `name`'s entry in exports/manifest.json."""
    return next(a for a in read_json(folder / "manifest.json")["artifacts"] if a["name"] == name)


def test_float_io_keeps_the_preprocessing_in_the_graph(tiny_export):
    entry = _entry(tiny_export.run_dir / "exports", "tflite-fp32")
    assert entry["input"]["dtype"] == "float32" and "input_affine" not in entry["quantization"]
    meta = read_metadata(tiny_export.run_dir / "exports" / entry["path"])
    assert (meta["input_mean"], meta["input_std"]) == ([0.0], [1.0])

"""Export stage: every variant converts, loads and agrees with Keras; failures and interruptions leave no file.

One tiny nested MobileNetV2-style run (Rescaling -> backbone Model with Conv-BN-ReLU6, ZeroPadding,
depthwise, projection and a residual Add -> pooling -> Dropout -> Dense) is trained on generated coloured
squares and exported once for the whole module.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import edgetl  # noqa: F401 - configures TensorFlow before it is imported
from edgetl import export as ex
from edgetl.data import load_arrays, load_splits
from edgetl.recipe import recipe_from_dict
from edgetl.io import atomic_write_text
from edgetl.rundir import RunDir

SIZE = 32
CLASSES = ("red", "green", "blue")
ALL_TFLITE = ["fp32", "fp16", "dynamic", "int8", "qat_int8", "pruned_int8"]
ALL_ONNX = ["fp32", "int8", "qat_int8"]
# Smallest top-1 agreement with the Keras model on the test split, per artifact.
MIN_AGREEMENT = {"tflite-fp32": 1.0, "tflite-fp16": 1.0, "tflite-dynamic": 0.9, "tflite-int8": 0.85,
                 "tflite-qat_int8": 0.85, "tflite-pruned_int8": 0.75, "onnx-fp32": 1.0, "onnx-int8": 0.85,
                 "onnx-qat_int8": 0.85}


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


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished tiny run: recipe.yaml, labels.txt and model.keras, as `edgetl train` writes them."""
    import tf_keras as keras

    root = tmp_path_factory.mktemp("export")
    recipe = recipe_from_dict({
        "name": "tiny", "seed": 1,
        "data": {"source": str(write_images(root / "data")), "image_size": SIZE, "batch_size": 16},
        "model": {"backbone": "mobilenet_v2", "alpha": 0.35, "weights": None},
        "export": {"tflite": ALL_TFLITE, "onnx": ALL_ONNX, "io": "uint8", "representative_samples": 24,
                   "qat": {"epochs": 1, "learning_rate": 1e-4},
                   "pruning": {"target_sparsity": 0.5, "epochs": 4, "learning_rate": 1e-2}}})
    splits = load_splits(recipe)
    images, labels = load_arrays(splits.train, SIZE)
    keras.utils.set_random_seed(0)
    model = tiny_nested_model(len(CLASSES))
    model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    model.fit(images.astype(np.float32), labels, epochs=12, batch_size=16, verbose=0)
    run = RunDir(root / "run")
    run.path.mkdir()
    atomic_write_text(run.recipe_path, recipe.to_yaml())
    atomic_write_text(run.labels_path, "\n".join(splits.class_names) + "\n")
    model.save(run.model_path)
    return run.path


@pytest.fixture(scope="module")
def exported(run_dir):
    """Every variant of both formats, exported once (the recipe's lists)."""
    lines = []
    result = ex.export_run(run_dir, echo=lines.append)
    return result, lines


@pytest.fixture(scope="module")
def test_set(run_dir):
    """Test-split pixels and the Keras model's predictions on them."""
    run = RunDir(run_dir)
    splits = load_splits(run.load_recipe())
    images, labels = load_arrays(splits.test, SIZE)
    probs = run.load_model().predict(images.astype(np.float32), verbose=0)
    return images, labels, probs


def artifacts(result) -> dict:
    return {a["name"]: a for a in result.manifest["artifacts"]}


def fresh_copy(run_dir: Path, tmp_path: Path) -> Path:
    """The run without its exports/, for tests that export again."""
    target = tmp_path / "run"
    shutil.copytree(run_dir, target, ignore=shutil.ignore_patterns("exports"))
    return target


def predict(path: Path, images: np.ndarray) -> np.ndarray:
    """Top-1 classes from a .tflite (LiteRT) or .onnx (onnxruntime) artifact, feeding raw pixels."""
    if path.suffix == ".onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {"image": images.astype(np.float32)})[0].argmax(1)
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    top1 = []
    for image in images:
        interpreter.set_tensor(inp["index"], ex.to_input_dtype(image[None].astype(np.float32), inp["dtype"],
                                                               *inp["quantization"]))
        interpreter.invoke()
        top1.append(int(interpreter.get_tensor(out["index"])[0].argmax()))
    return np.array(top1)


# ---------------------------------------------------------------------------------------------------------


def test_every_variant_is_written_with_a_complete_manifest(run_dir, exported):
    result, lines = exported
    out = Path(run_dir) / "exports"
    found = artifacts(result)
    assert result.failed == []
    assert list(found) == [f"tflite-{v}" for v in ALL_TFLITE] + [f"onnx-{v}" for v in ALL_ONNX]
    assert json.loads((out / "manifest.json").read_text()) == result.manifest
    assert (out / "labels.txt").read_text().split() == list(sorted(CLASSES))
    for name, entry in found.items():
        if name == "onnx-qat_int8" and entry["status"] == "not_supported":
            assert "tf2onnx" in entry["error"] and not list(out.glob(f"{name}.*"))
            continue
        assert entry["status"] == "ok", entry["error"]
        data = (out / entry["path"]).read_bytes()
        assert entry["size_bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert entry["gzip_bytes"] == len(gzip.compress(data, compresslevel=9, mtime=0))
        assert entry["input"]["shape"] == [None, SIZE, SIZE, 3] and entry["outputs"][0]["shape"][-1] == 3
        assert entry["converter"] and entry["quantization"]["scheme"] and entry["seconds"] >= 0
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]
    assert len([line for line in lines if line.startswith(("tflite-", "onnx-"))]) == len(found)


def test_each_artifact_agrees_with_keras(run_dir, exported, test_set):
    images, labels, probs = test_set
    keras_top1 = probs.argmax(1)
    assert np.mean(keras_top1 == labels) >= 0.9  # the tiny model learned the task
    for name, entry in artifacts(exported[0]).items():
        if entry["status"] != "ok":
            continue
        agreement = np.mean(predict(Path(run_dir) / "exports" / entry["path"], images) == keras_top1)
        assert agreement >= MIN_AGREEMENT[name], f"{name}: top-1 agreement {agreement:.2f}"


def test_integer_io_takes_camera_bytes_and_tflite_carries_metadata(run_dir, exported):
    from edgetl.metadata import read_metadata

    found = artifacts(exported[0])
    for variant in ("int8", "qat_int8", "pruned_int8"):
        entry = found[f"tflite-{variant}"]
        assert entry["input"] | {"name": None} == {"name": None, "dtype": "uint8", "shape": [None, SIZE, SIZE, 3],
                                                   "scale": 1.0, "zero_point": 0}
        assert entry["outputs"][0]["dtype"] == "uint8" and entry["quantization"]["calibration_samples"] == 24
    assert found["tflite-fp32"]["input"]["dtype"] == "float32" and found["tflite-fp32"]["input"]["scale"] is None
    for entry in found.values():
        if entry["format"] == "tflite":
            meta = read_metadata(Path(run_dir) / "exports" / entry["path"])
            assert meta["labels"] == sorted(CLASSES) and meta["input_mean"] == [0.0] and meta["input_std"] == [1.0]


def test_qat_flattens_the_nested_model_and_reports_float_layers(exported):
    result = exported[0]
    prep = result.manifest["preparation"]
    assert prep["flatten"]["max_abs_diff"] <= 1e-5
    assert prep["qat"]["layers_left_float"] == ["preprocess"]
    assert prep["qat"]["calibrated_ranges"] == 7  # 3 ReLU6, projection BN, Add, pool, logits
    assert artifacts(result)["tflite-qat_int8"]["layers_left_float"] == ["preprocess"]


def int8_weight_zeros(path: Path) -> float:
    """Fraction of zeros in the int8 weights of the CONV_2D and FULLY_CONNECTED ops of a .tflite."""
    from ai_edge_litert import schema_py_generated as tfl

    model = tfl.ModelT.InitFromPackedBuf(path.read_bytes(), 0)
    graph, codes = model.subgraphs[0], [code.builtinCode for code in model.operatorCodes]
    weights = [np.frombuffer(bytes(model.buffers[graph.tensors[op.inputs[1]].buffer].data), np.int8)
               for op in graph.operators
               if codes[op.opcodeIndex] in (tfl.BuiltinOperator.CONV_2D, tfl.BuiltinOperator.FULLY_CONNECTED)]
    return float(np.mean(np.concatenate(weights) == 0))


def test_pruning_reaches_the_target_sparsity_and_shrinks_gzip(run_dir, exported):
    found = artifacts(exported[0])
    sparsity = found["tflite-pruned_int8"]["sparsity"]
    assert sparsity["target"] == 0.5 and sparsity["overall"] >= 0.49
    assert set(sparsity["layers"]) == {"Conv1", "project", "Conv_1", "predictions"}  # depthwise stays dense
    # erk allocation: the big first conv loses most, the small head stays dense
    assert sparsity["layers"]["Conv1"] > 0.7 and sparsity["layers"]["predictions"] == 0.0
    pruning = exported[0].manifest["preparation"]["pruning"]
    assert pruning["allocation"] == "erk" and pruning["distill"] and "val_predictions_loss" in pruning["history"]
    exports = Path(run_dir) / "exports"
    assert int8_weight_zeros(exports / "tflite-pruned_int8.tflite") >= 0.49  # int8 conversion keeps the zeros
    assert int8_weight_zeros(exports / "tflite-int8.tflite") < 0.2
    assert found["tflite-pruned_int8"]["gzip_bytes"] < found["tflite-int8"]["gzip_bytes"]


def test_onnx_has_named_input_and_dynamic_batch(run_dir, exported):
    import onnxruntime as ort

    entry = artifacts(exported[0])["onnx-int8"]
    session = ort.InferenceSession(str(Path(run_dir) / "exports" / entry["path"]), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    ops = {node.op_type for node in __import__("onnx").load(str(Path(run_dir) / "exports" / entry["path"])).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    batch = np.zeros((5, SIZE, SIZE, 3), np.float32)
    assert session.run(None, {"image": batch})[0].shape == (5, 3)


def test_unknown_variant_is_refused_before_any_work(run_dir, tmp_path):
    run = fresh_copy(run_dir, tmp_path)
    with pytest.raises(ex.ExportError, match="valid tflite variants: fp32, fp16, dynamic, int8, qat_int8, pruned_int8"):
        ex.export_run(run, tflite=["int8", "int4"], onnx=[])
    with pytest.raises(ex.ExportError, match="valid onnx variants: fp32, int8, qat_int8"):
        ex.export_run(run, tflite=["int8"], onnx=["fp16"])
    with pytest.raises(ex.ExportError, match="no variants to export"):
        ex.export_run(run, tflite=[], onnx=[])
    assert not (run / "exports").exists()


def test_a_failing_variant_leaves_no_file_and_the_others_export(run_dir, tmp_path, monkeypatch):
    run = fresh_copy(run_dir, tmp_path)

    def broken(fp32, calibration):
        raise RuntimeError("quantizer exploded")

    monkeypatch.setattr(ex, "quantize_onnx_static", broken)
    result = ex.export_run(run, tflite=[], onnx=["int8", "fp32"], echo=lambda _: None)
    found = artifacts(result)
    assert result.failed == ["onnx-int8"]
    assert found["onnx-int8"]["status"] == "failed" and "quantizer exploded" in found["onnx-int8"]["error"]
    assert found["onnx-int8"]["path"] is None and found["onnx-fp32"]["status"] == "ok"
    assert sorted(p.name for p in (run / "exports").iterdir()) == ["labels.txt", "manifest.json", "onnx-fp32.onnx"]


def test_an_interrupted_write_leaves_nothing_half_written(run_dir, tmp_path, monkeypatch):
    run = fresh_copy(run_dir, tmp_path)
    real_write = Path.write_bytes

    def interrupted(self, data):
        if "onnx-int8" in self.name:
            real_write(self, data[: len(data) // 2])
            raise KeyboardInterrupt
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ex.export_run(run, tflite=[], onnx=["fp32", "int8"], echo=lambda _: None)
    names = sorted(p.name for p in (run / "exports").iterdir())
    assert names == ["labels.txt", "manifest.json", "onnx-fp32.onnx"]
    manifest = json.loads((run / "exports" / "manifest.json").read_text())
    assert [a["name"] for a in manifest["artifacts"]] == ["onnx-fp32"]


def test_flatten_inlines_keras_mobilenet_v2_with_identical_outputs():
    import tf_keras as keras
    import tensorflow_model_optimization as tfmot

    from edgetl.backbones import build_classifier
    from edgetl.optimize import check_same_outputs, flatten_model

    model = build_classifier(3, "mobilenet_v2", SIZE, alpha=0.35, weights=None).model
    with pytest.raises(ValueError, match="inside another"):
        tfmot.quantization.keras.quantize_model(model)
    images = np.random.default_rng(0).integers(0, 256, (4, SIZE, SIZE, 3)).astype(np.float32)
    flat = flatten_model(model)
    assert not any(isinstance(layer, keras.Model) for layer in flat.layers)
    assert len(flat.layers) == len(model.layers) - 1 + len(model.get_layer(index=2).layers) - 1
    assert check_same_outputs(model, flat, images) <= 1e-6


def test_parse_formats():
    assert ex.parse_formats(["tflite"]) == (None, [])
    assert ex.parse_formats(["tflite:int8,fp16", "onnx-fp32"]) == (["int8", "fp16"], ["fp32"])
    assert ex.parse_formats(["onnx,tflite-int8"]) == (["int8"], None)
    with pytest.raises(ex.ExportError, match="unknown format"):
        ex.parse_formats(["coreml"])

"""Export stage: every variant converts, loads and agrees with Keras; failures and interruptions leave no file.

The tiny nested run of tests/export_support.py is exported once per session (conftest's `tiny_export`);
tests that export again work on a copy of the run without its exports/.
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from export_support import ALL_ONNX, ALL_TFLITE, CLASSES, SIZE

import edgetl.export as ex
from edgetl import variants
from edgetl.data import load_arrays, load_splits
from edgetl.edge.runtime import image_input
from edgetl.errors import EdgetlError
from edgetl.recipe import RecipeError, recipe_from_dict
from edgetl.rundir import RunDir

# Smallest top-1 agreement with the Keras model on the test split, per artifact.
MIN_AGREEMENT = {"tflite-fp32": 1.0, "tflite-fp16": 1.0, "tflite-dynamic": 0.9, "tflite-int8": 0.85,
                 "tflite-qat_int8": 0.85, "tflite-pruned_int8": 0.75, "onnx-fp32": 1.0, "onnx-int8": 0.85}


@pytest.fixture(scope="module")
def test_set(tiny_export):
    """Test-split pixels and the Keras model's predictions on them."""
    run = RunDir(tiny_export.run_dir)
    splits = load_splits(run.load_recipe())
    images, labels = load_arrays(splits.test, SIZE)
    probs = run.load_model().predict(images.astype(np.float32), verbose=0)
    return images, labels, probs


def artifacts(result) -> dict:
    return {a["name"]: a for a in result.manifest["artifacts"]}


def exports(tiny_export) -> Path:
    return Path(tiny_export.run_dir) / "exports"


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
        interpreter.set_tensor(inp["index"], image_input(image[None], np.dtype(inp["dtype"]).name))
        interpreter.invoke()
        top1.append(int(interpreter.get_tensor(out["index"])[0].argmax()))
    return np.array(top1)


# ---------------------------------------------------------------------------------------------------------


def test_every_variant_is_written_with_a_complete_manifest(tiny_export):
    result, lines, out = tiny_export.result, tiny_export.lines, exports(tiny_export)
    found = artifacts(result)
    assert result.failed == []
    assert list(found) == [f"tflite-{v}" for v in ALL_TFLITE] + [f"onnx-{v}" for v in ALL_ONNX]
    assert json.loads((out / "manifest.json").read_text()) == result.manifest
    assert (out / "labels.txt").read_text().split() == list(sorted(CLASSES))
    assert set(result.manifest["preparation"]) == {"flatten", "qat", "pruning", "bias_correction_tflite",
                                                   "bias_correction_onnx"}
    versions = result.manifest["versions"]
    assert all(versions[d] for d in ("python", "edgetl", "tensorflow", "tf2onnx", "onnxruntime", "ai-edge-litert"))
    for name, entry in found.items():
        if name == "onnx-qat_int8":
            continue  # not_supported: test_onnx_qat_int8_is_not_supported_while_tf2onnx_drops_the_weight_quantizers
        assert entry["status"] == "ok", entry["error"]
        assert entry["path"] == variants.find(entry["format"], entry["variant"]).filename
        data = (out / entry["path"]).read_bytes()
        assert entry["size_bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert entry["gzip_bytes"] == len(gzip.compress(data, compresslevel=9, mtime=0))
        assert entry["input"]["shape"] == [None, SIZE, SIZE, 3] and entry["outputs"][0]["shape"][-1] == 3
        assert entry["converter"] and entry["seconds"] >= 0
        assert entry["quantization"]["scheme"] == variants.find(entry["format"], entry["variant"]).scheme
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]
    assert len([line for line in lines if line.startswith(("tflite-", "onnx-"))]) == len(found)


def test_onnx_qat_int8_is_not_supported_while_tf2onnx_drops_the_weight_quantizers(tiny_export):
    """tf2onnx folds FakeQuantWithMinMaxVarsPerChannel into float weights: that graph is no int8 model."""
    from edgetl.export.onnx import _require_int8_weights

    entry = artifacts(tiny_export.result)["onnx-qat_int8"]
    assert entry["status"] == "not_supported" and entry["path"] is None and entry["size_bytes"] is None
    assert entry["error"].startswith("NotSupported: tf2onnx") and "FakeQuantWithMinMaxVarsPerChannel" in entry["error"]
    assert not list(exports(tiny_export).glob("onnx-qat_int8*"))
    # The check that decided it tells a static-QDQ int8 graph (weights through DequantizeLinear) from a float one.
    import onnx

    _require_int8_weights(onnx.load(str(exports(tiny_export) / "onnx-int8.onnx")))
    with pytest.raises(ex.NotSupported, match="float weights"):
        _require_int8_weights(onnx.load(str(exports(tiny_export) / "onnx-fp32.onnx")))


def test_each_artifact_agrees_with_keras(tiny_export, test_set):
    images, labels, probs = test_set
    keras_top1 = probs.argmax(1)
    assert np.mean(keras_top1 == labels) >= 0.9  # the tiny model learned the task
    ok = {name: entry for name, entry in artifacts(tiny_export.result).items() if entry["status"] == "ok"}
    assert set(ok) == set(MIN_AGREEMENT)
    for name, entry in ok.items():
        agreement = np.mean(predict(exports(tiny_export) / entry["path"], images) == keras_top1)
        assert agreement >= MIN_AGREEMENT[name], f"{name}: top-1 agreement {agreement:.2f}"


def test_integer_io_takes_camera_bytes_and_tflite_carries_metadata(tiny_export):
    from edgetl.export.metadata import read_metadata

    found = artifacts(tiny_export.result)
    for variant in ("int8", "qat_int8", "pruned_int8"):
        entry = found[f"tflite-{variant}"]
        # The input quantization carries the Rescaling (x / 127.5 - 1): camera bytes in, no preprocessing ops.
        assert entry["input"] | {"name": None, "scale": None} == {"name": None, "dtype": "uint8", "scale": None,
                                                                   "shape": [None, SIZE, SIZE, 3], "zero_point": 127}
        assert entry["input"]["scale"] == pytest.approx(1 / 127.5)
        assert entry["quantization"]["input_affine"] == {"scale": 1 / 127.5, "offset": -1.0, "mean": 127.5, "std": 127.5}
        assert entry["outputs"][0]["dtype"] == "uint8" and entry["quantization"]["calibration_samples"] == 24
    assert found["tflite-fp32"]["input"]["dtype"] == "float32" and found["tflite-fp32"]["input"]["scale"] is None
    for entry in found.values():
        if entry["format"] == "tflite":
            meta = read_metadata(exports(tiny_export) / entry["path"])
            carried = entry["input"]["dtype"] == "uint8"  # the int8 variants: what the quantization reads the byte as
            assert meta["labels"] == sorted(CLASSES)
            assert (meta["input_mean"], meta["input_std"]) == (([127.5], [127.5]) if carried else ([0.0], [1.0]))
            assert meta["name"] == f"tiny {entry['name']}"


def test_qat_flattens_the_nested_model_and_reports_float_layers(tiny_export):
    result = tiny_export.result
    prep = result.manifest["preparation"]
    assert prep["flatten"]["max_abs_diff"] <= 1e-5
    assert prep["qat"]["layers_left_float"] == ["preprocess"]
    assert prep["qat"]["calibrated_ranges"] == 7  # 3 ReLU6, projection BN, Add, pool, logits
    qat = artifacts(result)["tflite-qat_int8"]
    assert qat["layers_left_float"] == ["preprocess"]
    assert (qat["quantization"]["finetune_epochs"], qat["quantization"]["learning_rate"]) == (1, 1e-4)


def int8_weight_zeros(path: Path) -> float:
    """Fraction of zeros in the int8 weights of the CONV_2D and FULLY_CONNECTED ops of a .tflite."""
    from ai_edge_litert import schema_py_generated as tfl

    model = tfl.ModelT.InitFromPackedBuf(path.read_bytes(), 0)
    graph, codes = model.subgraphs[0], [code.builtinCode for code in model.operatorCodes]
    weights = [np.frombuffer(bytes(model.buffers[graph.tensors[op.inputs[1]].buffer].data), np.int8)
               for op in graph.operators
               if codes[op.opcodeIndex] in (tfl.BuiltinOperator.CONV_2D, tfl.BuiltinOperator.FULLY_CONNECTED)]
    return float(np.mean(np.concatenate(weights) == 0))


def test_pruning_reaches_the_target_sparsity_and_shrinks_gzip(tiny_export):
    found = artifacts(tiny_export.result)
    sparsity = found["tflite-pruned_int8"]["sparsity"]
    assert sparsity["target"] == 0.5 and sparsity["overall"] >= 0.49
    assert set(sparsity["layers"]) == {"Conv1", "project", "Conv_1", "predictions"}  # depthwise stays dense
    # erk allocation: the big first conv loses most, the small head stays dense
    assert sparsity["layers"]["Conv1"] > 0.7 and sparsity["layers"]["predictions"] == 0.0
    pruning = tiny_export.result.manifest["preparation"]["pruning"]
    assert pruning["allocation"] == "erk" and pruning["distill"] and "val_predictions_loss" in pruning["history"]
    assert int8_weight_zeros(exports(tiny_export) / "tflite-pruned_int8.tflite") >= 0.49  # int8 keeps the zeros
    assert int8_weight_zeros(exports(tiny_export) / "tflite-int8.tflite") < 0.2
    assert found["tflite-pruned_int8"]["gzip_bytes"] < found["tflite-int8"]["gzip_bytes"]


def test_onnx_int8_records_the_integer_types_its_graph_holds(tiny_export):
    """The manifest's activation_type / weight_type are what quantize_static produced: this machine's target's."""
    import onnx
    import onnxruntime as ort

    from edgetl.export.targets import resolve

    entry = artifacts(tiny_export.result)["onnx-int8"]
    path = exports(tiny_export) / entry["path"]
    graph = onnx.load(str(path)).graph
    dtypes = {init.name: onnx.helper.tensor_dtype_to_np_dtype(init.data_type).name for init in graph.initializer}
    activations = {dtypes[node.input[2]] for node in graph.node if node.op_type == "QuantizeLinear"}
    dequantized = {node.output[0]: node.input[0] for node in graph.node if node.op_type == "DequantizeLinear"}
    weights = {dtypes[dequantized[node.input[1]]] for node in graph.node if node.op_type in ("Conv", "Gemm", "MatMul")}
    target, _ = resolve("auto")
    assert activations == {entry["quantization"]["activation_type"]} == {target.activation_type}
    assert weights == {entry["quantization"]["weight_type"]} == {target.weight_type}
    assert entry["quantization"]["target"]["name"] == target.name
    assert entry["quantization"]["per_channel"] and entry["quantization"]["calibrate_method"] == "MinMax"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert session.run(None, {"image": np.zeros((5, SIZE, SIZE, 3), np.float32)})[0].shape == (5, 3)


def test_int16x8_has_int16_activations_float_io_and_agrees_with_fp32(tiny_export, test_set, tmp_path):
    from ai_edge_litert.interpreter import Interpreter

    result = ex.export_run(fresh_copy(tiny_export.run_dir, tmp_path), tflite=["int16x8"], onnx=[], echo=lambda _: None)
    (entry,) = result.manifest["artifacts"]
    assert entry["status"] == "ok", entry["error"]
    assert entry["input"]["dtype"] == entry["outputs"][0]["dtype"] == "float32"
    assert entry["quantization"]["activations"] == "int16" and entry["quantization"]["calibration_samples"] == 24
    path = tmp_path / "run" / "exports" / entry["path"]
    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    dtypes = {np.dtype(t["dtype"]).name for t in interpreter.get_tensor_details()}
    assert {"int16", "int8"} <= dtypes
    images = test_set[0]
    fp32 = predict(exports(tiny_export) / "tflite-fp32.tflite", images)
    assert np.mean(predict(path, images) == fp32) >= 0.95


def test_a_re_exported_variant_keeps_its_place_in_the_manifest(tiny_export, tmp_path):
    """Exporting fp32 again into a run that has fp32 and int8 replaces its entry in the recipe's order."""
    run = fresh_copy(tiny_export.run_dir, tmp_path)
    first = ex.export_run(run, tflite=["fp32", "int8"], onnx=[], echo=lambda _: None)
    again = ex.export_run(run, tflite=["fp32"], onnx=[], echo=lambda _: None)
    names = [[a["name"] for a in result.manifest["artifacts"]] for result in (first, again)]
    assert names == [["tflite-fp32", "tflite-int8"]] * 2 and again.failed == []


def test_the_table_is_what_recipe_check_formats_and_export_read(tiny_export, tmp_path, monkeypatch):
    assert len({v.key for v in variants.VARIANTS}) == len(variants.VARIANTS) and variants.FORMATS == ("tflite", "onnx")
    for row in variants.VARIANTS:
        assert callable(row.builder()) and callable(row.grapher()) and callable(row.inspector())
        assert row.filename == f"{row.format}-{row.name}{row.suffix}" and row.suffix == f".{row.format}"
    assert variants.find("tflite", "int8").needs == (variants.CALIBRATION,)
    assert variants.find("onnx", "qat_int8").needs == (variants.FINETUNE, variants.FLAT)
    # One more row (and a builder: fp16's) is one more variant for the recipe, --formats and the export.
    monkeypatch.setattr(variants, "VARIANTS", variants.VARIANTS + (
        dataclasses.replace(variants.find("tflite", "fp16"), name="half", scheme="float16, by another name"),))
    assert recipe_from_dict({"export": {"tflite": ["half"]}}).export.tflite == ["half"]
    listed = "fp32, fp16, dynamic, int8, qat_int8, pruned_int8, int16x8, int8_repaired, half"
    with pytest.raises(RecipeError, match=f"valid tflite variants: {listed}"):
        recipe_from_dict({"export": {"tflite": ["quarter"]}})
    assert ex.parse_formats(["tflite:half"]) == (["half"], [])
    result = ex.export_run(fresh_copy(tiny_export.run_dir, tmp_path), tflite=["half"], onnx=[], echo=lambda _: None)
    (entry,) = result.manifest["artifacts"]
    assert (entry["name"], entry["status"], entry["path"]) == ("tflite-half", "ok", "tflite-half.tflite")
    assert entry["quantization"] == {"scheme": "float16, by another name"}


def test_unknown_variant_is_refused_before_any_work(tiny_export, tmp_path):
    run = fresh_copy(tiny_export.run_dir, tmp_path)
    listed = "fp32, fp16, dynamic, int8, qat_int8, pruned_int8, int16x8, int8_repaired"
    with pytest.raises(ex.ExportError, match=f"valid tflite variants: {listed}"):
        ex.export_run(run, tflite=["int8", "int4"], onnx=[])
    with pytest.raises(ex.ExportError, match="valid onnx variants: fp32, int8, int8_repaired, qat_int8"):
        ex.export_run(run, tflite=["int8"], onnx=["fp16"])
    with pytest.raises(ex.ExportError, match="no variants to export"):
        ex.export_run(run, tflite=[], onnx=[])
    assert not (run / "exports").exists()


@pytest.mark.parametrize("damage", ["truncated", "garbled"])
def test_a_damaged_model_keras_is_named_in_one_line(tiny_export, tmp_path, damage):
    from edgetl.cli import cli

    run = fresh_copy(tiny_export.run_dir, tmp_path)
    model = RunDir(run).model_path
    data = bytearray(model.read_bytes())
    if damage == "truncated":  # an interrupted copy: the zip directory at the end is gone
        del data[len(data) // 2:]
    else:  # flipped bytes inside the weights: the archive's CRC check fails
        start = data.index(b"model.weights.h5") + 4096
        data[start:start + 64] = bytes(b ^ 0xFF for b in data[start:start + 64])
    model.write_bytes(bytes(data))
    with pytest.raises(EdgetlError, match=f"{model} is damaged or not a Keras model"):
        ex.export_run(run, tflite=["fp32"], onnx=[])
    assert not (run / "exports").exists()
    done = CliRunner().invoke(cli, ["export", str(run), "--formats", "tflite:fp32"])
    assert done.exit_code == 1 and f"Error: {model} is damaged or not a Keras model" in done.output
    assert "Traceback" not in done.output and "file signature not found" not in done.output


def test_a_failing_variant_leaves_no_file_and_the_others_export(tiny_export, tmp_path, monkeypatch):
    from edgetl.export import onnx

    run = fresh_copy(tiny_export.run_dir, tmp_path)

    def broken(pre, calibration, **_):
        raise RuntimeError("quantizer exploded")

    monkeypatch.setattr(onnx, "quantize_pre_processed", broken)
    result = ex.export_run(run, tflite=[], onnx=["int8", "fp32"], echo=lambda _: None)
    found = artifacts(result)
    assert result.failed == ["onnx-int8"]
    assert found["onnx-int8"]["status"] == "failed" and "quantizer exploded" in found["onnx-int8"]["error"]
    assert found["onnx-int8"]["path"] is None and found["onnx-fp32"]["status"] == "ok"
    assert sorted(p.name for p in (run / "exports").iterdir()) == ["labels.txt", "manifest.json", "onnx-fp32.onnx"]


def test_an_interrupted_write_leaves_nothing_half_written(tiny_export, tmp_path, monkeypatch):
    run = fresh_copy(tiny_export.run_dir, tmp_path)
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
    import tensorflow_model_optimization as tfmot
    import tf_keras as keras

    from edgetl.backbones import build_classifier
    from edgetl.export.optimize import check_same_outputs, flatten_model

    model = build_classifier(3, "mobilenet_v2", SIZE, alpha=0.35, weights=None).model
    with pytest.raises(ValueError, match="inside another"):
        tfmot.quantization.keras.quantize_model(model)
    images = np.random.default_rng(0).integers(0, 256, (4, SIZE, SIZE, 3)).astype(np.float32)
    flat = flatten_model(model)
    assert not any(isinstance(layer, keras.Model) for layer in flat.layers)
    assert len(flat.layers) == len(model.layers) - 1 + len(model.get_layer(index=2).layers) - 1
    assert check_same_outputs(model, flat, images) <= 1e-6


def test_the_cache_builds_once_and_remembers_a_failure():
    from edgetl.export.cache import Cache

    cache, calls = Cache(), []

    def failing():
        calls.append("qat")
        raise RuntimeError("fine-tune diverged")

    for _ in range(2):  # tflite-qat_int8, then onnx-qat_int8: one fine-tune, the same error
        with pytest.raises(RuntimeError, match="fine-tune diverged"):
            cache.get("qat", failing)
    assert calls == ["qat"]
    assert cache.prepare("flatten", lambda: ("flat model", {"layers": 3})) == "flat model"
    assert cache.prepare("flatten", lambda: pytest.fail("built twice")) == "flat model"
    assert cache.reports == {"flatten": {"layers": 3}}


def test_parse_formats():
    assert ex.parse_formats(["tflite"]) == (None, [])
    assert ex.parse_formats(["tflite:int8,fp16", "onnx-fp32"]) == (["int8", "fp16"], ["fp32"])
    assert ex.parse_formats(["onnx,tflite-int8"]) == (["int8"], None)
    with pytest.raises(ex.ExportError, match="unknown format"):
        ex.parse_formats(["coreml"])

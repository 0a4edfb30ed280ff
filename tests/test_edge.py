"""edgetl.edge: the TensorFlow-free runner (TFLite on ai_edge_litert, ONNX on onnxruntime), edgetl-bench,
the portable zipapp in a virtualenv that has only numpy, pillow and ai-edge-litert, and the run-dir sweep."""
from __future__ import annotations

import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from edge_support import CLASSES, LITERT, NUMPY_PILLOW, env_with_repo, make_venv, tiny_model, to_onnx, to_tflite, write_images

from edgetl.edge import bench
from edgetl.edge.images import decode_image
from edgetl.edge.runtime import ModelError, dequantize, image_input, model_labels, open_model
from edgetl.edge.sweep import BenchFailed, bench_run_dir, format_sweep
from edgetl.edge.zipapp import build_runner
from edgetl.io import read_json

FAST = ["--threads", "1", "--runs", "2", "--warmup", "0"]


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    """Tiny single- and two-head models, their TFLite/ONNX exports, test images and Keras reference outputs."""
    root = tmp_path_factory.mktemp("edge")
    model = tiny_model()
    multi = tiny_model(heads=(("species", 3), ("color", 2)))
    images_dir = write_images(root / "images")
    paths = sorted(p.relative_to(images_dir).as_posix() for p in images_dir.rglob("*.png"))
    pixels = np.stack([decode_image(images_dir / p, 32) for p in paths])
    models = root / "models"
    models.mkdir()
    ns = {
        "root": root, "images": images_dir, "paths": paths, "pixels": pixels,
        "keras": model.predict(pixels.astype(np.float32), verbose=0),
        "keras_multi": dict(zip(["species", "color"], multi.predict(pixels.astype(np.float32), verbose=0))),
        "fp32": to_tflite(model, models / "fp32.tflite"),
        "u8": to_tflite(model, models / "u8.tflite", "uint8"),
        "i8": to_tflite(model, models / "i8.tflite", "int8"),
        "onnx": to_onnx(model, models / "model.onnx"),
        "multi_tflite": to_tflite(multi, models / "multi.tflite"),
        "multi_onnx": to_onnx(multi, models / "multi.onnx"),
    }
    (models / "labels.txt").write_text("\n".join(CLASSES) + "\n", encoding="utf-8")
    return ns


@pytest.fixture(scope="module")
def litert_python(tmp_path_factory):
    """Python of a venv with only numpy, pillow and ai-edge-litert."""
    return make_venv(tmp_path_factory.mktemp("venv-litert") / "venv", NUMPY_PILLOW + LITERT)


def test_edge_imports_without_tensorflow():
    heavy = ["tensorflow", "tf_keras", "keras", "tf2onnx", "onnx", "sklearn", "matplotlib", "click", "yaml",
             "ai_edge_litert", "onnxruntime", "openvino", "torch"]
    code = (
        "import sys\n"
        "import edgetl.edge, edgetl.edge.runtime, edgetl.edge.bench, edgetl.edge.evaluate, edgetl.edge.images, "
        "edgetl.edge.zipapp, edgetl.edge.remote, edgetl.edge.sweep\n"
        f"print([m for m in {heavy!r} if m in sys.modules])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env_with_repo())
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("name", ["fp32", "onnx"])
def test_float_models_match_keras(art, name):
    runner = open_model(art[name], threads=1)
    assert (runner.kind, runner.input_shape, runner.input_dtype) == (art[name].suffix[1:], (32, 32, 3), "float32")
    assert runner.runtime_name == ("ai_edge_litert" if name == "fp32" else "onnxruntime")
    assert runner.load_time_s > 0
    probs = runner.predict(art["pixels"])
    assert probs.dtype == np.float32 and probs.shape == (len(art["paths"]), 3)
    np.testing.assert_allclose(probs, art["keras"], atol=1e-4)
    np.testing.assert_allclose(runner.predict(art["pixels"][:1]), art["keras"][:1], atol=1e-4)  # batch resized back


@pytest.mark.parametrize("name", ["u8", "i8"])
def test_quantized_models_take_raw_pixels(art, name):
    runner = open_model(art[name], threads=1)
    assert runner.input_dtype == ("uint8" if name == "u8" else "int8")
    probs = runner.predict(art["pixels"])
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=0.02)  # dequantized softmax
    np.testing.assert_allclose(probs, art["keras"], atol=0.03)


def test_integer_inputs_take_camera_bytes_and_outputs_dequantize():
    pixels = np.array([0, 1, 128, 255], dtype=np.uint8)
    np.testing.assert_array_equal(image_input(pixels, "uint8"), [0, 1, 128, 255])
    np.testing.assert_array_equal(image_input(pixels, "int8"), [-128, -127, 0, 127])
    np.testing.assert_array_equal(image_input(np.array([-3.0, 1.4, 254.6, 300.0]), "uint8"), [0, 1, 255, 255])
    assert image_input(pixels, "float32").dtype == np.float32
    np.testing.assert_allclose(dequantize(np.array([0, 128, 255], np.uint8), 1 / 256, 0), [0, 0.5, 255 / 256])
    np.testing.assert_allclose(dequantize(np.array([-128, 0], np.int8), 0.5, -128), [0, 64])


@pytest.mark.parametrize("name", ["multi_tflite", "multi_onnx"])
def test_multi_head_outputs_by_name(art, name):
    runner = open_model(art[name])
    assert sorted(runner.output_names) == ["color", "species"]
    outputs = runner.predict_all(art["pixels"])
    for head, expected in art["keras_multi"].items():
        np.testing.assert_allclose(outputs[head], expected, atol=1e-4)
    np.testing.assert_array_equal(runner.predict(art["pixels"]), outputs[runner.output_names[0]])


def test_time_invoke_statistics(art):
    stats = open_model(art["fp32"], threads=1, xnnpack=False).time_invoke(batch=2, runs=7, warmup=1)
    assert (stats.runs, stats.batch) == (7, 2)
    assert 0 < stats.p50_ms <= stats.p90_ms <= stats.p99_ms
    assert stats.std_ms >= 0 and stats.mean_ms > 0


def test_bench_json_has_latency_per_thread_and_xnnpack(art, tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = bench.main([str(art["fp32"]), "--threads", "1,2", "--runs", "3", "--warmup", "1", "--json", str(out)])
    assert code == 0
    doc = read_json(out)
    assert [(r["threads"], r["xnnpack"]) for r in doc["latency"]] == [(1, True), (1, False), (2, True), (2, False)]
    for row in doc["latency"]:
        assert {"load_time_s", "mean_ms", "p50_ms", "p90_ms", "p99_ms", "std_ms"} <= row.keys()
        assert row["runs"] == 3 and row["load_time_s"] > 0
    assert doc["peak_rss_mb"] > 10
    assert {"machine", "os", "python", "cpu_count", "runtime", "runtime_version"} <= doc["device"].keys()
    assert doc["device"]["runtime"] == "ai_edge_litert"
    assert doc["model"]["size_bytes"] == art["fp32"].stat().st_size and doc["model"]["input_dtype"] == "float32"
    table = capsys.readouterr().out
    assert "threads" in table and "xnnpack" in table and "off" in table


def test_onnx_bench_has_one_row_per_thread_count(art, tmp_path):
    out = tmp_path / "onnx.json"
    assert bench.main([str(art["onnx"]), "--threads", "1,2", "--runs", "2", "--warmup", "0", "--json", str(out)]) == 0
    assert [(r["threads"], r["xnnpack"]) for r in read_json(out)["latency"]] == [(1, None), (2, None)]


def test_class_folders_give_accuracy_with_labels_beside_model(art, tmp_path):
    images = tmp_path / "images"
    write_images(images)
    (images / "red" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "acc.json"
    assert bench.main([str(art["fp32"]), "--images", str(images), *FAST, "--json", str(out)]) == 0
    doc = read_json(out)
    assert doc["model"]["labels"].endswith("labels.txt")
    assert doc["images"]["layout"] == "class_folders" and doc["images"]["count"] == len(art["paths"])
    assert doc["images"]["skipped"] == [{"path": "red/broken.png", "reason": "not an image Pillow can identify"}]
    by_path = {p["path"]: p for p in doc["predictions"]}
    expected = []
    for path, probs in zip(art["paths"], art["keras"]):
        pred = by_path[path]
        assert pred["top1"] == int(np.argmax(probs)) and pred["label"] == CLASSES[pred["top1"]]
        assert pred["expected"] == path.split("/")[0]
        expected.append(CLASSES.index(pred["expected"]) == pred["top1"])
    assert doc["accuracy"] == pytest.approx(np.mean(expected))


def test_flat_folder_predicts_without_accuracy(art, tmp_path):
    for path in art["paths"][:2]:
        (tmp_path / path.replace("/", "_")).write_bytes((art["images"] / path).read_bytes())
    out = tmp_path / "flat.json"
    assert bench.main([str(art["onnx"]), "--images", str(tmp_path), *FAST, "--json", str(out)]) == 0
    doc = read_json(out)
    assert doc["images"]["layout"] == "flat" and doc["accuracy"] is None
    assert [p["path"] for p in doc["predictions"]] == sorted(p.replace("/", "_") for p in art["paths"][:2])
    assert all("expected" not in p for p in doc["predictions"])


def test_class_folder_not_in_labels_is_a_clear_error(art, tmp_path, capsys):
    (tmp_path / "purple").mkdir()
    (tmp_path / "purple" / "a.png").write_bytes((art["images"] / art["paths"][0]).read_bytes())
    assert bench.main([str(art["fp32"]), "--images", str(tmp_path), *FAST]) == bench.EXIT_FAILED
    err = capsys.readouterr().err
    assert "class folders purple are not among the model's labels (blue, green, red)" in err


def test_labels_from_embedded_metadata_then_labels_txt(art, tmp_path):
    plain = tmp_path / "plain.tflite"
    plain.write_bytes(art["fp32"].read_bytes())
    assert model_labels(plain)[0] is None
    (tmp_path / "labels.txt").write_text("a\nb\nc\n", encoding="utf-8")
    assert model_labels(plain)[0] == ["a", "b", "c"]
    # Models with TFLite metadata carry their associated files as a zip appended to the flatbuffer.
    with_metadata = tmp_path / "meta.tflite"
    with_metadata.write_bytes(art["fp32"].read_bytes())
    with zipfile.ZipFile(with_metadata, "a") as archive:
        archive.writestr("labels.txt", "cat\ndog\nfox\n")
    assert model_labels(with_metadata)[0] == ["cat", "dog", "fox"]
    runner = open_model(with_metadata)
    assert runner.labels == ["cat", "dog", "fox"]
    np.testing.assert_allclose(runner.predict(art["pixels"][:2]), art["keras"][:2], atol=1e-4)


def test_labels_written_by_edgetl_metadata_are_read_per_head(art, tmp_path):
    from edgetl.export.metadata import add_metadata

    data = add_metadata(art["multi_tflite"].read_bytes(), labels={"species": ["cat", "dog", "fox"], "color": ["black", "white"]},
                        name="multi", description="two heads", version="1")
    path = tmp_path / "multi_meta.tflite"
    path.write_bytes(data)
    runner = open_model(path)
    head = runner.output_names[0]
    assert runner.labels == {"species": ["cat", "dog", "fox"], "color": ["black", "white"]}[head]
    single = tmp_path / "single_meta.tflite"
    single.write_bytes(add_metadata(art["fp32"].read_bytes(), labels=["a", "b", "c"], name="s", description="d", version="1"))
    assert model_labels(single)[0] == ["a", "b", "c"]


def test_onnx_labels_from_model_metadata(art, tmp_path):
    import onnx

    proto = onnx.load(str(art["onnx"]))
    onnx.helper.set_model_props(proto, {"labels": "cat\ndog\nfox"})
    path = tmp_path / "meta.onnx"
    onnx.save(proto, str(path))
    assert open_model(path).labels == ["cat", "dog", "fox"]


def test_bad_model_paths_are_clear_errors(tmp_path, capsys):
    with pytest.raises(ModelError, match="model file not found"):
        open_model(tmp_path / "missing.tflite")
    (tmp_path / "model.pb").write_bytes(b"x")
    with pytest.raises(ModelError, match="expected one of .tflite, .onnx"):
        open_model(tmp_path / "model.pb")
    (tmp_path / "junk.tflite").write_bytes(b"not a flatbuffer")
    assert bench.main([str(tmp_path / "junk.tflite"), *FAST]) == bench.EXIT_FAILED
    assert "junk.tflite: ai_edge_litert cannot load this model" in capsys.readouterr().err


def test_zipapp_in_clean_venv_matches_host_exactly(art, litert_python, tmp_path):
    runner = build_runner(tmp_path / "runner.pyz")
    check = subprocess.run([str(litert_python), "-c", "import tensorflow"], capture_output=True, timeout=60)
    assert check.returncode != 0  # the venv really lacks TensorFlow
    for name in ("fp32", "u8"):
        out = tmp_path / f"{name}.json"
        result = subprocess.run(
            [str(litert_python), str(runner), str(art[name]), "--images", str(art["images"]), *FAST, "--json", str(out)],
            capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        device = read_json(out)
        host = bench.run_bench(art[name], bench.BenchOptions(threads=(1,), runs=2, warmup=0, images=str(art["images"])))
        assert device["device"]["python_executable"] == str(litert_python)
        assert device["predictions"] == json.loads(json.dumps(host["predictions"]))
        assert device["accuracy"] == host["accuracy"]


def test_runner_without_runtime_says_what_to_install(art, tmp_path):
    python = make_venv(tmp_path / "venv", NUMPY_PILLOW)
    result = subprocess.run([str(python), str(build_runner(tmp_path / "r.pyz")), str(art["fp32"]), *FAST],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == bench.EXIT_ENVIRONMENT
    assert result.stderr.strip() == (
        "edgetl-bench: error: no TFLite runtime installed: pip install ai-edge-litert (or tflite-runtime on older boards)")


def _fake_run(root, art):
    exports = root / "exports"
    exports.mkdir(parents=True)
    for name in ("fp32", "onnx"):
        (exports / art[name].name).write_bytes(art[name].read_bytes())
    manifest = {"artifacts": [
        {"variant": "fp32", "format": "tflite", "path": "fp32.tflite"},
        {"variant": "fp32", "format": "onnx", "path": "model.onnx"},
        {"variant": "int8", "format": "tflite", "path": "int8.tflite", "error": "calibration failed"},
        {"variant": "junk", "format": "tflite", "path": "junk.tflite"},
    ]}
    (exports / "junk.tflite").write_bytes(b"not a flatbuffer")
    (exports / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    (root / "labels.txt").write_text("\n".join(CLASSES) + "\n", encoding="utf-8")
    return root


def test_sweep_merges_edge_section_into_validation_report(art, tmp_path):
    run = _fake_run(tmp_path / "run", art)
    (run / "validation").mkdir()
    (run / "validation" / "report.json").write_text(json.dumps({"passed": True}), encoding="utf-8")
    options = bench.BenchOptions(threads=(1,), runs=2, warmup=0, xnnpack="on", images=str(art["images"]))
    section = bench_run_dir(run, options)
    report = read_json(run / "validation" / "report.json")
    assert report["passed"] is True and report["edge"] == json.loads(json.dumps(section))
    tflite, onnx_entry, failed, junk = section["artifacts"]
    assert failed == {"variant": "int8", "format": "tflite", "path": "int8.tflite", "error": "not exported: calibration failed"}
    assert junk["error"].startswith(f"{run / 'exports' / 'junk.tflite'}: ai_edge_litert cannot load this model")
    for entry in (tflite, onnx_entry):
        assert entry["latency"][0]["threads"] == 1 and entry["images"]["count"] == len(art["paths"])
        assert entry["model"]["labels"] == str(run / "labels.txt")
    keras_acc = np.mean([CLASSES.index(p.split("/")[0]) == int(np.argmax(k)) for p, k in zip(art["paths"], art["keras"])])
    assert tflite["accuracy"] == onnx_entry["accuracy"] == pytest.approx(keras_acc)
    table = format_sweep(section)
    assert "not exported: calibration failed" in table and "onnx" in table


def test_sweep_without_validation_writes_its_own_report(art, tmp_path):
    run = tmp_path / "run"
    (run / "exports").mkdir(parents=True)
    (run / "exports" / "manifest.json").write_text(
        json.dumps({"artifacts": [{"variant": "qat", "format": "onnx", "path": "qat.onnx", "error": "boom"}]}))
    section = bench_run_dir(run)
    assert not (run / "validation" / "report.json").exists()
    assert read_json(run / "validation" / "edge_report.json") == {"edge": json.loads(json.dumps(section))}
    with pytest.raises(BenchFailed, match="export the run first"):
        bench_run_dir(tmp_path / "not-a-run")


def test_bench_decodes_images_as_the_run_recipe_says(tmp_path):
    import yaml
    from conftest import tiny_recipe_dict

    from edgetl.cli import _recipe_resize

    run = tmp_path / "run"
    (run / "exports").mkdir(parents=True)
    raw = tiny_recipe_dict(tmp_path, data={"resize": "center_crop"})
    (run / "recipe.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    assert _recipe_resize(run) == "center_crop"
    assert _recipe_resize(run / "exports" / "tflite-int8.tflite") == "center_crop"
    assert _recipe_resize(tmp_path / "loose.tflite") == "plain"

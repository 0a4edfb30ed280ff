"""OpenVINO as the third edge runtime: the same artifacts as LiteRT/ONNX Runtime, the same answers, and
`--runtime openvino` through edgetl-bench, `edgetl bench` and the zipapp runner."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from edge_support import NUMPY_PILLOW, make_venv, tiny_model, to_onnx, to_tflite, write_images

from edgetl.edge import bench
from edgetl.edge.runtime import RUNTIMES, ModelError, RuntimeMissingError, open_model, resolve_runtime
from edgetl.edge.zipapp import build_runner
from edgetl.errors import EdgetlError
from edgetl.io import read_json

FAST = ["--threads", "1", "--runs", "2", "--warmup", "0"]
# Both sides run fp32 arithmetic (openvino_config pins f32), so they differ only in kernel summation order:
# ~1e-7 here, and 1e-5 leaves room for other CPUs' kernels. A bf16 run (OpenVINO's default on AMX CPUs)
# is off by ~3e-4 on this model, so this tolerance also checks that the pin holds.
FP32_ATOL = 1e-5
MISSING = "OpenVINO is not installed: pip install openvino (or edgetl[openvino])"


@pytest.fixture(scope="module")
def ov_art(tmp_path_factory):
    """Tiny single- and two-head models as fp32/uint8/int8 TFLite and ONNX, plus a few raw test images."""
    root = tmp_path_factory.mktemp("openvino")
    model = tiny_model()
    multi = tiny_model(heads=(("species", 3), ("color", 2)))
    pixels = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    return {
        "root": root, "pixels": pixels, "images": write_images(root / "images"),
        "fp32": to_tflite(model, root / "fp32.tflite"),
        "u8": to_tflite(model, root / "u8.tflite", "uint8"),
        "i8": to_tflite(model, root / "i8.tflite", "int8"),
        "onnx": to_onnx(model, root / "model.onnx"),
        "multi_tflite": to_tflite(multi, root / "multi.tflite"),
        "multi_onnx": to_onnx(multi, root / "multi.onnx"),
    }


@pytest.mark.parametrize("name", ["fp32", "onnx", "multi_tflite", "multi_onnx"])
def test_float_models_agree_with_litert_and_onnxruntime(ov_art, name):
    reference = open_model(ov_art[name], threads=1)
    runner = open_model(ov_art[name], threads=1, runtime="openvino")
    assert (runner.runtime_name, runner.kind, runner.xnnpack) == ("openvino", ov_art[name].suffix[1:], None)
    assert runner.describe()["runtime"] == "openvino" and runner.describe()["runtime_version"][:4].isdigit()
    assert (runner.input_shape, runner.input_dtype) == ((32, 32, 3), "float32")
    assert runner.output_names == reference.output_names  # signature names for TFLite, not OpenVINO's tensor names
    expected, got = reference.predict_all(ov_art["pixels"]), runner.predict_all(ov_art["pixels"])
    for head in expected:
        assert got[head].dtype == np.float32
        np.testing.assert_array_equal(got[head].argmax(axis=1), expected[head].argmax(axis=1))
        np.testing.assert_allclose(got[head], expected[head], atol=FP32_ATOL)
    # Batch 5 then batch 1: the dynamic batch is reshaped and recompiled both ways.
    np.testing.assert_allclose(runner.predict(ov_art["pixels"][:1]), expected[reference.output_names[0]][:1], atol=FP32_ATOL)


@pytest.mark.parametrize("name", ["u8", "i8"])
def test_integer_tflite_agrees_with_litert(ov_art, name):
    reference = open_model(ov_art[name], threads=1)
    runner = open_model(ov_art[name], threads=1, runtime="openvino")
    assert runner.input_dtype == reference.input_dtype == ("uint8" if name == "u8" else "int8")
    expected, got = reference.predict(ov_art["pixels"]), runner.predict(ov_art["pixels"])
    np.testing.assert_array_equal(got.argmax(axis=1), expected.argmax(axis=1))
    # Both dequantize the same integer softmax (scale 1/256); integer kernels may round one step apart.
    np.testing.assert_allclose(got, expected, atol=1 / 256 + 1e-6)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=0.02)  # really dequantized, not raw integers


def test_channels_first_fixed_batch_onnx(tmp_path):
    """An NCHW model with batch fixed at 1: OpenVINO transposes NHWC pixels itself and predicts N images one by one."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["x"], ["pooled"]), helper.make_node("Flatten", ["pooled"], ["flat"]),
         helper.make_node("Softmax", ["flat"], ["probs"], axis=1)],
        "nchw", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 6])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, 3])])
    path = tmp_path / "nchw.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    pixels = np.random.default_rng(1).integers(0, 8, (3, 8, 6, 3), dtype=np.uint8)  # small: softmax not saturated
    expected = np.exp(pixels.astype(np.float64).mean(axis=(1, 2)))
    expected /= expected.sum(axis=1, keepdims=True)
    runner = open_model(path, runtime="openvino")
    assert runner.input_shape == (8, 6, 3)
    np.testing.assert_allclose(runner.predict(pixels), expected, atol=1e-5)
    np.testing.assert_allclose(open_model(path).predict(pixels[:1]), expected[:1], atol=1e-5)  # ORT reads it alike
    assert runner.time_invoke(batch=1, runs=2, warmup=0).batch == 1
    with pytest.raises(ValueError, match="fixed batch size of 1; time it with batch=1"):
        runner.time_invoke(batch=2, runs=1)


def test_time_invoke_at_batch_n(ov_art):
    stats = open_model(ov_art["onnx"], threads=1, runtime="openvino").time_invoke(batch=3, runs=4, warmup=1)
    assert (stats.runs, stats.batch) == (4, 3) and 0 < stats.p50_ms <= stats.p99_ms


def test_runtime_choice_must_read_the_file(ov_art):
    assert resolve_runtime(ov_art["fp32"]) == "litert" and resolve_runtime(ov_art["onnx"]) == "onnxruntime"
    assert resolve_runtime(ov_art["onnx"], "openvino") == "openvino"
    with pytest.raises(ModelError, match="litert does not run .onnx files; use --runtime onnxruntime or openvino"):
        open_model(ov_art["onnx"], runtime="litert")
    with pytest.raises(ModelError, match="onnxruntime does not run .tflite files; use --runtime litert or openvino"):
        open_model(ov_art["fp32"], runtime="onnxruntime")
    with pytest.raises(ModelError, match="unknown runtime 'tvm'"):
        open_model(ov_art["fp32"], runtime="tvm")
    (ov_art["root"] / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelError, match="junk.onnx: openvino cannot load this model"):
        open_model(ov_art["root"] / "junk.onnx", runtime="openvino")


def test_missing_openvino_is_a_one_line_pip_install_error(ov_art, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "openvino", None)  # makes `import openvino` raise ImportError
    with pytest.raises(RuntimeMissingError) as caught:
        open_model(ov_art["onnx"], runtime="openvino")
    assert str(caught.value) == MISSING and isinstance(caught.value, EdgetlError)
    assert bench.main([str(ov_art["onnx"]), "--runtime", "openvino", *FAST]) == bench.EXIT_ENVIRONMENT
    assert capsys.readouterr().err == f"edgetl-bench: error: {MISSING}\n"
    assert open_model(ov_art["onnx"]).runtime_name == "onnxruntime"  # the other runtimes still work


def test_bench_runtime_openvino(ov_art, tmp_path):
    out, reference = tmp_path / "ov.json", tmp_path / "litert.json"
    args = [str(ov_art["fp32"]), "--images", str(ov_art["images"]), "--threads", "1,2", "--runs", "2", "--warmup", "1"]
    assert bench.main([*args, "--runtime", "openvino", "--xnnpack", "both", "--json", str(out)]) == 0
    assert bench.main([*args, "--json", str(reference)]) == 0
    doc, litert = read_json(out), read_json(reference)
    assert (doc["model"]["runtime"], doc["device"]["runtime"], doc["settings"]["runtime"]) == ("openvino",) * 3
    assert [(r["threads"], r["xnnpack"]) for r in doc["latency"]] == [(1, None), (2, None)]  # XNNPACK is LiteRT's
    assert [p["top1"] for p in doc["predictions"]] == [p["top1"] for p in litert["predictions"]]
    assert doc["accuracy"] == litert["accuracy"] and doc["images"]["count"] == 9


def test_edgetl_bench_cli_forwards_runtime(ov_art, tmp_path):
    from click.testing import CliRunner

    from edgetl.cli import bench as bench_command
    from edgetl.cli import cli

    option = next(p for p in bench_command.params if p.name == "runtime")
    assert tuple(option.type.choices) == RUNTIMES
    out = tmp_path / "cli.json"
    result = CliRunner().invoke(cli, ["bench", str(ov_art["onnx"]), "--runtime", "openvino", *FAST, "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "openvino" in result.output and read_json(out)["model"]["runtime"] == "openvino"


def test_zipapp_runner_with_only_openvino(ov_art, tmp_path):
    python = make_venv(tmp_path / "venv", NUMPY_PILLOW + ("openvino",))
    runner = build_runner(tmp_path / "runner.pyz")

    def run(name, *extra):
        return subprocess.run([str(python), str(runner), str(ov_art[name]), *FAST, *extra],
                              capture_output=True, text=True, timeout=120, cwd=tmp_path)

    out = tmp_path / "zip.json"
    result = run("fp32", "--runtime", "openvino", "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert read_json(out)["model"]["runtime"] == "openvino"
    assert read_json(out)["model"]["outputs"] == ["StatefulPartitionedCall:0"]  # no TFLite schema: tensor names
    # Without ai-edge-litert the integer scales of a .tflite cannot be read: say what to install.
    result = run("i8", "--runtime", "openvino")
    assert result.returncode == bench.EXIT_ENVIRONMENT
    assert result.stderr.strip() == (
        "edgetl-bench: error: i8.tflite: reading the input/output quantization of an integer .tflite for OpenVINO "
        "needs the TFLite schema: pip install ai-edge-litert")
    assert run("onnx").returncode == bench.EXIT_ENVIRONMENT  # auto still means ONNX Runtime, absent here

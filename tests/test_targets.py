"""export.target: which CPU family the int8 artifacts are for, and the ONNX int8 types it picks."""
from __future__ import annotations

import shutil
import typing

import numpy as np
import pytest


def test_detect_reads_the_architecture_and_the_vnni_flags():
    from edgetl.export.targets import detect

    assert detect("aarch64", set())[0] == "arm64"
    assert detect("x86_64", {"avx2", "fma", "avx512_vnni"}) == ("x86_avx512_vnni", "auto: avx512_vnni in the CPU flags")
    assert detect("x86_64", {"avx2", "avx_vnni"})[0] == "x86_avx512_vnni"
    assert detect("x86_64", {"avx2", "fma", "avx512f"}) == ("x86_avx2", "auto: no VNNI in the CPU flags")


def test_recipe_targets_are_the_table_rows():
    from edgetl.export.targets import NAMES, TARGETS, resolve
    from edgetl.recipe import ExportConfig

    hints = typing.get_type_hints(ExportConfig)
    assert typing.get_args(hints["target"]) == NAMES
    assert resolve("x86_avx2") == (TARGETS[0], "export.target") and TARGETS[0].reduce_range
    assert resolve("auto")[1].startswith("auto: ")


@pytest.mark.parametrize("target, activations, weights", [("arm64", "int8", "int8"), ("x86_avx2", "uint8", "int8")])
def test_onnx_int8_graph_holds_the_targets_types(tiny_export, tmp_path, target, activations, weights):
    """The QDQ graph's activation and weight types are the target row's, and the manifest says so."""
    import onnx
    import onnxruntime as ort
    import yaml

    from edgetl.export import export_run

    run = tmp_path / "run"
    shutil.copytree(tiny_export.run_dir, run, ignore=shutil.ignore_patterns("exports"))
    raw = yaml.safe_load((run / "recipe.yaml").read_text())
    raw.setdefault("export", {})["target"] = target
    (run / "recipe.yaml").write_text(yaml.safe_dump(raw))
    (entry,) = export_run(run, tflite=[], onnx=["int8"], echo=lambda _: None).manifest["artifacts"]
    assert entry["status"] == "ok", entry["error"]
    graph = onnx.load(str(run / "exports" / entry["path"])).graph
    dtypes = {init.name: onnx.helper.tensor_dtype_to_np_dtype(init.data_type).name for init in graph.initializer}
    quantized = {dtypes[node.input[2]] for node in graph.node if node.op_type == "QuantizeLinear"}
    dequantized = {node.output[0]: node.input[0] for node in graph.node if node.op_type == "DequantizeLinear"}
    kernels = {dtypes[dequantized[node.input[1]]] for node in graph.node if node.op_type in ("Conv", "Gemm", "MatMul")}
    q = entry["quantization"]
    assert quantized == {q["activation_type"]} == {activations} and kernels == {q["weight_type"]} == {weights}
    assert q["target"]["name"] == target and q["target"]["chosen_by"] == "export.target"
    assert q["reduce_range"] == (target == "x86_avx2")
    session = ort.InferenceSession(str(run / "exports" / entry["path"]), providers=["CPUExecutionProvider"])
    assert np.isfinite(session.run(None, {"image": np.zeros((2, *session.get_inputs()[0].shape[1:]), np.float32)})[0]).all()

"""Triton model repositories from a run's ONNX exports, checked by parsing config.pbtxt with Triton's own protobuf."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from edge_support import CLASSES, tiny_model, to_onnx

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
from google.protobuf import text_format  # noqa: E402

from edgetl.edge.serve.models import INPUT_NAME, parse_targets  # noqa: E402
from edgetl.triton import RepositoryError, write_model_repository  # noqa: E402

COLORS = ("dark", "light")


def fake_run(root: Path, heads=(("probs", 3),), head_labels=None) -> Path:
    """A run directory holding what `edgetl export` writes for an ONNX artifact (and a TFLite entry Triton skips)."""
    exports = root / "exports"
    exports.mkdir(parents=True)
    to_onnx(tiny_model(heads), exports / "onnx-fp32.onnx")
    (exports / "tflite-int8.tflite").write_bytes(b"not for triton")
    (exports / "labels.txt").write_text("\n".join(CLASSES) + "\n")
    manifest = {"labels": "labels.txt", "artifacts": [
        {"name": "tflite-int8", "format": "tflite", "status": "ok", "path": "tflite-int8.tflite"},
        {"name": "onnx-int8", "format": "onnx", "status": "failed", "path": None},
        {"name": "onnx-fp32", "format": "onnx", "status": "ok", "path": "onnx-fp32.onnx"}]}
    for head, (file_name, names) in (head_labels or {}).items():
        (exports / file_name).write_text("\n".join(names) + "\n")
        manifest.setdefault("head_labels", {})[head] = file_name
    (exports / "manifest.json").write_text(json.dumps(manifest))
    return root


def parse_config(path: Path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_repository_of_a_run_parses_as_triton_model_config(tmp_path):
    run = fake_run(tmp_path / "run")
    (model,) = write_model_repository(run, tmp_path / "repo")
    folder = tmp_path / "repo" / "onnx-fp32"
    assert model.name == "onnx-fp32" and model.config_path == folder / "config.pbtxt"
    assert (folder / "1" / "model.onnx").read_bytes() == (run / "exports" / "onnx-fp32.onnx").read_bytes()
    assert (folder / "labels.txt").read_text().split() == list(CLASSES)
    assert sorted(p.name for p in folder.iterdir()) == ["1", "config.pbtxt", "labels.txt"]

    config = parse_config(folder / "config.pbtxt")
    assert config.name == "onnx-fp32" and config.platform == "onnxruntime_onnx" and config.max_batch_size == 8
    (tensor,) = config.input
    assert tensor.name == INPUT_NAME and tensor.data_type == model_config_pb2.TYPE_FP32 and list(tensor.dims) == [32, 32, 3]
    (out,) = config.output
    assert out.name == "probs" and out.data_type == model_config_pb2.TYPE_FP32 and list(out.dims) == [3]
    assert out.label_filename == "labels.txt"
    assert config.HasField("dynamic_batching")
    assert [(g.count, g.kind) for g in config.instance_group] == [(1, model_config_pb2.ModelInstanceGroup.KIND_CPU)]
    # edgetl serve serves the same artifacts under the same model names
    assert [s.name for s in parse_targets([str(run)]) if s.path.suffix == ".onnx"] == [model.name]


def test_multi_head_outputs_get_their_own_label_files(tmp_path):
    run = fake_run(tmp_path / "run", heads=(("species", 3), ("color", 2)),
                   head_labels={"species": ("labels_species.txt", CLASSES), "color": ("labels_color.txt", COLORS)})
    (model,) = write_model_repository(run, tmp_path / "repo")
    config = parse_config(model.config_path)
    assert {o.name: (list(o.dims), o.label_filename) for o in config.output} == {
        "species": ([3], "labels_species.txt"), "color": ([2], "labels_color.txt")}
    assert (model.config_path.parent / "labels_color.txt").read_text().split() == list(COLORS)


def test_a_run_without_onnx_is_refused(tmp_path):
    exports = tmp_path / "run" / "exports"
    exports.mkdir(parents=True)
    (exports / "manifest.json").write_text(json.dumps({"artifacts": [
        {"name": "tflite-fp32", "format": "tflite", "status": "ok", "path": "tflite-fp32.tflite"}]}))
    with pytest.raises(RepositoryError, match="no ONNX artifact"):
        write_model_repository(tmp_path / "run", tmp_path / "repo")
    with pytest.raises(RepositoryError, match="export the run first"):
        write_model_repository(tmp_path / "elsewhere", tmp_path / "repo")


def test_export_model_repository_option_writes_after_the_export(tmp_path, monkeypatch):
    import edgetl.export
    from edgetl.cli import cli

    run = fake_run(tmp_path / "run")
    calls = []
    monkeypatch.setattr(edgetl.export, "export_run", lambda run_dir, **kw: calls.append(run_dir) or SimpleNamespace(failed=[]))
    result = CliRunner().invoke(cli, ["export", str(run), "--model-repository", str(tmp_path / "repo")])
    assert result.exit_code == 0, result.output
    assert calls == [run] and "Triton model onnx-fp32" in result.output
    assert parse_config(tmp_path / "repo" / "onnx-fp32" / "config.pbtxt").name == "onnx-fp32"

"""Triton model repository from a run's ONNX exports: `<repo>/<model>/config.pbtxt`, `1/model.onnx`, label files.

Triton's ONNX Runtime backend serves the repository as written, under the names `edgetl serve` gives the same
artifacts (the file stem, e.g. `onnx-fp32`) and with the file's own input and output names, so a tritonclient
program written against `edgetl serve` runs unchanged against Triton; `label_filename` gives Triton's
classification extension the class names. Every file is written atomically, config.pbtxt last, so a Triton
polling the repository never sees a config whose model file is missing.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

from edgetl.errors import EdgetlError
from edgetl.io import RunPaths, atomic_write_bytes, atomic_write_text, read_json

PLATFORM = "onnxruntime_onnx"
MODEL_FILE = "model.onnx"
VERSION = "1"
MAX_BATCH_SIZE = 8
# ONNX TensorProto element types -> Triton model_config DataType names.
TRITON_TYPES = {1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 4: "TYPE_UINT16", 5: "TYPE_INT16", 6: "TYPE_INT32",
                7: "TYPE_INT64", 9: "TYPE_BOOL", 10: "TYPE_FP16", 11: "TYPE_FP64", 12: "TYPE_UINT32", 13: "TYPE_UINT64"}


class RepositoryError(EdgetlError, ValueError):
    """A run that has nothing Triton can serve, or an ONNX tensor type Triton has no name for."""


@dataclass(frozen=True)
class Tensor:
    """One model input or output: name, Triton data type, shape (-1 = any size), and its label file if any."""

    name: str
    data_type: str
    shape: tuple
    label_filename: Optional[str] = None


@dataclass(frozen=True)
class TritonModel:
    """One model written into the repository."""

    name: str
    config_path: Path
    model_path: Path
    max_batch_size: int
    inputs: tuple
    outputs: tuple


def write_model_repository(run_dir, out_dir, max_batch_size: int = MAX_BATCH_SIZE) -> List[TritonModel]:
    """Write every ONNX artifact the run's exports/manifest.json lists as ok into the repository `out_dir`.

    A model with a dynamic batch dimension gets `max_batch_size` and dynamic batching; a fixed-batch one gets
    max_batch_size 0 and its full shape. Raises RepositoryError when the run has no ONNX artifact.
    """
    run = RunPaths(run_dir)
    manifest_path = run.exports_dir / "manifest.json"
    if not manifest_path.is_file():
        raise RepositoryError(f"{manifest_path} is missing: export the run first "
                              f"(`edgetl export {run.path} --formats onnx:fp32`)")
    manifest = read_json(manifest_path)
    artifacts = [a for a in manifest.get("artifacts", [])
                 if a.get("format") == "onnx" and a.get("status") == "ok" and a.get("path")]
    if not artifacts:
        raise RepositoryError(f"{run.path}: no ONNX artifact in exports/ for Triton's ONNX Runtime backend; "
                              f"export one with `edgetl export {run.path} --formats onnx:fp32`")
    label_files = {None: manifest.get("labels", "labels.txt"), **manifest.get("head_labels", {})}
    return [_write_model(run.exports_dir / a["path"], Path(out_dir), label_files, max_batch_size) for a in artifacts]


def _write_model(model_path: Path, repository: Path, label_files: dict, max_batch_size: int) -> TritonModel:
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    initializers = {init.name for init in graph.initializer}
    inputs = [_tensor(value) for value in graph.input if value.name not in initializers]
    outputs = [_tensor(value) for value in graph.output]
    batched = all(t.shape and t.shape[0] == -1 for t in inputs + outputs)
    batch = max_batch_size if batched else 0
    if batched:
        inputs = [Tensor(t.name, t.data_type, t.shape[1:]) for t in inputs]
        outputs = [Tensor(t.name, t.data_type, t.shape[1:]) for t in outputs]
    folder = repository / model_path.stem
    target = folder / VERSION / MODEL_FILE
    atomic_write_bytes(target, model_path.read_bytes())
    labelled = []
    for i, out in enumerate(outputs):
        name = label_files.get(out.name) or (label_files[None] if i == 0 else None)
        source = model_path.parent / name if name else None
        if source is not None and source.is_file():
            atomic_write_bytes(folder / name, source.read_bytes())
            out = Tensor(out.name, out.data_type, out.shape, name)
        labelled.append(out)
    config = folder / "config.pbtxt"
    atomic_write_text(config, model_config(model_path.stem, batch, inputs, labelled))
    return TritonModel(model_path.stem, config, target, batch, tuple(inputs), tuple(labelled))


def _tensor(value) -> Tensor:
    """An ONNX graph input/output as a Tensor; symbolic or unknown dimensions become -1."""
    tensor_type = value.type.tensor_type
    if tensor_type.elem_type not in TRITON_TYPES:
        raise RepositoryError(f"tensor {value.name!r}: ONNX element type {tensor_type.elem_type} has no Triton data type")
    shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim)
    return Tensor(value.name, TRITON_TYPES[tensor_type.elem_type], shape)


def model_config(name: str, max_batch_size: int, inputs: Sequence[Tensor], outputs: Sequence[Tensor]) -> str:
    """The config.pbtxt text (protobuf text format of Triton's ModelConfig)."""
    lines = [f"name: {_quote(name)}", f"platform: {_quote(PLATFORM)}", f"max_batch_size: {max_batch_size}"]
    for field, tensors in (("input", inputs), ("output", outputs)):
        lines.append(f"{field} [")
        for i, t in enumerate(tensors):
            lines += ["  {", f"    name: {_quote(t.name)}", f"    data_type: {t.data_type}",
                      f"    dims: [ {', '.join(str(d) for d in t.shape)} ]"]
            if t.label_filename:
                lines.append(f"    label_filename: {_quote(t.label_filename)}")
            lines.append("  }" + ("," if i < len(tensors) - 1 else ""))
        lines.append("]")
    if max_batch_size:
        lines.append("dynamic_batching { }")
    lines += ["instance_group [", "  {", "    count: 1", "    kind: KIND_CPU", "  }", "]"]
    return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


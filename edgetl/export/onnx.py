"""ONNX variants: a tf2onnx graph of the Keras model, fp32 / QAT builders, static int8 quantization, an ORT check.

Every artifact takes raw RGB 0..255 NHWC float input `image` with a dynamic batch, and carries its labels in
metadata_props (`labels`, and `heads` {head: class names} for a multi-task run).
"""
from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from pathlib import Path

import numpy as np

from edgetl.edge.runtime import ONNX_DTYPES
from edgetl.export.conversion import Built, Conversion
from edgetl.variants import NotSupported

INPUT_NAME = "image"


def fp32_graph(model, inputs, directory: Path):
    """tf2onnx from the Keras model: input `image` (N, S, S, 3) float32 with a dynamic batch (a ModelProto)."""
    import tensorflow as tf
    import tf2onnx

    spec = (tf.TensorSpec((None, inputs.size, inputs.size, 3), tf.float32, name=INPUT_NAME),)
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=inputs.recipe.export.opset)
    return proto


def build_fp32(job: Conversion) -> Built:
    """The tf2onnx graph as it is."""
    return _finish(job, _copy(job.graph), {"scheme": job.variant.scheme})


def int8_options(job: Conversion) -> dict:
    """The recipe's export.int8 calibration method and per-channel switch, and the types and reduce_range of its
    export.target, as quantize_pre_processed takes them."""
    from edgetl.export.targets import resolve

    int8 = job.inputs.recipe.export.int8
    target, how = resolve(job.inputs.recipe.export.target)
    return {"method": int8.calibration, "per_channel": int8.per_channel, "activation_type": target.activation_type,
            "weight_type": target.weight_type, "reduce_range": target.reduce_range,
            "target": {"name": target.name, "chosen_by": how, "why": target.why}}


def finish_int8(job: Conversion, data: bytes, settings: dict, **extra) -> Built:
    """A quantized graph's Built: its settings and calibration count in the manifest's quantization."""
    import onnx
    import onnxruntime

    quantization = {"scheme": job.variant.scheme, **settings, "calibration_samples": len(job.calibration), **extra}
    return _finish(job, onnx.load_from_string(data), quantization,
                   f" + onnxruntime.quantization {onnxruntime.__version__}")


def build_from_fake_quant(job: Conversion) -> Built:
    """The QAT model's tf2onnx graph; NotSupported unless its weights reach the convolutions as int8."""
    proto = _copy(job.graph)
    _require_int8_weights(proto)
    return _finish(job, proto, {"scheme": job.variant.scheme, **job.source.settings})


def _copy(proto):
    """A copy of a shared ModelProto, so setting one artifact's metadata leaves the others' graph alone."""
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(proto)
    return out


def _finish(job: Conversion, proto, quantization: dict, converter_note: str = "") -> Built:
    """Labels in metadata_props; the artifact's bytes and manifest facts."""
    import tf2onnx

    _set_metadata(proto, job)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), job.inputs.recipe.export.opset)
    converter = f"tf2onnx {tf2onnx.__version__}, opset {opset}{converter_note}"
    return Built(proto.SerializeToString(), quantization, converter, job.source.layers_left_float)


class _Calibration:
    """onnxruntime CalibrationDataReader over the shared calibration images, in batches of 4.

    `set_range` (with `CalibStridedMinMax`) lets quantize_static calibrate one batch at a time: it keeps
    every intermediate tensor of the batches it collects, about 2.5 GB for 200 MobileNetV2 images at 224 px.
    """

    def __init__(self, images: np.ndarray, batch: int = 4):
        self._all = [images[i:i + batch] for i in range(0, len(images), batch)]
        self._batches = iter(self._all)

    def __len__(self) -> int:
        return len(self._all)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._batches = iter(self._all[start_index:end_index])

    def get_next(self):
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch}


def pre_process(src: Path, out: Path) -> None:
    """ORT's quant_pre_process. Symbolic shape inference (needs sympy) only matters for dynamic shapes inside
    the graph; a CNN has none."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(src), str(out), skip_symbolic_shape=True)


def quantize_pre_processed(pre: Path, calibration: np.ndarray, method: str = "minmax", per_channel: bool = True,
                           activation_type: str = "uint8", weight_type: str = "int8", reduce_range: bool = False,
                           nodes_to_exclude: tuple[str, ...] = (), int16_weights: tuple[str, ...] = (),
                           target: dict | None = None) -> tuple[bytes, dict]:
    """ORT's recommended flow: static QDQ with (per-channel) 8-bit weights, `method` calibration
    (minmax | entropy | percentile); `nodes_to_exclude` (node names of `pre`) stay float, and the weights of the
    `int16_weights` nodes are quantized to int16 (the model moves to opset 21, whose QDQ ops take 16-bit types).

    The types ("uint8" / "int8") and reduce_range come from the export target (edgetl.export.targets).
    Returns (the quantized model, the settings passed, as the manifest records them: types by their numpy name,
    and `target`, the row they came from).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    calibrate_method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                        "percentile": CalibrationMethod.Percentile}[method]
    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    options = dict(per_channel=per_channel, activation_type=types[activation_type], weight_type=types[weight_type],
                   reduce_range=reduce_range, calibrate_method=calibrate_method)
    # Strided calibration (one batch at a time) is MinMax's; the histogram methods merge batches themselves.
    extra = {"CalibStridedMinMax": 1} if method == "minmax" else {}
    if int16_weights:
        extra["TensorQuantOverrides"] = _int16_weight_overrides(pre, int16_weights, per_channel)
    with tempfile.TemporaryDirectory(prefix="edgetl-onnx-q-") as tmp, _opset_warning_hidden():
        out = Path(tmp, "int8.onnx")
        quantize_static(str(pre), str(out), _Calibration(calibration), quant_format=QuantFormat.QDQ,
                        nodes_to_exclude=list(nodes_to_exclude), extra_options=extra, **options)
        data = out.read_bytes()
    return data, {"per_channel": options["per_channel"],
                  "activation_type": _type_name(options["activation_type"]),
                  "weight_type": _type_name(options["weight_type"]),
                  "reduce_range": reduce_range,
                  "calibrate_method": options["calibrate_method"].name,
                  "nodes_to_exclude": list(nodes_to_exclude), "int16_weights": list(int16_weights),
                  **({"target": target} if target else {})}


class _OpsetWarning(logging.Filter):
    """Drops onnxruntime's root-logger warning that a 16-bit build moves the model to opset 21 (expected: the
    manifest records the opset)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "16-bit integer quantization" not in record.getMessage()


@contextlib.contextmanager
def _opset_warning_hidden():
    root, hide = logging.getLogger(), _OpsetWarning()
    root.addFilter(hide)
    try:
        yield
    finally:
        root.removeFilter(hide)


def _int16_weight_overrides(pre: Path, nodes: tuple[str, ...], per_channel: bool) -> dict:
    """TensorQuantOverrides giving the weight initializer of each named Conv/MatMul/Gemm node int16 (per channel on
    its output-channel axis when `per_channel`); a name that is no weighted node of `pre` is a ValueError."""
    import onnx
    from onnxruntime.quantization import QuantType

    graph = onnx.load(str(pre), load_external_data=False).graph
    weights = {init.name for init in graph.initializer}
    found = {}
    for node in graph.node:
        if node.name in nodes and node.op_type in ("Conv", "MatMul", "Gemm") and node.input[1] in weights:
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            axis = 0 if node.op_type == "Conv" or trans_b else 1  # Conv: OIHW; MatMul/Gemm: K x N unless transB
            found[node.name] = (node.input[1], {"quant_type": QuantType.QInt16, **({"axis": axis} if per_channel else {})})
    missing = sorted(set(nodes) - set(found))
    if missing:
        raise ValueError(f"no Conv/MatMul/Gemm with an initializer weight named {missing} in {pre.name}")
    return {weight: [override] for weight, override in found.values()}


def _type_name(quant_type) -> str:
    """An onnxruntime QuantType as the numpy name of the tensor type it produces ("uint8", "int8", ...)."""
    import onnx

    return onnx.helper.tensor_dtype_to_np_dtype(quant_type.tensor_type).name


def _require_int8_weights(proto) -> None:
    """NotSupported unless some weight reaches a Conv/MatMul through DequantizeLinear (a real int8 model)."""
    dequantized = {out for node in proto.graph.node if node.op_type == "DequantizeLinear" for out in node.output
                   if node.input[0] in {init.name for init in proto.graph.initializer}}
    weighted = [node for node in proto.graph.node if node.op_type in ("Conv", "MatMul", "Gemm")]
    if not any(len(node.input) > 1 and node.input[1] in dequantized for node in weighted):
        raise NotSupported("tf2onnx has no converter for the QAT model's per-channel weight fake-quantization "
                           "(FakeQuantWithMinMaxVarsPerChannel) and folds it into float weights, so the ONNX "
                           "graph would hold float weights with activation QDQ only, not an int8 model; use "
                           "onnx int8 (static QDQ) or tflite qat_int8")


def _set_metadata(proto, job: Conversion) -> None:
    from edgetl import __version__

    inputs, name = job.inputs, f"{job.inputs.recipe.name} {job.variant.key}"
    proto.producer_name, proto.producer_version = "edgetl", __version__
    proto.doc_string = f"{name}: raw RGB 0-255 NHWC float input '{INPUT_NAME}'"
    meta = {"labels": json.dumps(inputs.labels), "name": name, "version": inputs.run.path.name,
            "input_mean": "0", "input_std": "1"}
    if inputs.head_labels:
        meta["heads"] = json.dumps(inputs.head_labels)
    del proto.metadata_props[:]
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)


def inspect(data: bytes, sample: np.ndarray) -> dict:
    """onnx.checker, then an onnxruntime session run on a batch of two (checks the dynamic batch)."""
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(onnx.load_from_string(data), full_check=True)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    inputs = session.get_inputs()
    if len(inputs) != 1 or inputs[0].name != INPUT_NAME:
        raise RuntimeError(f"expected one input named {INPUT_NAME!r}, found {[i.name for i in inputs]}")
    results = session.run(None, {INPUT_NAME: np.concatenate([sample, sample]).astype(np.float32)})
    if any(r.shape[0] != 2 or not np.all(np.isfinite(r)) for r in results):
        raise RuntimeError("the model did not return finite outputs for a batch of two")
    return {"input": _tensor(inputs[0]), "outputs": [_tensor(o) for o in session.get_outputs()]}


def _tensor(arg) -> dict:
    return {"name": arg.name, "dtype": ONNX_DTYPES.get(arg.type, arg.type),
            "shape": [d if isinstance(d, int) else None for d in arg.shape], "scale": None, "zero_point": None}

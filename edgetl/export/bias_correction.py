"""Bias correction for int8 weights: each int8 layer's bias takes back the mean error its rounded weights add.

Rounding a layer's weights to int8 moves its output by (q(W) - W) . x. Over the calibration images the mean of that
move is a constant per output channel, which the layer's bias takes back at no cost in size or latency, as OpenVINO
NNCF's post-training quantization does by default. `mean_shifts` measures the move per layer on the float model:
the weights rounded as the converters round them (symmetric, per output channel or per tensor, 127 levels a side,
64 with onnxruntime's reduce_range, after folding the BatchNorm that follows a conv, since that is what they
quantize), the layer run linear with the rounding error as its kernel on its float input (exact at borders and
padding). `correct_tflite` and `correct_onnx` then subtract it from the int32 bias of every layer of a converted
artifact whose weights are int8, in the bias's own scale: a layer the repair left float or gave int16 weights keeps
its own bias.

Measured on flowers5 run 4 (MobileNetV2, 128 calibration images), distance to the float Keras model on the 40
validation and 360 training images: tflite-int8 mean total variation 0.045 / 0.025 -> 0.020 / 0.015, validation
top-1 flips 2 -> 1; onnx-int8 0.045 / 0.025 -> 0.021 / 0.016, flips 2 -> 0. Depthwise convolutions are not
corrected: with the correction applied to the Keras model before conversion (an earlier form of this module), also
correcting them left both artifacts further from the float model (TFLite 0.020 / 0.018 against 0.017 / 0.015,
ONNX 0.022 / 0.020 against 0.021 / 0.016), likely because a 3x3 channel's mean error comes mostly from positions its
ReLU6 clips. The per-layer report (edgetl.export.quant_debug) measures the rounding before the correction.
"""
from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from edgetl.export.conversion import Conversion


def weight_levels(fmt: str, target: str) -> int:
    """Integer levels a side of the int8 weights `fmt`'s converter stores for export.target `target`: 64 where
    onnxruntime reduces the range (x86 without VNNI), else 127."""
    from edgetl.export.targets import resolve

    return 64 if fmt == "onnx" and resolve(target)[0].reduce_range else 127


def round_weights(weights: np.ndarray, levels: int, per_channel: bool) -> np.ndarray:
    """`weights` rounded to symmetric integers in [-levels, levels] times a scale (one per last-axis channel when
    `per_channel`), back in float: what an int8 converter stores, dequantized."""
    axes = tuple(range(weights.ndim - 1)) if per_channel else None
    peak = np.max(np.abs(weights), axis=axes, keepdims=per_channel)
    scale = np.where(peak > 0, peak / levels, 1.0)
    return np.clip(np.round(weights / scale), -levels, levels) * scale


def mean_shifts(model, images: np.ndarray, levels: int, per_channel: bool,
                batch: int = 8) -> tuple[dict[str, np.ndarray], dict]:
    """({layer name: mean output move per channel of its int8-rounded weights on `images`}, report) for every Conv2D
    and Dense of `model` (nested models included) with a bias or a BatchNorm after it; `model` is not changed."""
    import tf_keras as keras

    from edgetl.export.optimize import flatten_model

    t0 = time.perf_counter()
    flat = flatten_model(model)  # every layer's input reachable from the model's input
    targets = [(layer, _batchnorm_after(layer)) for layer in flat.layers
               if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense))]  # not DepthwiseConv2D: see the module
    targets = [(layer, bn) for layer, bn in targets if bn is not None or layer.use_bias]
    errors = []
    for layer, bn in targets:
        folded = layer.get_weights()[0] * (_bn_scale(bn) if bn is not None else 1.0)
        errors.append(round_weights(folded, levels, per_channel) - folded)
    moves = _mean_moves(flat, [layer for layer, _ in targets], errors, images, batch)
    shifts = {layer.name: move for (layer, _), move in zip(targets, moves)}
    report = {"layers": len(shifts), "images": int(len(images)), "levels": levels, "per_channel": per_channel,
              "mean_abs_shift": round(float(np.mean([np.abs(m).mean() for m in moves])), 6) if moves else 0.0,
              "seconds": round(time.perf_counter() - t0, 2)}
    return shifts, report


def _batchnorm_after(layer):
    """The BatchNormalization (last axis) that alone reads `layer`'s output, else None."""
    import tf_keras as keras

    nodes = layer._outbound_nodes
    if len(nodes) != 1 or not isinstance(nodes[0].outbound_layer, keras.layers.BatchNormalization):
        return None
    bn = nodes[0].outbound_layer
    return bn if list(bn.axis) in ([-1], [len(layer.output_shape) - 1]) else None


def _bn_scale(bn) -> np.ndarray:
    """What the converters fold into the conv's kernel: gamma / sqrt(moving variance + epsilon)."""
    gamma = bn.gamma.numpy() if bn.scale else 1.0
    return np.asarray(gamma / np.sqrt(bn.moving_variance.numpy() + bn.epsilon), np.float32)


def _mean_moves(flat, layers: list, errors: list[np.ndarray], images: np.ndarray, batch: int) -> list[np.ndarray]:
    """Per layer, the mean per output channel, over the images and every position, of its output with its kernel's
    rounding error as the kernel (run linear and without bias on its float input)."""
    import tf_keras as keras

    probe = keras.Model(flat.inputs, [layer.input for layer in layers])
    twins = []
    for layer, error in zip(layers, errors):
        twin = layer.__class__.from_config({**layer.get_config(), "name": f"{layer.name}_error", "use_bias": False,
                                            "activation": "linear"})
        twin.build(layer.input_shape)
        twin.set_weights([error])
        twins.append(twin)
    sums = [np.zeros(layer.output_shape[-1], np.float64) for layer in layers]
    rows = [0] * len(layers)
    for start in range(0, len(images), batch):
        inputs = probe(images[start:start + batch], training=False)
        for i, (twin, x) in enumerate(zip(twins, inputs if isinstance(inputs, list) else [inputs])):
            moved = np.asarray(twin(x), np.float64).reshape(-1, len(sums[i]))
            sums[i] += moved.sum(axis=0)
            rows[i] += len(moved)
    return [total / count for total, count in zip(sums, rows)]


def layer_named(name: str, shifts: dict) -> str | None:
    """The one corrected layer a converter's tensor or node name refers to (names are scope/layer/op paths, fused
    ones joined by ';'), else None."""
    found = {part for part in re.split(r"[/;:]", name) if part in shifts}
    return found.pop() if len(found) == 1 else None


def correct_tflite(data: bytes, shifts: dict[str, np.ndarray]) -> tuple[bytes, list[str]]:
    """`data` with the int32 bias of every CONV_2D / FULLY_CONNECTED whose weights are int8 lowered by its layer's
    shift (edited in place in the flatbuffer: same size, same layout); and the layers corrected, in graph order."""
    from ai_edge_litert import schema_py_generated as schema

    raw = bytearray(data)
    model = schema.Model.GetRootAs(raw, 0)
    codes = [max(model.OperatorCodes(i).BuiltinCode(), model.OperatorCodes(i).DeprecatedBuiltinCode())
             for i in range(model.OperatorCodesLength())]
    kinds = (schema.BuiltinOperator.CONV_2D, schema.BuiltinOperator.FULLY_CONNECTED)
    corrected = []
    for g in range(model.SubgraphsLength()):
        graph = model.Subgraphs(g)
        for o in range(graph.OperatorsLength()):
            op = graph.Operators(o)
            if codes[op.OpcodeIndex()] not in kinds or op.InputsLength() < 3 or op.Inputs(2) < 0:
                continue
            weights, bias = graph.Tensors(op.Inputs(1)), graph.Tensors(op.Inputs(2))
            if weights.Type() != schema.TensorType.INT8 or bias.Type() != schema.TensorType.INT32:
                continue
            layer = layer_named(f"{weights.Name().decode()};{bias.Name().decode()}", shifts)
            values = model.Buffers(bias.Buffer()).DataAsNumpy()
            if layer is None or not isinstance(values, np.ndarray):
                continue
            values = values.view(np.int32)  # a view into `raw`
            values -= np.round(shifts[layer] / bias.Quantization().ScaleAsNumpy()).astype(np.int32)
            corrected.append(layer)
    return bytes(raw), corrected


def correct_onnx(data: bytes, shifts: dict[str, np.ndarray]) -> tuple[bytes, list[str]]:
    """QDQ `data` with the int32 bias of every Conv / Gemm whose weights are int8 lowered by its layer's shift; and the
    layers corrected, in graph order."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load_from_string(data)
    initializers = {tensor.name: tensor for tensor in proto.graph.initializer}
    producers = {output: node for node in proto.graph.node for output in node.output}
    corrected = []
    for node in proto.graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3:
            continue
        weights, bias = producers.get(node.input[1]), producers.get(node.input[2])
        if not (weights and bias and weights.op_type == bias.op_type == "DequantizeLinear"):
            continue
        kernel, values, scale = (initializers.get(name) for name in (weights.input[0], *bias.input[:2]))
        layer = layer_named(node.name, shifts)
        if (layer is None or kernel is None or values is None or scale is None
                or kernel.data_type != onnx.TensorProto.INT8 or values.data_type != onnx.TensorProto.INT32):
            continue
        moved = numpy_helper.to_array(values) - np.round(shifts[layer] / numpy_helper.to_array(scale)).astype(np.int32)
        values.CopyFrom(numpy_helper.from_array(moved, values.name))
        corrected.append(layer)
    return proto.SerializeToString(), corrected


def corrected(data: bytes, job: Conversion) -> tuple[bytes, dict]:
    """An int8 artifact of `job` with its biases corrected, and its manifest record ({"bias_correction": {"layers"
    corrected, "of" measured, "images"}}); as it is, with {}, when the job carries no shifts
    (export.int8.bias_correction off, or a row without the column)."""
    if job.bias_shifts is None:
        return data, {}
    correct = correct_tflite if job.variant.format == "tflite" else correct_onnx
    data, layers = correct(data, job.bias_shifts)
    return data, {"bias_correction": {"layers": len(layers), "of": len(job.bias_shifts), "images": len(job.calibration)}}

"""TFLite variants: a SavedModel of the Keras model, one converter setting per builder, metadata, a LiteRT check.

Every builder converts a SavedModel that `saved_model` wrote once for its model (the trained one, or a QAT or
pruned one), names a multi-task model's outputs after its heads and adds TFLite Model Metadata (labels, input
normalization) with `edgetl.export.metadata`.

Integer inputs take the camera bytes (`edgetl.edge.runtime.image_input`). Where the model's baked-in
preprocessing is one per-tensor affine (`input_affine`: MobileNet's x / 127.5 - 1), the full-integer variants
with integer io convert the network without it, calibrated on the same images put through the affine: the
input's quantization then carries it (uint8 scale 1/127.5, zero point 127, as in Google's reference
MobileNetV2), so the model reads the raw byte as already preprocessed and has no MUL/ADD ops on its input.
The zero point is an integer, so the byte is read as (byte - 127) / 127.5: half a pixel level above x/127.5 - 1.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable

import numpy as np

from edgetl.edge.runtime import image_input
from edgetl.export.conversion import Built, Conversion
from edgetl.export.metadata import add_metadata, name_outputs

PREPROCESS = "preprocess"  # the layer edgetl.backbones bakes in front of every backbone


@dataclass(frozen=True)
class Affine:
    """A per-tensor preprocessing x * scale + offset, which an integer input's quantization can carry."""

    scale: float
    offset: float

    def apply(self, images: np.ndarray) -> np.ndarray:
        return (images * np.float32(self.scale) + np.float32(self.offset)).astype(np.float32)

    @property
    def normalization(self) -> tuple[float, float]:
        """(mean, std) such that (pixel - mean) / std = pixel * scale + offset, as TFLite metadata states it."""
        return -self.offset / self.scale, 1.0 / self.scale

    def record(self) -> dict:
        """The manifest's quantization.input_affine."""
        return {"scale": self.scale, "offset": self.offset, "mean": self.normalization[0],
                "std": self.normalization[1]}


def input_affine(model) -> Affine | None:
    """The model's `preprocess` layer as one per-tensor affine, or None (no such layer, or not one affine:
    per-channel, a channel swap, or the raw input also read elsewhere).

    A Rescaling with scalar scale and offset qualifies, and a Normalization whose mean and variance are the same
    for every channel.
    """
    import tf_keras as keras

    if _preprocessed(model) is None:
        return None
    layer = model.get_layer(PREPROCESS)
    if isinstance(layer, keras.layers.Rescaling):
        scale, offset = np.unique(layer.scale), np.unique(layer.offset)
        if scale.size == offset.size == 1:
            return Affine(float(scale[0]), float(offset[0]))
    if isinstance(layer, keras.layers.Normalization):
        mean, variance = np.unique(np.asarray(layer.mean)), np.unique(np.asarray(layer.variance))
        if mean.size == variance.size == 1:
            std = max(float(np.sqrt(variance[0])), keras.backend.epsilon())
            return Affine(1.0 / std, -float(mean[0]) / std)
    return None


def _preprocessed(model):
    """The output of `model`'s `preprocess` layer when it is the only reader of the model's one input, else None.

    Looked up by node: QAT and pruning copies share the layer with the flat model, so it has several outputs.
    """
    if len(model.inputs) != 1 or PREPROCESS not in [layer.name for layer in model.layers]:
        return None
    layer, source = model.get_layer(PREPROCESS), model.inputs[0]
    readers = {node.outbound_layer for node in model.layers[0].outbound_nodes if node.outbound_layer in model.layers}
    nodes = [i for i in range(len(layer.inbound_nodes)) if layer.get_input_at(i) is source]
    return layer.get_output_at(nodes[0]) if nodes and readers == {layer} else None


class SavedModels:
    """The converter inputs of one Keras model: `path`, its SavedModel (raw pixels in), and where its
    preprocessing is one affine (`affine`), `body`: a SavedModel of the network after it (written on first use)."""

    def __init__(self, model, directory: Path):
        self._model, self._directory = model, Path(directory)
        self.affine = input_affine(model)
        self.path = _save(model, self._directory / "raw", model.input_names[0])

    @cached_property
    def body(self) -> str:
        import tf_keras as keras

        # Named as the model, so layer (tensor) names, which reports and denylists use, do not depend on the process.
        body = keras.Model(_preprocessed(self._model), self._model.outputs, name=self._model.name)
        return _save(body, self._directory / "body", self._model.input_names[0])


def saved_model(model, inputs, directory: Path) -> SavedModels:
    """The SavedModels every TFLite variant of `model` converts (the variants table's converter input)."""
    return SavedModels(model, directory)


def _save(model, directory: Path, input_name: str) -> str:
    """Save `model` as a SavedModel whose one signature names tensors as Keras does (`input_name`, output layers).

    Converting from a SavedModel takes ~6 s where `from_keras_model` re-traces and re-saves the model on every
    call (~35 s for MobileNetV2); the signature keeps the names the metadata writer and runners rely on.
    """
    import tensorflow as tf

    spec = tf.TensorSpec([None, *model.inputs[0].shape[1:]], tf.float32, name=input_name)

    @tf.function(input_signature=[spec])
    def serve(images):
        outputs = model(images, training=False)
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        return dict(zip(model.output_names, outputs))

    # A bare module tracking only the variables: saving the Keras model itself would trace every layer.
    module = tf.Module()
    module.variables_to_save = list(model.variables)
    tf.saved_model.save(module, str(directory), signatures={"serving_default": serve})
    return str(directory)


def carried_affine(job: Conversion, integer_input: bool) -> Affine | None:
    """The affine that the input quantization of `job`'s artifact carries: its model's, for a calibrated variant
    with an integer input; None when the preprocessing stays in the graph as ops."""
    return job.graph.affine if integer_input and job.variant.calibrate else None


def full_integer_input(job: Conversion) -> tuple[str, np.ndarray, Affine | None]:
    """(SavedModel, calibration images, carried affine) of a full-integer variant with input type `export.io`:
    the network after an affine preprocessing and the images put through it, or the whole model and raw pixels."""
    affine = carried_affine(job, job.inputs.recipe.export.io != "float")
    if affine is None:
        return job.graph.path, job.calibration, None
    return job.graph.body, affine.apply(job.calibration), affine


def build_fp32(job: Conversion) -> Built:
    """float32 weights and activations, as trained."""
    return _convert(job, lambda converter, tf: {})


def build_fp16(job: Conversion) -> Built:
    """float16 weights (half the size); runtimes without float16 kernels compute in float32."""

    def configure(converter, tf) -> dict:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
        return {}

    return _convert(job, configure)


def build_dynamic(job: Conversion) -> Built:
    """int8 weights, float activations (quantized on the fly): no calibration needed."""

    def configure(converter, tf) -> dict:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        return {}

    return _convert(job, configure)


def build_full_integer(job: Conversion) -> Built:
    """int8 weights and activations calibrated on `job.calibration`; input/output type `export.io` (an integer
    input carries an affine preprocessing in its quantization: `full_integer_input`)."""
    io = job.inputs.recipe.export.io
    graph, images, affine = full_integer_input(job)

    def configure(converter, tf) -> dict:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([images[i:i + 1]] for i in range(len(images)))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        io_type = {"float": tf.float32, "int8": tf.int8, "uint8": tf.uint8}[io]
        converter.inference_input_type = converter.inference_output_type = io_type
        return {"calibration_samples": len(images), "io": io, **affine_record(affine)}

    return _convert(job, configure, graph)


def build_int16x8(job: Conversion) -> Built:
    """int16 activations, int8 weights (TFLite's 16x8 mode), calibrated on `job.calibration`; float input/output.

    65,536 activation levels instead of 256: a range stretched by outliers still resolves typical values, at
    twice int8's activation memory.
    """
    images = job.calibration

    def configure(converter, tf) -> dict:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([images[i:i + 1]] for i in range(len(images)))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
        return {"calibration_samples": len(images), "io": "float", "activations": "int16", "weights": "int8"}

    return _convert(job, configure)


def affine_record(affine: Affine | None) -> dict:
    """The manifest quantization's `input_affine` entry when the input quantization carries `affine`, else {}."""
    return {} if affine is None else {"input_affine": affine.record()}


def _convert(job: Conversion, configure: Callable, graph: str | None = None) -> Built:
    """Convert SavedModel `graph` (default: the job's raw-pixel one) with the converter set up by
    `configure(converter, tf)` (returns quantization details)."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(graph or job.graph.path)
    quantization = {"scheme": job.variant.scheme, **job.source.settings, **configure(converter, tf)}
    data, notes = finish(job, converter.convert())
    return Built(data, quantization, f"tf.lite.TFLiteConverter (tensorflow {tf.__version__})",
                 job.source.layers_left_float, job.source.sparsity, notes)


def finish(job: Conversion, data: bytes) -> tuple[bytes, list[str]]:
    """A converted model's outputs named after the heads (multi-task) and its metadata; (bytes, warnings)."""
    if job.inputs.head_labels:
        data = name_outputs(data, list(job.inputs.head_labels))
    return _with_metadata(data, job)


def _with_metadata(data: bytes, job: Conversion) -> tuple[bytes, list[str]]:
    """Labels, input normalization, name, description and version.

    The normalization says what the input tensor holds: raw 0..255 pixels (mean 0, std 1), or for an integer
    input carrying the preprocessing in its quantization, the pixels as preprocessed (MobileNet: mean 127.5,
    std 127.5, as in Google's reference models); an app feeds camera bytes to an integer input either way.
    """
    inputs, recipe = job.inputs, job.inputs.recipe
    affine = carried_affine(job, _integer_input(data))
    mean, std = affine.normalization if affine else (0.0, 1.0)
    classes = ", ".join(f"{head}: {len(names)}" for head, names in inputs.head_labels.items()) or str(len(inputs.labels))
    carried = f" (its quantization applies the preprocessing (x - {mean:g}) / {std:g})" if affine else ""
    description = recipe.description or (f"{recipe.model.backbone} image classifier ({classes} classes), "
                                         f"raw RGB 0-255 input{carried}, exported by edgetl")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = add_metadata(data, labels=inputs.head_labels or inputs.labels, name=f"{recipe.name} {job.variant.key}",
                            description=description, version=inputs.run.path.name, input_mean=(mean,), input_std=(std,))
    return data, [str(w.message) for w in caught]


def _integer_input(data: bytes) -> bool:
    """Whether a converted model's (one) input tensor is integer."""
    from ai_edge_litert import schema_py_generated as schema

    graph = schema.Model.GetRootAs(data, 0).Subgraphs(0)
    return graph.Tensors(int(graph.Inputs(0))).Type() in (schema.TensorType.UINT8, schema.TensorType.INT8)


def inspect(data: bytes, sample: np.ndarray) -> dict:
    """Load with LiteRT, run `sample` (raw pixels, one image); tensor details of input and outputs."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=data)
    interpreter.allocate_tensors()
    inputs, outputs = interpreter.get_input_details(), interpreter.get_output_details()
    if len(inputs) != 1:
        raise RuntimeError(f"expected one input tensor, found {len(inputs)}")
    detail = inputs[0]
    interpreter.set_tensor(detail["index"], image_input(sample, np.dtype(detail["dtype"]).name))
    interpreter.invoke()
    for out in outputs:
        if not np.all(np.isfinite(interpreter.get_tensor(out["index"]).astype(np.float64))):
            raise RuntimeError(f"output {out['name']} is not finite")
    return {"input": _tensor(detail), "outputs": [_tensor(d) for d in outputs]}


def _tensor(detail: dict) -> dict:
    scale, zero_point = detail["quantization"]
    quantized = np.dtype(detail["dtype"]).kind in "iu" and scale != 0
    signature = detail.get("shape_signature", detail["shape"])
    return {"name": detail["name"], "dtype": np.dtype(detail["dtype"]).name,
            "shape": [None if d < 0 else int(d) for d in signature],
            "scale": float(scale) if quantized else None, "zero_point": int(zero_point) if quantized else None}

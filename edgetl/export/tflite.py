"""TFLite variants: a SavedModel of the Keras model, one converter setting per builder, metadata, a LiteRT check.

Every builder converts the SavedModel that `saved_model` wrote once for its model (the trained one, or a QAT or
pruned one), names a multi-task model's outputs after its heads and adds TFLite Model Metadata (labels, raw
0..255 pixel normalization) with `edgetl.export.metadata`.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from edgetl.edge.runtime import quantize
from edgetl.export.conversion import Built, Conversion
from edgetl.export.metadata import add_metadata, name_outputs


def saved_model(model, inputs, directory: Path) -> str:
    """Save `model` as a SavedModel whose one signature names tensors as Keras does (input and output layers).

    Converting from a SavedModel takes ~6 s where `from_keras_model` re-traces and re-saves the model on every
    call (~35 s for MobileNetV2); the signature keeps the names the metadata writer and runners rely on.
    """
    import tensorflow as tf

    spec = tf.TensorSpec([None, *model.inputs[0].shape[1:]], tf.float32, name=model.input_names[0])

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
    """int8 weights and activations calibrated on `job.calibration`; input/output type `export.io`."""
    io = job.inputs.recipe.export.io
    images = job.calibration

    def configure(converter, tf) -> dict:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([images[i:i + 1]] for i in range(len(images)))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        io_type = {"float": tf.float32, "int8": tf.int8, "uint8": tf.uint8}[io]
        converter.inference_input_type = converter.inference_output_type = io_type
        return {"calibration_samples": len(images), "io": io}

    return _convert(job, configure)


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


def _convert(job: Conversion, configure: Callable) -> Built:
    """Convert `job.graph` with the converter set up by `configure(converter, tf)` (returns quantization details)."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(job.graph)
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
    """Labels, normalization (raw 0..255 pixels: mean 0, std 1), name, description and version."""
    inputs, recipe = job.inputs, job.inputs.recipe
    classes = ", ".join(f"{head}: {len(names)}" for head, names in inputs.head_labels.items()) or str(len(inputs.labels))
    description = recipe.description or (f"{recipe.model.backbone} image classifier ({classes} classes), "
                                         f"raw RGB 0-255 input, exported by edgetl")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = add_metadata(data, labels=inputs.head_labels or inputs.labels, name=f"{recipe.name} {job.variant.key}",
                            description=description, version=inputs.run.path.name, input_mean=(0.0,), input_std=(1.0,))
    return data, [str(w.message) for w in caught]


def inspect(data: bytes, sample: np.ndarray) -> dict:
    """Load with LiteRT, run `sample` (raw pixels, one image); tensor details of input and outputs."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=data)
    interpreter.allocate_tensors()
    inputs, outputs = interpreter.get_input_details(), interpreter.get_output_details()
    if len(inputs) != 1:
        raise RuntimeError(f"expected one input tensor, found {len(inputs)}")
    detail = inputs[0]
    interpreter.set_tensor(detail["index"], quantize(sample, np.dtype(detail["dtype"]).name, *detail["quantization"]))
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

"""Export a trained run to TFLite and ONNX artifacts, each checked by loading and running it, plus a manifest.

`export_run(RUN_DIR)` writes `RUN_DIR/exports/`: one file per variant (`tflite-int8.tflite`,
`onnx-fp32.onnx`, ...), `labels.txt` and `manifest.json`. Every file is written to a temp name and
renamed only after it converted, loaded and ran; a failed variant leaves no file, is recorded with its
error, and the others still export. The manifest is rewritten after every artifact, so an interrupted
export leaves a manifest that matches the files on disk (earlier entries of other artifacts are kept).

Variants. TFLite: fp32; fp16 (float16 weights); dynamic (int8 weights, float activations); int8 (full
integer, calibrated on `export.representative_samples` training images, input/output type `export.io`);
qat_int8 (flattened model, quantizer ranges calibrated on the same images, quantization-aware
fine-tune, then full integer; see `edgetl.optimize`); pruned_int8 (magnitude pruning to
`export.pruning.target_sparsity`, spread over layers by `allocation` and fine-tuned by distillation from
the float model (`edgetl.optimize.distill`), then post-training full integer: TFLite's int8 weights are
symmetric with zero point 0, so pruned zeros stay exactly zero and the sparsity survives without a second,
prune-preserving QAT fine-tune). ONNX (tf2onnx, opset `export.opset`, input `image`, dynamic batch):
fp32; int8 (onnxruntime static QDQ quantization after quant_pre_process, per-channel 8-bit weights, 8-bit
activations, MinMax-calibrated on the same images; unsigned 8-bit for both, see `quantize_onnx_static`);
qat_int8 (the QAT model through tf2onnx; recorded as not_supported while tf2onnx folds the per-channel
weight fake-quant into float weights).

Flattened, QAT and pruned Keras models are intermediate: they live in memory only (rebuilt from
model.keras and the recipe in minutes), so exports/ holds only what ships.

Integer inputs take camera bytes: the calibration set pins the input range to 0..255, so a uint8 input
has scale 1 and zero point 0 (int8: zero point -128) and the baked-in preprocessing does the rest.

Multi-task runs (recipe `model.heads`): every artifact has one output per head, in head order and named
after the head (TFLite: output tensor and signature names; ONNX: graph output names); TFLite metadata
carries a labels_<head>.txt per output, ONNX metadata_props a `heads` JSON {head: class names}.
qat_int8 and pruned_int8 are not_supported for them (their fine-tune trains one output).

manifest.json schema (keys are stable):
  created             ISO time (UTC) of the last write
  run                 the run directory
  recipe_fingerprint  Recipe.fingerprint() of the run's recipe
  versions            {library: version} of every converter and runtime involved
  labels              "labels.txt" (one class name per line, index order; a multi-task run's primary head)
  head_labels         multi-task runs only: {head: "labels_<head>.txt"}, in output order
  preparation         shared steps: {"flatten": {...}, "qat": {...}, "pruning": {...}} when they ran
  artifacts           one entry per exported variant:
    name              "<format>-<variant>", e.g. "tflite-int8"
    format, variant   "tflite" | "onnx"; the variant name
    status            "ok" | "failed" | "not_supported"
    error             null, or why it failed / is not supported
    path              file name relative to exports/ (null unless ok)
    size_bytes, gzip_bytes, sha256    of the file (gzip level 9: the over-the-air size)
    input             {"name", "dtype", "shape" (null = dynamic), "scale", "zero_point"} (scale and
                      zero_point null for float tensors; integer value = round(pixel / scale + zero_point))
    outputs           list of the same for each output
    quantization      {"scheme", ...}: calibration samples, io type, per-channel, fine-tune settings
    converter         the converter that produced it, with its version
    layers_left_float layers that quantization-aware training left in float (qat variants), else []
    sparsity          pruned variants: {"target", "overall", "all_weights", "layers": {name: fraction}}
    warnings          messages from the converter or the metadata writer worth reading
    seconds           conversion + checks (shared fine-tuning is under "preparation")
"""
from __future__ import annotations

import gzip
import hashlib
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np

from edgetl.recipe import ONNX_VARIANTS, TFLITE_VARIANTS
from edgetl.io import atomic_write_bytes, atomic_write_json, read_json, write_labels
from edgetl.rundir import RunDir

FORMATS = {"tflite": TFLITE_VARIANTS, "onnx": ONNX_VARIANTS}
EXTENSIONS = {"tflite": ".tflite", "onnx": ".onnx"}
INPUT_NAME = "image"
FULL_INTEGER = ("int8", "qat_int8", "pruned_int8")


class ExportError(ValueError):
    """A request that cannot be exported (unknown variant, unfinished run); the message says how to fix it."""


class NotSupported(RuntimeError):
    """A converter cannot produce this variant for this model; recorded as status `not_supported`."""


@dataclass
class ExportResult:
    manifest: dict
    failed: list[str]
    exports_dir: Path


@dataclass
class Built:
    """One converted artifact in memory, before it is checked and written."""

    data: bytes
    quantization: dict
    converter: str
    layers_left_float: list[str] = field(default_factory=list)
    sparsity: dict | None = None
    warnings: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------
# Requests


def check_variants(tflite: list[str] | None, onnx: list[str] | None) -> tuple[list[str], list[str]]:
    """Deduplicated variant lists; ExportError naming the valid variants for any unknown one."""
    out = []
    for fmt, requested in (("tflite", tflite), ("onnx", onnx)):
        unknown = [v for v in requested or [] if v not in FORMATS[fmt]]
        if unknown:
            raise ExportError(f"unknown {fmt} variant(s) {', '.join(map(repr, unknown))}; valid {fmt} variants: "
                              f"{', '.join(FORMATS[fmt])} (recipe export.{fmt}, or --formats {fmt}:VARIANT)")
        out.append(list(dict.fromkeys(requested or [])))
    return out[0], out[1]


def parse_formats(specs: list[str]) -> tuple[list[str] | None, list[str] | None]:
    """`--formats` values -> (tflite, onnx) variant lists; None = the recipe's list for that format.

    Tokens (repeat the option or separate with commas): `FORMAT` (the recipe's variants of it),
    `FORMAT:VARIANT` or `FORMAT-VARIANT`; a bare variant continues the previous format, so
    `tflite:int8,fp16,onnx:fp32` works. Formats not named export nothing.
    """
    explicit: dict[str, list[str]] = {fmt: [] for fmt in FORMATS}
    bare, current = set(), None
    for token in ",".join(specs).replace(" ", "").split(","):
        if not token:
            continue
        fmt, sep, variant = token.partition(":") if ":" in token else token.partition("-")
        if fmt in FORMATS:
            current = fmt
            if sep:
                explicit[fmt].append(variant)
            else:
                bare.add(fmt)
        elif current is not None and not sep:
            explicit[current].append(token)
        else:
            raise ExportError(f"--formats {token!r}: unknown format; use tflite, onnx, FORMAT:VARIANT or "
                              f"FORMAT-VARIANT (e.g. tflite:int8,fp16 or onnx-fp32)")
    if not bare and not any(explicit.values()):
        raise ExportError("--formats: nothing selected; use tflite, onnx, FORMAT:VARIANT or FORMAT-VARIANT")
    picked = {fmt: explicit[fmt] or (None if fmt in bare else []) for fmt in FORMATS}
    return picked["tflite"], picked["onnx"]


# ---------------------------------------------------------------------------------------------------------
# Shared inputs: built once, used by every variant that needs them


class Sources:
    """The run's model, calibration images, fine-tuning data and prepared (flat/QAT/pruned) models."""

    def __init__(self, run: RunDir, echo: Callable[[str], None] = print):
        from edgetl.backbones import image_size_for

        run.require(run.recipe_path, run.labels_path, run.model_path)
        self.run, self.echo = run, echo
        self.recipe = run.load_recipe()
        self.labels = run.labels()
        self.head_labels = run.head_labels()  # {} unless multi-task
        self.size = image_size_for(self.recipe)
        self.preparation: dict = {}
        self.prep_seconds = 0.0  # time spent building shared inputs (outermost builds only)
        self._cache: dict = {}
        self._depth = 0
        self._workdir = tempfile.TemporaryDirectory(prefix="edgetl-export-")

    def __enter__(self) -> "Sources":
        return self

    def __exit__(self, *exc) -> None:
        self._workdir.cleanup()

    def saved_model(self, key: str, model) -> str:
        """`model` written once as a SavedModel (the converter's fastest input), shared by every variant of it."""
        return self._shared(f"saved_model:{key}", lambda: save_for_conversion(model, Path(self._workdir.name) / key))

    def _shared(self, key: str, build: Callable):
        """Build a shared input once; a failure is remembered and re-raised for every variant needing it."""
        if key not in self._cache:
            t0 = time.perf_counter()
            self._depth += 1
            try:
                self._cache[key] = (build(), None)
            except Exception as exc:  # noqa: BLE001 - recorded per variant by the caller
                self._cache[key] = (None, exc)
            finally:
                self._depth -= 1
            if self._depth == 0:
                self.prep_seconds += time.perf_counter() - t0
        value, error = self._cache[key]
        if error is not None:
            raise error
        return value

    def model(self):
        return self._shared("model", self.run.load_model)

    def splits(self):
        from edgetl.data import load_splits

        return self._shared("splits", lambda: load_splits(self.recipe))

    def calibration(self) -> np.ndarray:
        """float32 (N,S,S,3) training images: a seeded choice of `representative_samples`."""
        return self._shared("calibration", self._calibration)

    def _calibration(self) -> np.ndarray:
        from edgetl.data import load_arrays

        train = self.splits().train
        count = min(self.recipe.export.representative_samples, len(train))
        picks = np.sort(np.random.default_rng(self.recipe.seed).choice(len(train), count, replace=False))
        images, _ = load_arrays([train[i] for i in picks], self.size, self.recipe.data.resize)
        images = images.astype(np.float32)
        # One black and one white pixel pin the calibrated input range to the full byte range, so an
        # integer input is the camera byte itself (scale 1) and bright pixels never clip.
        images[0, 0, 0], images[0, 0, 1] = 0.0, 255.0
        return images

    def check_image(self) -> np.ndarray:
        """One (1,S,S,3) float32 image of seeded random pixels: runs every artifact once, needs no dataset."""
        pixels = np.random.default_rng(self.recipe.seed).integers(0, 256, (1, self.size, self.size, 3))
        return pixels.astype(np.float32)

    def finetune_data(self):
        """(train, val, steps per epoch): shuffled, augmented as in training; val None without a val split."""
        return self._shared("finetune_data", self._finetune_data)

    def _finetune_data(self):
        from edgetl.data import make_dataset

        splits, d = self.splits(), self.recipe.data
        batch_size = self.recipe.export.batch_size or d.batch_size
        common = dict(image_size=self.size, resize=d.resize, batch_size=batch_size, cache=d.cache)
        train = make_dataset(splits.train, shuffle=True, seed=self.recipe.seed, augment=self.recipe.augment, **common)
        val = make_dataset(splits.val, **common) if splits.val else None
        return train, val, -(-len(splits.train) // batch_size)

    def flat(self):
        """The model as one functional graph, outputs checked equal, BatchNorm frozen."""
        return self._shared("flat", self._flat)

    def _flat(self):
        from edgetl.optimize import check_same_outputs, flatten_model, freeze_batchnorm

        t0 = time.perf_counter()
        flat = flatten_model(self.model())
        diff = check_same_outputs(self.model(), flat, self.calibration()[:8])
        freeze_batchnorm(flat)
        self.preparation["flatten"] = {"layers": len(flat.layers), "max_abs_diff": diff,
                                       "seconds": round(time.perf_counter() - t0, 2)}
        return flat

    def qat(self):
        """The quantization-aware model after fine-tuning (QatModel)."""
        return self._shared("qat", self._qat)

    def _require_single_head(self, what: str) -> None:
        if self.head_labels:
            raise NotSupported(f"{what} is not supported for multi-head recipes (model.heads): its fine-tune "
                               f"trains one output; use int8 (post-training quantization)")

    def _qat(self):
        from edgetl.optimize import calibrate_quantizers, finetune, floor_weight_ranges, quantize_aware

        self._require_single_head("quantization-aware training")
        cfg = self.recipe.export.qat
        flat = self.flat()
        t0 = time.perf_counter()
        qat = quantize_aware(flat)
        ranges = calibrate_quantizers(qat.model, flat, self.calibration())
        train, val, _ = self.finetune_data()
        self.echo(f"quantization-aware training: {cfg.epochs} epochs at lr {cfg.learning_rate:g}; "
                  f"{len(qat.layers_left_float)} layers left float")
        history = finetune(qat.model, train, val, cfg.epochs, cfg.learning_rate)
        widened = floor_weight_ranges(qat.model)
        self.preparation["qat"] = {"epochs": cfg.epochs, "learning_rate": cfg.learning_rate,
                                   "layers_left_float": qat.layers_left_float, "calibrated_ranges": ranges,
                                   "widened_weight_channels": widened,
                                   "history": history,
                                   "seconds": round(time.perf_counter() - t0, 2)}
        return qat

    def pruned(self):
        """(stripped pruned model, sparsity report)."""
        return self._shared("pruned", self._pruned)

    def _pruned(self):
        import tensorflow_model_optimization as tfmot

        from edgetl.optimize import PruningPlan, distill, finetune, prune, sparsity_report, strip_pruning

        self._require_single_head("pruning")
        cfg = self.recipe.export.pruning
        flat = self.flat()
        t0 = time.perf_counter()
        train, val, steps = self.finetune_data()
        plan = PruningPlan.for_training(cfg.target_sparsity, steps, cfg.epochs)
        self.echo(f"pruning to {cfg.target_sparsity:.0%} sparsity ({cfg.allocation} allocation): {cfg.epochs} epochs "
                  f"at lr {cfg.learning_rate:g}{', distilled from the float model' if cfg.distill else ''} "
                  f"(target reached at step {plan.end_step})")
        model = prune(flat, plan, cfg.allocation)
        fit = partial(distill, teacher=flat) if cfg.distill else finetune
        history = fit(model, train_ds=train, val_ds=val, epochs=cfg.epochs, learning_rate=cfg.learning_rate,
                      callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])
        stripped = strip_pruning(model)
        report = sparsity_report(stripped, cfg.target_sparsity)
        self.preparation["pruning"] = {"target_sparsity": cfg.target_sparsity, "allocation": cfg.allocation,
                                       "distill": cfg.distill, "epochs": cfg.epochs,
                                       "learning_rate": cfg.learning_rate, "end_step": plan.end_step,
                                       "frequency": plan.frequency, "achieved": report["overall"],
                                       "history": history, "seconds": round(time.perf_counter() - t0, 2)}
        return stripped, report

    def onnx_fp32(self):
        """The fp32 ONNX ModelProto (also the input of ONNX int8)."""
        return self._shared("onnx_fp32", lambda: keras_to_onnx(self.model(), self.size, self.recipe.export.opset))


# ---------------------------------------------------------------------------------------------------------
# TFLite


def save_for_conversion(model, directory: Path) -> str:
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


def tflite_converter(saved_model: str, variant: str, calibration: np.ndarray | None = None, io: str = "float"):
    """A TFLiteConverter for a SavedModel set up for fp32, fp16, dynamic, or full-integer (`int8`) conversion."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model)
    if variant == "fp16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif variant == "dynamic":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    elif variant == "int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([calibration[i:i + 1]] for i in range(len(calibration)))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        io_type = {"float": tf.float32, "int8": tf.int8, "uint8": tf.uint8}[io]
        converter.inference_input_type = converter.inference_output_type = io_type
    elif variant != "fp32":
        raise ValueError(f"tflite_converter: unknown variant {variant!r}")
    return converter


_TFLITE_SCHEMES = {"fp32": "none", "fp16": "float16 weights", "dynamic": "dynamic range (int8 weights, float "
                   "activations)", "int8": "post-training full integer", "qat_int8": "quantization-aware training, "
                   "full integer", "pruned_int8": "magnitude pruning, then post-training full integer"}


def build_tflite(sources: Sources, variant: str) -> Built:
    """Convert one TFLite variant and add TFLite Model Metadata."""
    import tensorflow as tf

    cfg = sources.recipe.export
    quant: dict = {"scheme": _TFLITE_SCHEMES[variant]}
    left_float, sparsity = [], None
    key = "model"
    if variant in FULL_INTEGER:
        if variant == "qat_int8":
            qat = sources.qat()
            model, left_float, key = qat.model, qat.layers_left_float, "qat"
            quant.update(finetune_epochs=cfg.qat.epochs, learning_rate=cfg.qat.learning_rate)
        elif variant == "pruned_int8":
            (model, sparsity), key = sources.pruned(), "pruned"
            quant.update(target_sparsity=cfg.pruning.target_sparsity, finetune_epochs=cfg.pruning.epochs,
                         learning_rate=cfg.pruning.learning_rate)
        else:
            model = sources.model()
        calibration = sources.calibration()
        quant.update(calibration_samples=len(calibration), io=cfg.io)
        converter = tflite_converter(sources.saved_model(key, model), "int8", calibration, cfg.io)
    else:
        converter = tflite_converter(sources.saved_model(key, sources.model()), variant)
    data = converter.convert()
    if sources.head_labels:
        from edgetl.metadata import name_outputs

        data = name_outputs(data, list(sources.head_labels))
    data, notes = _with_metadata(data, sources, variant)
    return Built(data, quant, f"tf.lite.TFLiteConverter (tensorflow {tf.__version__})", left_float, sparsity, notes)


def _with_metadata(data: bytes, sources: Sources, variant: str) -> tuple[bytes, list[str]]:
    """Labels, normalization (raw 0..255 pixels: mean 0, std 1), name, description and version."""
    from edgetl.metadata import add_metadata

    recipe = sources.recipe
    classes = ", ".join(f"{head}: {len(names)}" for head, names in sources.head_labels.items()) \
        or str(len(sources.labels))
    description = recipe.description or (f"{recipe.model.backbone} image classifier ({classes} classes), "
                                         f"raw RGB 0-255 input, exported by edgetl")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = add_metadata(data, labels=sources.head_labels or sources.labels, name=f"{recipe.name} tflite-{variant}",
                            description=description, version=sources.run.path.name,
                            input_mean=(0.0,), input_std=(1.0,))
    return data, [str(w.message) for w in caught]


def inspect_tflite(data: bytes, sample: np.ndarray) -> dict:
    """Load with LiteRT, run `sample` (raw pixels, one image); tensor details of input and outputs."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=data)
    interpreter.allocate_tensors()
    inputs, outputs = interpreter.get_input_details(), interpreter.get_output_details()
    if len(inputs) != 1:
        raise RuntimeError(f"expected one input tensor, found {len(inputs)}")
    detail = inputs[0]
    interpreter.set_tensor(detail["index"], to_input_dtype(sample, detail["dtype"], *detail["quantization"]))
    interpreter.invoke()
    for out in outputs:
        if not np.all(np.isfinite(interpreter.get_tensor(out["index"]).astype(np.float64))):
            raise RuntimeError(f"output {out['name']} is not finite")
    return {"input": _tflite_tensor(detail), "outputs": [_tflite_tensor(d) for d in outputs]}


def to_input_dtype(pixels: np.ndarray, dtype, scale: float, zero_point: int) -> np.ndarray:
    """Raw 0..255 pixels into a model input: float as-is, integers as round(x / scale + zero_point)."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f" or not scale:
        return pixels.astype(dtype)
    info = np.iinfo(dtype)
    return np.clip(np.round(pixels / scale + zero_point), info.min, info.max).astype(dtype)


def _tflite_tensor(detail: dict) -> dict:
    scale, zero_point = detail["quantization"]
    quantized = np.dtype(detail["dtype"]).kind in "iu" and scale != 0
    signature = detail.get("shape_signature", detail["shape"])
    return {"name": detail["name"], "dtype": np.dtype(detail["dtype"]).name,
            "shape": [None if d < 0 else int(d) for d in signature],
            "scale": float(scale) if quantized else None, "zero_point": int(zero_point) if quantized else None}


# ---------------------------------------------------------------------------------------------------------
# ONNX


def keras_to_onnx(model, size: int, opset: int):
    """tf2onnx from the Keras model: input `image` (N, S, S, 3) float32 with a dynamic batch."""
    import tensorflow as tf
    import tf2onnx

    spec = (tf.TensorSpec((None, size, size, 3), tf.float32, name=INPUT_NAME),)
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=opset)
    return proto


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


def quantize_onnx_static(fp32, calibration: np.ndarray) -> bytes:
    """ORT's recommended flow: quant_pre_process, then static QDQ with per-channel 8-bit weights.

    U8U8 rather than S8S8: on x86 CPUs without VNNI, onnxruntime's signed kernels saturate intermediate sums
    (its docs' "saturation" note); measured on flowers5 MobileNetV2: S8S8 -4.0 pp top-1, U8U8 -0.5 pp.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="edgetl-onnx-") as tmp:
        src, pre, out = Path(tmp, "fp32.onnx"), Path(tmp, "pre.onnx"), Path(tmp, "int8.onnx")
        onnx.save(fp32, src)
        # Symbolic shape inference (needs sympy) only matters for dynamic shapes inside the graph; a CNN has none.
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(out), _Calibration(calibration), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QUInt8,
                        calibrate_method=CalibrationMethod.MinMax, extra_options={"CalibStridedMinMax": 1})
        return out.read_bytes()


def build_onnx(sources: Sources, variant: str) -> Built:
    """Convert one ONNX variant (ModelProto bytes with labels in metadata_props)."""
    import onnx
    import onnxruntime
    import tf2onnx

    opset = sources.recipe.export.opset
    converter = f"tf2onnx {tf2onnx.__version__}, opset {opset}"
    left_float: list[str] = []
    if variant == "fp32":
        proto, quant = sources.onnx_fp32(), {"scheme": "none"}
    elif variant == "int8":
        calibration = sources.calibration()
        proto = onnx.load_from_string(quantize_onnx_static(sources.onnx_fp32(), calibration))
        quant = {"scheme": "static QDQ", "per_channel": True, "activation_type": "int8", "weight_type": "int8",
                 "calibrate_method": "MinMax", "calibration_samples": len(calibration)}
        converter += f" + onnxruntime.quantization {onnxruntime.__version__}"
    else:  # qat_int8
        qat = sources.qat()
        proto, left_float = keras_to_onnx(qat.model, sources.size, opset), qat.layers_left_float
        _require_int8_weights(proto)
        quant = {"scheme": "quantization-aware training, QDQ from fake-quant ops"}
    _set_onnx_metadata(proto, sources, variant)
    return Built(proto.SerializeToString(), quant, converter, left_float)


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


def _set_onnx_metadata(proto, sources: Sources, variant: str) -> None:
    import json

    from edgetl import __version__

    proto.producer_name, proto.producer_version = "edgetl", __version__
    proto.doc_string = f"{sources.recipe.name} onnx-{variant}: raw RGB 0-255 NHWC float input '{INPUT_NAME}'"
    meta = {"labels": json.dumps(sources.labels), "name": f"{sources.recipe.name} onnx-{variant}",
            "version": sources.run.path.name, "input_mean": "0", "input_std": "1"}
    if sources.head_labels:
        meta["heads"] = json.dumps(sources.head_labels)
    del proto.metadata_props[:]
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)


def inspect_onnx(data: bytes, sample: np.ndarray) -> dict:
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
    return {"input": _onnx_tensor(inputs[0]), "outputs": [_onnx_tensor(o) for o in session.get_outputs()]}


_ONNX_TYPES = {"tensor(float)": "float32", "tensor(uint8)": "uint8", "tensor(int8)": "int8",
               "tensor(float16)": "float16"}


def _onnx_tensor(arg) -> dict:
    return {"name": arg.name, "dtype": _ONNX_TYPES.get(arg.type, arg.type),
            "shape": [d if isinstance(d, int) else None for d in arg.shape], "scale": None, "zero_point": None}


# ---------------------------------------------------------------------------------------------------------
# The export stage


_BUILDERS = {"tflite": (build_tflite, inspect_tflite), "onnx": (build_onnx, inspect_onnx)}


def export_run(run_dir, tflite: list[str] | None = None, onnx: list[str] | None = None,
               echo: Callable[[str], None] = print) -> ExportResult:
    """Export the requested variants (None = the recipe's `export` lists) into RUN_DIR/exports/."""
    run = RunDir(Path(run_dir))
    run.require(run.recipe_path, run.labels_path, run.model_path)
    recipe = run.load_recipe()
    tflite, onnx = check_variants(recipe.export.tflite if tflite is None else tflite,
                                  recipe.export.onnx if onnx is None else onnx)
    if not tflite and not onnx:
        raise ExportError(f"{run.recipe_path}: no variants to export; list them under export.tflite / export.onnx "
                          f"or pass --formats (e.g. --formats tflite:int8)")
    out_dir = run.exports_dir
    manifest = _start_manifest(run, recipe)
    failed = []
    with Sources(run, echo) as sources:
        head_files = write_labels(out_dir, sources.labels, sources.head_labels)
        if head_files:
            manifest["head_labels"] = head_files
        for fmt, variants in (("tflite", tflite), ("onnx", onnx)):
            for variant in variants:
                echo(f"exporting {fmt}-{variant} ...")
                entry = export_one(sources, fmt, variant)
                _put(manifest["artifacts"], entry)
                manifest["preparation"] = {**manifest.get("preparation", {}), **sources.preparation}
                manifest["created"] = _now()
                atomic_write_json(out_dir / "manifest.json", manifest)
                if entry["status"] == "failed":
                    failed.append(entry["name"])
    echo_summary(manifest, echo)
    return ExportResult(manifest, failed, out_dir)


def export_one(sources: Sources, fmt: str, variant: str) -> dict:
    """Build, check and atomically write one artifact; returns its manifest entry (never raises Exception)."""
    name = f"{fmt}-{variant}"
    target = sources.run.exports_dir / f"{name}{EXTENSIONS[fmt]}"
    build, inspect = _BUILDERS[fmt]
    entry = _entry(name, fmt, variant)
    t0, prep0 = time.perf_counter(), sources.prep_seconds
    try:
        built = build(sources, variant)
        entry.update(inspect(built.data, sources.check_image()))
        _check_output_names(entry["outputs"], list(sources.head_labels))
        atomic_write_bytes(target, built.data)
    except Exception as exc:  # noqa: BLE001 - one variant failing must not stop the others
        target.unlink(missing_ok=True)  # an older export of this variant would no longer match the manifest
        entry["status"] = "not_supported" if isinstance(exc, NotSupported) else "failed"
        entry["error"] = f"{type(exc).__name__}: {exc}"[:2000]
    else:
        entry.update(status="ok", path=target.name, size_bytes=len(built.data),
                     gzip_bytes=len(gzip.compress(built.data, compresslevel=9, mtime=0)),
                     sha256=hashlib.sha256(built.data).hexdigest(), quantization=built.quantization,
                     converter=built.converter, layers_left_float=built.layers_left_float,
                     sparsity=built.sparsity, warnings=built.warnings)
    entry["seconds"] = round(time.perf_counter() - t0 - (sources.prep_seconds - prep0), 2)
    return entry


def _check_output_names(outputs: list[dict], heads: list[str]) -> None:
    """A multi-task artifact must expose one output per head, named after it, in head order."""
    names = [o["name"] for o in outputs]
    if heads and names != heads:
        raise RuntimeError(f"the artifact's outputs are {names}; expected one per head, in order: {heads}")


def _entry(name: str, fmt: str, variant: str) -> dict:
    return {"name": name, "format": fmt, "variant": variant, "status": None, "error": None, "path": None,
            "size_bytes": None, "gzip_bytes": None, "sha256": None, "input": None, "outputs": [],
            "quantization": None, "converter": None, "layers_left_float": [], "sparsity": None, "warnings": [],
            "seconds": None}


def _start_manifest(run: RunDir, recipe) -> dict:
    """A new manifest keeping earlier entries whose file still exists (each is replaced when re-exported)."""
    path = run.exports_dir / "manifest.json"
    kept = []
    if path.exists():
        kept = [a for a in read_json(path).get("artifacts", [])
                if a.get("path") is None or (run.exports_dir / a["path"]).exists()]
    return {"created": _now(), "run": str(run.path), "recipe_fingerprint": recipe.fingerprint(),
            "versions": library_versions(), "labels": "labels.txt", "preparation": {}, "artifacts": kept}


def _put(artifacts: list[dict], entry: dict) -> None:
    """Replace the entry of the same name in place, or append."""
    names = [a.get("name") for a in artifacts]
    if entry["name"] in names:
        artifacts[names.index(entry["name"])] = entry
    else:
        artifacts.append(entry)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def library_versions() -> dict:
    """Versions of everything that converts or runs the artifacts."""
    from importlib.metadata import PackageNotFoundError, version

    from edgetl import __version__

    out = {"edgetl": __version__}
    for module, dist in (("tensorflow", ("tensorflow", "tensorflow-cpu")), ("tf_keras", ("tf-keras",)),
                         ("tfmot", ("tensorflow-model-optimization",)), ("tf2onnx", ("tf2onnx",)),
                         ("onnx", ("onnx",)), ("onnxruntime", ("onnxruntime",)),
                         ("ai_edge_litert", ("ai-edge-litert",)), ("numpy", ("numpy",))):
        out[module] = None
        for name in dist:
            try:
                out[module] = version(name)
                break
            except PackageNotFoundError:
                continue
    return out


def echo_summary(manifest: dict, echo: Callable[[str], None] = print) -> None:
    """One line per artifact: name, size, gzip size, status (and the error of a failed one)."""
    echo(f"{'artifact':<20} {'size KB':>9} {'gzip KB':>9}  status")
    for a in manifest["artifacts"]:
        size = f"{a['size_bytes'] / 1024:9.1f}" if a.get("size_bytes") else f"{'-':>9}"
        packed = f"{a['gzip_bytes'] / 1024:9.1f}" if a.get("gzip_bytes") else f"{'-':>9}"
        note = f"  {a['error']}" if a.get("error") else ""
        echo(f"{a['name']:<20} {size} {packed}  {a['status']}{note}")

"""The one table of export variants: what each artifact is, what it needs, how it is built and checked.

`VARIANTS` is read by the recipe check and `--formats` (the names), the export stage (preparation,
builder, inspector), the manifest (file name, quantization scheme) and validate (format, suffix).
Adding a variant means adding one row here and its builder in the format's module (tflite.py, onnx.py).
This module imports no TensorFlow and nothing of edgetl but its errors, so the recipe check can read
the table: builders, converter inputs and inspectors are named "module:function" (a module of
`edgetl.export`) and imported when a variant is built.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from edgetl.errors import EdgetlError

if TYPE_CHECKING:
    import numpy as np

# What a variant needs besides the trained model (`Variant.needs`).
CALIBRATION = "calibration data"  # export.representative_samples training images: full-integer ranges
FINETUNE = "a fine-tune"  # training data and minutes of fitting (export.qat, export.pruning)
FLAT = "a flat graph"  # the model rebuilt as one functional graph: tfmot refuses nested models


class ExportError(EdgetlError, ValueError):
    """A request that cannot be exported (unknown variant, nothing selected); the message says how to fix it."""


class NotSupported(EdgetlError, RuntimeError):
    """A converter cannot produce this variant for this model; recorded as status `not_supported`, with what to use."""


@dataclass(frozen=True)
class Variant:
    """One row of the table: one kind of artifact."""

    name: str  # as recipes and --formats spell it within its format, e.g. "int8"
    format: str  # "tflite" | "onnx": the recipe's export.<format> list it belongs to
    suffix: str  # the artifact's file suffix
    scheme: str  # the manifest's quantization.scheme
    build: str  # "module:function" (Conversion) -> Built
    graph: str  # "module:function" (Keras model, ExportInputs, work folder) -> the converter's input, shared
    #             by every row of the format that converts the same model (a SavedModel, an fp32 ONNX graph)
    inspect: str  # "module:function" (artifact bytes, check image) -> {"input", "outputs"} for the manifest
    calibrate: bool = False  # needs calibration images
    prepare: str | None = None  # the fine-tune of the flat graph whose result it converts ("qat", "pruning",
    #                             the manifest's preparation keys); None converts the trained model
    multi_head: bool = True  # False: not_supported for multi-task runs (its fine-tune trains one output)
    bias_correction: bool = False  # its builder corrects the biases of its int8 layers (export.int8.bias_correction)

    @property
    def key(self) -> str:
        """The artifact's name in the manifest and file name: "<format>-<variant>", e.g. "tflite-int8"."""
        return f"{self.format}-{self.name}"

    @property
    def filename(self) -> str:
        return self.key + self.suffix

    @property
    def needs(self) -> tuple[str, ...]:
        """What it needs besides the trained model, in words (CALIBRATION, FINETUNE, FLAT)."""
        needs = [CALIBRATION] if self.calibrate else []
        return tuple(needs + [FINETUNE, FLAT] if self.prepare else needs)

    def builder(self) -> Callable[..., Any]:  # (conversion.Conversion) -> conversion.Built
        return _resolve(self.build)

    def grapher(self) -> Callable:
        return _resolve(self.graph)

    def inspector(self) -> Callable[[bytes, np.ndarray], dict]:
        return _resolve(self.inspect)


_TFLITE = dict(format="tflite", suffix=".tflite", graph="tflite:saved_model", inspect="tflite:inspect")
_ONNX = dict(format="onnx", suffix=".onnx", graph="onnx:fp32_graph", inspect="onnx:inspect")

VARIANTS: tuple[Variant, ...] = (
    Variant("fp32", **_TFLITE, scheme="none", build="tflite:build_fp32"),
    Variant("fp16", **_TFLITE, scheme="float16 weights", build="tflite:build_fp16"),
    Variant("dynamic", **_TFLITE, scheme="dynamic range (int8 weights, float activations)",
            build="tflite:build_dynamic"),
    Variant("int8", **_TFLITE, scheme="post-training full integer", build="quant_debug:build_tflite",
            calibrate=True, bias_correction=True),
    Variant("qat_int8", **_TFLITE, scheme="quantization-aware training, full integer",
            build="tflite:build_full_integer", calibrate=True, prepare="qat", multi_head=False),
    Variant("pruned_int8", **_TFLITE, scheme="magnitude pruning, then post-training full integer",
            build="tflite:build_full_integer", calibrate=True, prepare="pruning", multi_head=False),
    Variant("int16x8", **_TFLITE, scheme="post-training 16x8 (int16 activations, int8 weights, float I/O)",
            build="tflite:build_int16x8", calibrate=True),
    Variant("int8_repaired", **_TFLITE, scheme="post-training full integer, most sensitive layers left float until "
            "export.int8.max_drop_pp holds", build="repair:build_tflite", calibrate=True, bias_correction=True),
    Variant("fp32", **_ONNX, scheme="none", build="onnx:build_fp32"),
    Variant("int8", **_ONNX, scheme="static QDQ", build="quant_debug:build_onnx", calibrate=True,
            bias_correction=True),
    Variant("int8_repaired", **_ONNX, scheme="static QDQ, most sensitive nodes' weights in int16 (or the nodes float: "
            "export.int8.onnx_repair) until export.int8.max_drop_pp holds", build="repair:build_onnx", calibrate=True,
            bias_correction=True),
    Variant("qat_int8", **_ONNX, scheme="quantization-aware training, QDQ from fake-quant ops",
            build="onnx:build_from_fake_quant", prepare="qat", multi_head=False),
)

FORMATS: tuple[str, ...] = tuple(dict.fromkeys(v.format for v in VARIANTS))  # ("tflite", "onnx")


def names(fmt: str) -> tuple[str, ...]:
    """The variant names of one format, in table order."""
    return tuple(v.name for v in VARIANTS if v.format == fmt)


def find(fmt: str, name: str) -> Variant:
    """The row of `fmt` variant `name`; ExportError naming the valid ones."""
    for variant in VARIANTS:
        if (variant.format, variant.name) == (fmt, name):
            return variant
    raise ExportError(_unknown(fmt, [name]))


def select(requested: dict[str, list[str]]) -> list[Variant]:
    """Rows for {format: variant names}, deduplicated, in request order (formats in table order).

    ExportError naming the valid variants for any unknown one, before any work is done.
    """
    unknown = {fmt: [n for n in requested.get(fmt) or [] if n not in names(fmt)] for fmt in FORMATS}
    for fmt, bad in unknown.items():
        if bad:
            raise ExportError(_unknown(fmt, bad))
    return [find(fmt, n) for fmt in FORMATS for n in dict.fromkeys(requested.get(fmt) or [])]


def _unknown(fmt: str, bad: list[str]) -> str:
    return (f"unknown {fmt} variant(s) {', '.join(map(repr, bad))}; valid {fmt} variants: {', '.join(names(fmt))} "
            f"(recipe export.{fmt}, or --formats {fmt}:VARIANT)")


def parse_formats(specs: list[str]) -> tuple[list[str] | None, ...]:
    """`--formats` values -> variant names per format, in FORMATS order ((tflite, onnx)); None = the recipe's list.

    Tokens (repeat the option or separate with commas): `FORMAT` (the recipe's variants of it),
    `FORMAT:VARIANT` or `FORMAT-VARIANT`; a bare variant continues the previous format, so
    `tflite:int8,fp16,onnx:fp32` works. Formats not named export nothing. Names are checked by `select`.
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
            raise ExportError(f"--formats {token!r}: unknown format; use {', '.join(FORMATS)}, FORMAT:VARIANT or "
                              f"FORMAT-VARIANT (e.g. tflite:int8,fp16 or onnx-fp32)")
    if not bare and not any(explicit.values()):
        raise ExportError(f"--formats: nothing selected; use {', '.join(FORMATS)}, FORMAT:VARIANT or FORMAT-VARIANT")
    return tuple(explicit[fmt] or (None if fmt in bare else []) for fmt in FORMATS)


def _resolve(ref: str) -> Callable:
    """The function named "module:function" in edgetl.export (imported now, so the table stays light)."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(f"edgetl.export.{module}"), name)

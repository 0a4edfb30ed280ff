"""Accuracy-aware int8 repair: leave the most sensitive layers float, a few at a time, until int8 agrees with Keras.

The loop (`repair`) starts from full int8 and, ranked by the per-layer report (`edgetl.export.quant_debug`),
leaves `export.int8.step` more layers float per step until the artifact's top-1 disagreement with the float
Keras model on the repair images is at most `export.int8.max_drop_pp` (an accuracy drop can never exceed the
disagreement, so meeting it bounds the drop on those images), or a limit is hit (`max_float_layers`,
`max_size_ratio`, `max_latency_ratio` against full int8): then `RepairError` says what each step reached.
The repair images are the validation split topped up with training images: `repair_set` reads nothing else, so the
test split stays an honest held-out check for validate. The builders are the `int8_repaired` rows of the
variants table; every step (kept-float layers, agreement, size, latency) is recorded in the manifest.
"""
from __future__ import annotations

import re
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from edgetl.errors import EdgetlError
from edgetl.export.conversion import Built, Conversion
from edgetl.export.quant_debug import LayerError, OnnxQuantizer, onnx_debugged, ranked, tflite_converter_note, tflite_debugged

if TYPE_CHECKING:
    from edgetl.data import DatasetSplits
    from edgetl.recipe import Int8Config


class RepairError(EdgetlError, RuntimeError):
    """No repair within the limits meets the bound; the message lists every step and what to change."""


@dataclass(frozen=True)
class Step:
    """One candidate: the layers it leaves float, its agreement with Keras on the repair images, size, latency."""

    kept_float: tuple[str, ...]
    agreement: float
    size_bytes: int
    latency_ms: float

    @property
    def drop_pp(self) -> float:
        """Disagreement with Keras in percentage points (the bound's quantity)."""
        return round(100.0 * (1.0 - self.agreement), 3)


@dataclass(frozen=True)
class Repaired:
    """The chosen candidate's bytes and every step that led to it (the first is full int8)."""

    data: bytes
    steps: list[Step]

    def record(self, settings: Int8Config, images: int, source: str) -> dict:
        """The manifest's quantization.repair entry."""
        return {"max_drop_pp": settings.max_drop_pp, "images": images, "images_from": source,
                "kept_float": list(self.steps[-1].kept_float),
                "steps": [{**asdict(s), "kept_float": list(s.kept_float), "drop_pp": s.drop_pp} for s in self.steps]}


def repair(layers: list[LayerError], build: Callable[[tuple[str, ...]], bytes],
           predict: Callable[[bytes, np.ndarray], np.ndarray], latency: Callable[[bytes], float],
           images: np.ndarray, reference: np.ndarray, settings: Int8Config, echo=print) -> Repaired:
    """Grow the float set most-sensitive-first until top-1 agreement with `reference` meets the bound.

    `images` are the repair images (validation or training, never test) and `reference` the float model's
    top-1 class for each; `build(kept_float)` makes an artifact, `predict(artifact, images)` scores it.
    Layers matching `settings.denylist` are float from the first step.
    """
    forced = tuple(layer.name for layer in layers if any(re.search(p, layer.name) for p in settings.denylist))
    order = [layer.name for layer in ranked(layers) if layer.name not in forced]
    steps: list[Step] = []
    base: Step | None = None
    count = 0
    while True:
        kept = forced + tuple(order[:count])
        data = build(kept)
        step = Step(kept, float(np.mean(predict(data, images).argmax(-1) == reference)), len(data), latency(data))
        steps.append(step)
        base = base or step
        echo(f"  repair: {len(kept):2d} float -> disagreement {step.drop_pp:.2f} pp, {step.size_bytes / 1024:.0f} KB, "
             f"{step.latency_ms:.2f} ms")
        if step.drop_pp <= settings.max_drop_pp:
            return Repaired(data, steps)
        limit = _limit(step, base, settings, count >= len(order))
        if limit:
            raise RepairError(_failure(steps, settings, limit))
        count += settings.step
        if len(forced) + min(count, len(order)) > settings.max_float_layers:
            raise RepairError(_failure(steps, settings, f"export.int8.max_float_layers ({settings.max_float_layers})"))


def _limit(step: Step, base: Step, settings: Int8Config, exhausted: bool) -> str | None:
    """The limit `step` hit, in words, or None."""
    if exhausted:
        return "every quantized layer is already float"
    if step.size_bytes > settings.max_size_ratio * base.size_bytes:
        return f"export.int8.max_size_ratio ({settings.max_size_ratio}x full int8)"
    if settings.max_latency_ratio and step.latency_ms > settings.max_latency_ratio * base.latency_ms:
        return f"export.int8.max_latency_ratio ({settings.max_latency_ratio}x full int8)"
    return None


def _failure(steps: list[Step], settings: Int8Config, limit: str) -> str:
    lines = "; ".join(f"{len(s.kept_float)} float: {s.drop_pp:.2f} pp, {s.size_bytes / 1024:.0f} KB" for s in steps)
    return (f"no int8 repair within the limits meets export.int8.max_drop_pp = {settings.max_drop_pp} pp "
            f"(disagreement with Keras on the repair images); stopped at {limit}. Steps: {lines}. Raise "
            f"max_float_layers / max_size_ratio or max_drop_pp, or ship qat_int8")


def repair_set(splits: DatasetSplits, calibration: np.ndarray, size: int, resize: str, limit: int
               ) -> tuple[np.ndarray, str]:
    """The repair images (float32 raw pixels) and where they came from: the validation split, topped up to
    `limit` with the calibration (training) images. Never the test split.

    A validation split of a few dozen images cannot see a 1-2 % disagreement (flowers5: 40 images, so full int8
    agreed on all of them and failed the test gate); the training images add what quantization error there is
    to see, since the repair measures agreement with the float model, not generalisation.
    """
    from edgetl.data import load_arrays

    val = load_arrays(splits.val[:limit], size, resize)[0].astype(np.float32) if splits.val else calibration[:0]
    train = calibration[:limit - len(val)]
    source = " + ".join(f"{name} ({len(part)})" for name, part in (("val", val), ("train", train)) if len(part))
    return np.concatenate([val, train]), source


def _reference(job: Conversion, images: np.ndarray) -> np.ndarray:
    """The float Keras model's top-1 class per repair image (the first output of a multi-task model)."""
    outputs = job.source.model.predict(images, batch_size=32, verbose=0)
    return np.asarray(outputs[0] if isinstance(outputs, list) else outputs).argmax(-1)


def _score(suffix: str, threads: int, runs: int = 20):
    """(predict, latency) over a temp file of the artifact, with edgetl.edge.runtime (what validate runs)."""
    from edgetl.edge.runtime import open_model

    def load(data: bytes):
        with tempfile.NamedTemporaryFile(suffix=suffix, delete=False) as f:
            f.write(data)
        try:
            return open_model(Path(f.name), threads=threads)
        finally:
            Path(f.name).unlink()

    def predict(data: bytes, images: np.ndarray) -> np.ndarray:
        return load(data).predict(np.clip(images, 0, 255).astype(np.uint8))

    def latency(data: bytes) -> float:
        return load(data).time_invoke(runs=runs, warmup=3).p50_ms

    return predict, latency


def _run_repair(job: Conversion, layers: list[LayerError], build, suffix: str, echo=print) -> tuple[Repaired, dict]:
    """The loop on this run's repair images; (result, manifest record)."""
    inputs, settings = job.inputs, job.inputs.recipe.export.int8
    images, source = repair_set(inputs.splits, inputs.calibration, inputs.size, inputs.recipe.data.resize,
                                settings.repair_images)
    predict, latency = _score(suffix, inputs.recipe.validate.threads)
    result = repair(layers, build, predict, latency, images, _reference(job, images), settings, echo)
    return result, result.record(settings, len(images), source)


def build_tflite(job: Conversion) -> Built:
    """TFLite full integer with the most sensitive layers left float until the bound holds (see the module)."""
    from edgetl.export.tflite import finish

    quantizer, layers, quantization, files = tflite_debugged(job)
    result, record = _run_repair(job, layers, quantizer.quantize, ".tflite")
    data, notes = finish(job, result.data)
    return Built(data, {**quantization, "repair": record}, tflite_converter_note(), record["kept_float"],
                 warnings=notes, files=files)


def build_onnx(job: Conversion) -> Built:
    """ONNX static QDQ int8 with the most sensitive nodes in nodes_to_exclude until the bound holds."""
    from edgetl.export.onnx import finish_int8, int8_options

    with OnnxQuantizer(job.graph, job.calibration, **int8_options(job)) as quantizer:
        full, _ = quantizer.quantize()
        layers, summary, files = onnx_debugged(job, quantizer, full)
        settings = {}

        def build(exclude: tuple[str, ...]) -> bytes:
            data, settings["last"] = quantizer.quantize(exclude)  # the loop returns on its last build
            return data

        result, record = _run_repair(job, layers, build, ".onnx")
    built = finish_int8(job, result.data, settings["last"], layer_report=summary, repair=record)
    return replace(built, layers_left_float=record["kept_float"], files=files)

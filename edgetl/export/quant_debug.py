"""Per-layer int8 quantization error: which layer broke the int8 model, ranked, written as JSON and a plot.

One metric for both formats: the signal-to-quantization-noise ratio of a layer's output in dB,
SNR = 10 log10(sum(float^2) / sum((float - dequantized)^2)) summed over the calibration images; lower is worse.
SNR rather than RMSE normalised by the float range because a range inflated by a few outliers (the usual way
int8 goes wrong: one huge weight or activation crushes every typical value to a few levels) inflates that
normaliser together with the error and hides it, while the signal's power is set by the typical values.
It is also what onnxruntime's qdq_loss_debug reports, so TFLite and ONNX reports read the same way.

TFLite: `tf.lite.experimental.QuantizationDebugger` instruments the calibrated model with NumericVerify
ops: each quantized op is compared with its float twin run on the same (dequantized) inputs, so a layer's
error is its own (weights and output rounding), not what it inherited. `TfliteQuantizer` keeps the calibrated
model, so selective int8 (`quantize(denylist)`: those layers stay float) needs no second calibration.
ONNX: `onnxruntime.quantization.qdq_loss_debug` activation matching of the QDQ model against the float one,
per Conv/MatMul/Gemm node: the noise it adds itself, its output's noise fraction (noise / signal power) against
the float model less its input's (noises add), as dB (a node that adds none: +inf, recorded as null).
Its weight matching is not used: per-tensor weight SNR is set by the largest weights, so an outlier that crushes
every other weight of a channel reads as a fine weight (and it mis-dequantizes uint8 per-channel weights).
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import tempfile
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from edgetl.errors import EdgetlError
from edgetl.export.bias_correction import corrected
from edgetl.export.conversion import Built, Conversion
from edgetl.io import atomic_write_bytes, read_json

METRIC = "snr_db"
REPORT_DIR = "quantization"  # under exports/
TOP = 10  # layers named in summaries and printed by `edgetl quant-report`
TFLITE_SOURCE = "tf.lite.experimental.QuantizationDebugger (NumericVerify)"
ONNX_SOURCE = "onnxruntime.quantization.qdq_loss_debug (activation matching)"


@dataclass(frozen=True)
class LayerError:
    """One quantized layer: its order in the graph, the name used to leave it float, its op, its SNR in dB."""

    depth: int
    name: str  # TFLite: the op's output tensor name (QuantizationDebugOptions.denylisted_nodes); ONNX: node name
    op: str
    snr_db: float


def snr_db(signal_power: float, noise_power: float) -> float:
    """10 log10(signal / noise); +inf for an exact layer (no noise), -inf for a zero signal with noise."""
    if noise_power <= 0:
        return math.inf
    return 10.0 * math.log10(signal_power / noise_power) if signal_power > 0 else -math.inf


def ranked(layers: list[LayerError]) -> list[LayerError]:
    """Worst (lowest SNR) first; ties keep graph order."""
    return sorted(layers, key=lambda layer: (layer.snr_db, layer.depth))


class TfliteQuantizer:
    """A SavedModel calibrated once on `images` (float32, what the SavedModel takes): per-layer report and
    selective int8."""

    def __init__(self, saved_model: str, images: np.ndarray, io: str = "uint8", per_channel: bool = True):
        import tensorflow as tf

        self._images, self._io = images, io
        converter = tf.lite.TFLiteConverter.from_saved_model(saved_model)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = self._dataset
        converter._experimental_disable_per_channel = not per_channel  # noqa: SLF001 - the converter's own switch
        options = tf.lite.experimental.QuantizationDebugOptions()
        # The debugger calibrates once (calibrate-only conversion) and builds the NumericVerify model from it.
        with _debugger_warnings_hidden():
            self._debugger = tf.lite.experimental.QuantizationDebugger(converter=converter, debug_dataset=self._dataset,
                                                                       debug_options=options)
        self.per_channel = per_channel

    def _dataset(self):
        return ([self._images[i:i + 1]] for i in range(len(self._images)))

    def report(self) -> list[LayerError]:
        """Every quantized layer's SNR on the calibration images, in graph order.

        A second debugger on the instrumented model keeps every tensor alive, so the float twin's output
        (the signal) can be read next to the quantized one; the first one frees them between ops.
        """
        import tensorflow as tf

        powers = {"signal": lambda f, q, s, zp: float(np.mean(np.square(f, dtype=np.float64))),
                  "noise": lambda f, q, s, zp: float(np.mean(np.square((q.astype(np.float64) - zp) * s - f)))}
        options = tf.lite.experimental.QuantizationDebugOptions(layer_direct_compare_metrics=powers)
        with _debugger_warnings_hidden():
            debugger = tf.lite.experimental.QuantizationDebugger(
                quant_debug_model_content=self._debugger.get_debug_quantized_model(), debug_dataset=self._dataset,
                debug_options=options)
            debugger.run()
        dump = io.StringIO()
        debugger.layer_statistics_dump(dump)
        dump.seek(0)
        return [LayerError(depth, row["tensor_name"], row["op_name"], snr_db(float(row["signal"]), float(row["noise"])))
                for depth, row in enumerate(csv.DictReader(dump))]

    def quantize(self, denylist: tuple[str, ...] = ()) -> bytes:
        """Full-integer model with the `denylist` layers (report names) left float; input/output type `io`."""
        import tensorflow as tf
        from tensorflow.lite.python import convert

        io_type = {"float": tf.float32, "int8": tf.int8, "uint8": tf.uint8}[self._io]
        # What TFLiteConverter.convert does after calibrating (its _quantize), with the debugger's denylist added.
        return convert.mlir_quantize(self._debugger.calibrated_model, disable_per_channel=not self.per_channel,
                                     input_data_type=io_type, output_data_type=io_type,
                                     denylisted_nodes=list(denylist) or None)


@contextlib.contextmanager
def _debugger_warnings_hidden():
    """Hide the two warnings the QuantizationDebugger's own interpreter raises on every export: it is TensorFlow's
    deprecated tf.lite.Interpreter, and it keeps every tensor on purpose (that is how layers are compared)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"(?s).*tf\.lite\.Interpreter is deprecated")
        warnings.filterwarnings("ignore", message=r"(?s).*experimental_preserve_all_tensors")
        yield


class OnnxQuantizer:
    """A tf2onnx graph pre-processed once: per-layer report and static QDQ int8 with nodes left float."""

    def __init__(self, fp32, images: np.ndarray, **options):
        import onnx

        from edgetl.export.onnx import pre_process

        self._tmp = tempfile.TemporaryDirectory(prefix="edgetl-onnx-debug-")
        self.pre = Path(self._tmp.name, "pre.onnx")
        onnx.save(fp32, Path(self._tmp.name, "fp32.onnx"))
        pre_process(Path(self._tmp.name, "fp32.onnx"), self.pre)
        self._images, self._options = images, options

    def quantize(self, exclude: tuple[str, ...] = (), int16_weights: tuple[str, ...] = ()) -> tuple[bytes, dict]:
        """QDQ int8 bytes and settings (edgetl.export.onnx.quantize_pre_processed) with `exclude` nodes float and
        the weights of the `int16_weights` nodes in 16 bits."""
        from edgetl.export.onnx import quantize_pre_processed

        return quantize_pre_processed(self.pre, self._images, nodes_to_exclude=tuple(exclude),
                                      int16_weights=tuple(int16_weights), **self._options)

    def report(self, qdq: bytes) -> list[LayerError]:
        """Every Conv/MatMul/Gemm of the QDQ model `qdq`, in graph order (see the module docstring)."""
        path = Path(self._tmp.name, "qdq.onnx")
        path.write_bytes(qdq)
        return onnx_report(self.pre, path, self._images)

    def close(self) -> None:
        self._tmp.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def tflite_debugged(job: Conversion) -> tuple[TfliteQuantizer, list[LayerError], dict, dict[str, bytes]]:
    """The job's calibrated quantizer, its per-layer report, the manifest's quantization record and the report's
    files (Built.files: written after the artifact): what the int8 and int8_repaired builders share.

    With integer io an affine preprocessing is carried by the input quantization (edgetl.export.tflite
    `full_integer_input`): the quantizer calibrates the network after it on the preprocessed images.
    """
    from edgetl.export.tflite import affine_record, full_integer_input

    int8, io = job.inputs.recipe.export.int8, job.inputs.recipe.export.io
    graph, images, affine = full_integer_input(job)
    quantizer = TfliteQuantizer(graph, images, io, int8.per_channel)
    layers = quantizer.report()
    summary, files = report_files(job.variant.key, layers, len(images), TFLITE_SOURCE)
    return quantizer, layers, {"scheme": job.variant.scheme, "calibration_samples": len(images), "io": io,
                               "per_channel": quantizer.per_channel, **affine_record(affine),
                               "layer_report": summary}, files


def tflite_converter_note() -> str:
    import tensorflow as tf

    return f"tf.lite.TFLiteConverter + QuantizationDebugger (tensorflow {tf.__version__})"


def build_tflite(job: Conversion) -> Built:
    """TFLite full integer, calibrated once for the artifact and its per-layer report (exports/quantization/)."""
    from edgetl.export.tflite import finish

    quantizer, _, quantization, files = tflite_debugged(job)
    data, correction = corrected(quantizer.quantize(), job)
    data, notes = finish(job, data)
    return Built(data, {**quantization, **correction}, tflite_converter_note(), warnings=notes, files=files)


def build_onnx(job: Conversion) -> Built:
    """ONNX static QDQ int8 and its per-layer report (exports/quantization/), from one pre-processed graph."""
    from edgetl.export.onnx import finish_int8, int8_options

    with OnnxQuantizer(job.graph, job.calibration, **int8_options(job)) as quantizer:
        data, settings = quantizer.quantize()
        _, summary, files = onnx_debugged(job, quantizer, data)
    data, correction = corrected(data, job)
    return replace(finish_int8(job, data, settings, layer_report=summary, **correction), files=files)


def onnx_debugged(job: Conversion, quantizer: OnnxQuantizer, qdq: bytes) -> tuple[list[LayerError], dict, dict]:
    """The per-layer report of the QDQ model `qdq` on the job's calibration images, the manifest's summary of it
    and its files (Built.files)."""
    layers = quantizer.report(qdq)
    return (layers, *report_files(job.variant.key, layers, len(job.calibration), ONNX_SOURCE))


def onnx_report(float_path: Path, qdq_path: Path, images: np.ndarray, batch: int = 4, chunk: int = 4
                ) -> list[LayerError]:
    """Per Conv/MatMul/Gemm node of the QDQ model, in graph order: the noise it adds itself (module docstring).

    Activations are collected `chunk` images at a time and only their powers kept: ORT's collect_activations
    holds every intermediate tensor of every image it runs: MobileNetV2 at 224 px peaked at 6.3 GB with 16
    images a chunk (flowers5 export of onnx-int8, /usr/bin/time), hence 4.
    """
    import onnx
    from onnxruntime.quantization import qdq_loss_debug as qdq

    from edgetl.export.onnx import INPUT_NAME

    powers: dict[str, list[float]] = {}  # tensor -> [signal, noise] summed over the chunks
    with tempfile.TemporaryDirectory(prefix="edgetl-qdq-debug-") as tmp:
        augmented = [Path(tmp, f"augmented-{i}.onnx") for i in range(2)]
        for source, target in zip((qdq_path, float_path), augmented):
            qdq.modify_model_output_intermediate_tensors(str(source), str(target))
        for start in range(0, len(images), chunk):
            part = images[start:start + chunk]
            feeds = [{INPUT_NAME: part[i:i + batch]} for i in range(0, len(part), batch)]
            matching = qdq.create_activation_matching(*(qdq.collect_activations(str(a), feeds) for a in augmented))
            for tensor, match in matching.items():
                if "float" in match:
                    total = powers.setdefault(tensor, [0.0, 0.0])
                    total[0] += sum(float(np.sum(np.square(f, dtype=np.float64))) for f in match["float"])
                    total[1] += sum(float(np.sum(np.square(np.asarray(f, np.float64) - q)))
                                    for f, q in zip(match["float"], match["post_qdq"]))

    def noise(tensor: str) -> float:
        """Noise over signal power of `tensor` in the QDQ model against the float model (0 if not matched)."""
        signal, error = powers.get(tensor.removesuffix(qdq.DEQUANT_OUTPUT_SUFFIX), (1.0, 0.0))
        return _noise_fraction(snr_db(signal, error))

    layers = []
    for node in onnx.load(str(qdq_path)).graph.node:
        if node.op_type in ("Conv", "MatMul", "Gemm"):
            added = max(noise(node.output[0]) - noise(node.input[0]), 0.0)
            layers.append(LayerError(len(layers), node.name, node.op_type, _fraction_db(added)))
    return layers


def _noise_fraction(db: float | None) -> float:
    """Noise power over signal power for an SNR in dB (0 when the part is exact or not quantized)."""
    if db is None or db == math.inf:
        return 0.0
    return math.inf if db == -math.inf else 10.0 ** (-db / 10.0)


def _fraction_db(noise_fraction: float) -> float:
    if noise_fraction <= 0:
        return math.inf
    return -math.inf if noise_fraction == math.inf else -10.0 * math.log10(noise_fraction)


def report_dict(artifact: str, layers: list[LayerError], images: int, source: str) -> dict:
    """The JSON report: every layer in graph order, plus the worst TOP by name."""
    def entry(layer: LayerError) -> dict:
        return {"depth": layer.depth, "name": layer.name, "op": layer.op, METRIC: _finite(layer.snr_db)}

    return {"artifact": artifact, "metric": METRIC, "metric_note": "signal-to-quantization-noise ratio of the "
            "layer's output, dB, lower is worse", "images": images, "source": source,
            "layers": [entry(layer) for layer in layers], "worst": [entry(layer) for layer in ranked(layers)[:TOP]]}


def _finite(value: float) -> float | None:
    """JSON has no infinities: an exact layer's +inf SNR is recorded as null."""
    return round(value, 3) if math.isfinite(value) else (None if value > 0 else -1e9)


def report_files(artifact: str, layers: list[LayerError], images: int, source: str) -> tuple[dict, dict[str, bytes]]:
    """The manifest's summary of a report, and its files {path under exports/: bytes} (JSON and plot)."""
    report = report_dict(artifact, layers, images, source)
    paths = {"report": f"{REPORT_DIR}/{artifact}.json", "plot": f"{REPORT_DIR}/{artifact}.png"}
    files = {paths["report"]: (json.dumps(report, indent=2) + "\n").encode(), paths["plot"]: _plot(artifact, layers)}
    return {**paths, "metric": METRIC, "layers": len(layers),
            "worst": [{"name": w["name"], METRIC: w[METRIC]} for w in report["worst"][:3]]}, files


def write_report(exports_dir: Path, artifact: str, layers: list[LayerError], images: int, source: str) -> dict:
    """exports/quantization/<artifact>.json and .png (both atomic); the manifest's summary of them."""
    summary, files = report_files(artifact, layers, images, source)
    write_files(Path(exports_dir), files)
    return summary


def write_files(exports_dir: Path, files: dict[str, bytes]) -> None:
    """Each {path under exports/: bytes} written atomically."""
    for relative, data in files.items():
        atomic_write_bytes(exports_dir / relative, data)


def _plot(artifact: str, layers: list[LayerError]) -> bytes:
    """SNR by layer depth, the worst three named, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [layer for layer in layers if math.isfinite(layer.snr_db)]
    fig, ax = plt.subplots(figsize=(9, 3.5))
    ax.plot([layer.depth for layer in finite], [layer.snr_db for layer in finite], marker="o", markersize=3)
    for layer in ranked(finite)[:3]:
        ax.annotate(layer.name[-32:], (layer.depth, layer.snr_db), fontsize=7, rotation=20)
    ax.set_xlabel("layer depth (graph order)")
    ax.set_ylabel("SNR, dB (lower = worse)")
    ax.set_title(f"{artifact}: int8 error by layer")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=110, format="png")
    plt.close(fig)
    return buffer.getvalue()


class NoReport(EdgetlError, FileNotFoundError):
    """A per-layer report that neither exists nor can be computed; the message says which artifacts have one."""


COMPUTABLE = ("tflite-int8", "onnx-int8")  # the artifacts whose report `reports` can compute after the fact


def reports(target: Path, echo=print) -> list[dict]:
    """The per-layer reports of TARGET: an artifact in <run>/exports/ (its report), or a run directory (all of them).

    A missing report of tflite-int8 / onnx-int8 (an export from before reports existed) is computed and written
    as the export does: the run's model quantized again with its recipe on the same calibration images.
    """
    from edgetl.rundir import RunDir

    target = Path(target)
    run = RunDir(target if target.is_dir() else target.parent.parent)
    folder = run.exports_dir / REPORT_DIR
    if target.is_dir():
        found = sorted(folder.glob("*.json")) if folder.is_dir() else []
        missing = [key for key in COMPUTABLE if not (folder / f"{key}.json").exists()
                   and any(run.exports_dir.glob(f"{key}.*"))]
        if not found and not missing:
            raise NoReport(f"{target}: no per-layer reports in {folder} and no {' / '.join(COMPUTABLE)} artifact to "
                           f"compute one for; export an int8 variant first (edgetl export {target} --formats tflite:int8)")
        return [read_json(path) for path in found] + [_compute(run, key, echo) for key in missing]
    key = target.name.removesuffix(target.suffix)
    if (folder / f"{key}.json").exists():
        return [read_json(folder / f"{key}.json")]
    if key not in COMPUTABLE or not run.recipe_path.exists():
        raise NoReport(f"{target}: no per-layer report ({folder / key}.json); one is computed only for "
                       f"{' / '.join(COMPUTABLE)} in a run's exports/ folder (every int8 and int8_repaired export "
                       f"writes its own)")
    return [_compute(run, key, echo)]


def _compute(run, key: str, echo) -> dict:
    """Write and return the report of artifact `key` (one of COMPUTABLE) of `run`."""
    from edgetl.export.inputs import ExportInputs
    from edgetl.export.optimize import Prepared
    from edgetl.variants import find

    echo(f"computing the per-layer report of {key} (no {REPORT_DIR}/{key}.json yet) ...")
    variant = find(*key.split("-", 1))
    inputs = ExportInputs(run, run.load_recipe())
    with tempfile.TemporaryDirectory(prefix="edgetl-quant-report-") as tmp:
        graph = variant.grapher()(inputs.model, inputs, Path(tmp, "graph"))
        job = Conversion(variant, Prepared(inputs.model), graph, inputs, inputs.calibration)
        if variant.format == "tflite":
            files = tflite_debugged(job)[-1]
        else:
            from edgetl.export.onnx import int8_options

            with OnnxQuantizer(graph, job.calibration, **int8_options(job)) as quantizer:
                files = onnx_debugged(job, quantizer, quantizer.quantize()[0])[-1]
    write_files(run.exports_dir, files)
    return read_json(run.exports_dir / REPORT_DIR / f"{key}.json")


def format_report(report: dict, top: int = TOP) -> str:
    """The worst `top` layers of a report as a table: rank, depth, SNR dB, op, name."""
    layers = sorted(report["layers"], key=lambda e: (math.inf if e[METRIC] is None else e[METRIC], e["depth"]))
    lines = [f"{report['artifact']}: {len(layers)} quantized layers, SNR of each layer's output on "
             f"{report['images']} calibration images ({report['source']}); worst first, lower is worse",
             f"  {'#':>3} {'depth':>5} {'SNR dB':>8}  {'op':<18} name"]
    for rank, e in enumerate(layers[:top], 1):
        snr = "exact" if e[METRIC] is None else "-inf" if e[METRIC] <= -1e9 else f"{e[METRIC]:.1f}"
        lines.append(f"  {rank:>3} {e['depth']:>5} {snr:>8}  {e['op']:<18} {e['name']}")
    return "\n".join(lines)

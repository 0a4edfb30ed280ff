"""Export a trained run to TFLite and ONNX artifacts, each checked by loading and running it, plus a manifest.

`export_run(RUN_DIR)` writes `RUN_DIR/exports/`: one file per variant (`tflite-int8.tflite`,
`onnx-fp32.onnx`, ...), `labels.txt` and `manifest.json`. Every file is written to a temp name and
renamed only after it converted, loaded and ran; a failed variant leaves no file, is recorded with its
error, and the others still export. The manifest is rewritten after every artifact, so an interrupted
export leaves a manifest that matches the files on disk (earlier entries of other artifacts are kept).

The variants are the rows of `edgetl.variants.VARIANTS`. TFLite: fp32; fp16 (float16 weights);
dynamic (int8 weights, float activations); int8 (full integer, calibrated on `export.representative_samples`
training images, input/output type `export.io`); qat_int8 (flattened model, quantizer ranges calibrated on
the same images, quantization-aware fine-tune, then full integer; see `edgetl.export.optimize`); pruned_int8
(magnitude pruning to `export.pruning.target_sparsity`, spread over layers by `allocation` and fine-tuned by
distillation from the float model (`edgetl.export.optimize.distill`), then post-training full integer:
TFLite's int8 weights are symmetric with zero point 0, so pruned zeros stay exactly zero and the sparsity
survives without a second, prune-preserving QAT fine-tune). ONNX (tf2onnx, opset `export.opset`, input
`image`, dynamic batch): fp32; int8 (onnxruntime static QDQ quantization after quant_pre_process,
per-channel 8-bit weights, 8-bit activations, MinMax-calibrated on the same images; integer types and
reduce_range from `export.target`, see `edgetl.export.targets`); qat_int8 (the QAT model through tf2onnx; recorded as
not_supported: tf2onnx folds the per-channel weight fake-quant into float weights). The int8 and int8_repaired rows
of both formats correct the int32 bias of each int8 layer for the mean error of its rounded weights
(`export.int8.bias_correction`, `edgetl.export.bias_correction`).

The variants run in groups that share a prepared model (`groups`), each group in its own process when there
are several (`edgetl.isolate`): the memory of a fine-tune or of onnxruntime's calibration is returned before the
next group starts.

Flattened, QAT and pruned Keras models are intermediate: they live in memory only (rebuilt from
model.keras and the recipe in minutes), so exports/ holds only what ships. Modules: variants (the table),
inputs (recipe, labels, model, training data), optimize (the preparations), cache (what variants share),
tflite and onnx (builders and checks), metadata (TFLite Model Metadata), embed (C header).

Integer inputs take camera bytes (uint8: the byte, int8: byte - 128; `edgetl.edge.runtime.image_input`); the
calibration set pins the input range to 0..255. Where the baked-in preprocessing is one per-tensor affine
(MobileNet's x / 127.5 - 1), the full-integer TFLite variants convert the network without it and the input's
quantization carries it (uint8 scale 1/127.5, zero point 127, as in Google's reference MobileNetV2; no
preprocessing ops); otherwise a uint8 input has scale 1 and zero point 0 (int8: -128) and the preprocessing
runs as ops (`edgetl.export.tflite`).

Multi-task runs (recipe `model.heads`): every artifact has one output per head, in head order and named
after the head (TFLite: output tensor and signature names; ONNX: graph output names); TFLite metadata
carries a labels_<head>.txt per output, ONNX metadata_props a `heads` JSON {head: class names}.
qat_int8 and pruned_int8 are not_supported for them (their fine-tune trains one output).

manifest.json schema (keys are stable):
  created             ISO time (UTC) of the last write
  run                 the run directory
  recipe_fingerprint  Recipe.fingerprint() of the run's recipe
  versions            {distribution: version} of python, edgetl and every converter and runtime involved
  labels              "labels.txt" (one class name per line, index order; a multi-task run's primary head)
  head_labels         multi-task runs only: {head: "labels_<head>.txt"}, in output order
  preparation         shared steps: {"flatten": {...}, "qat": {...}, "pruning": {...}, "bias_correction_tflite":
                      {...}, "bias_correction_onnx": {...}} when they ran
  artifacts           one entry per exported variant:
    name              "<format>-<variant>", e.g. "tflite-int8"
    format, variant   "tflite" | "onnx"; the variant name
    status            "ok" | "failed" | "not_supported"
    error             null, or why it failed / is not supported
    path              file name relative to exports/ (null unless ok)
    size_bytes, gzip_bytes, sha256    of the file (gzip level 9: the over-the-air size)
    input             {"name", "dtype", "shape" (null = dynamic), "scale", "zero_point"} (scale and
                      zero_point null for float tensors). An integer input takes the camera byte (int8: byte - 128)
                      whatever they are; they say what the network reads it as, (value - zero_point) * scale
    outputs           list of the same for each output
    quantization      {"scheme", ...}: calibration samples, io type, per-channel, fine-tune settings;
                      "input_affine" {"scale", "offset", "mean", "std"} when the input quantization carries the
                      preprocessing pixel * scale + offset = (pixel - mean) / std (TFLite full integer); ONNX int8:
                      integer types, reduce_range and the export target they came from; repaired: "repair";
                      "bias_correction" {"layers" corrected, "of" measured, "images"} where it ran
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
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from edgetl.export.cache import Cache
from edgetl.export.conversion import Conversion
from edgetl.io import atomic_write_bytes, atomic_write_json, package_versions, read_json, write_labels
from edgetl.rundir import RunDir
from edgetl.variants import FORMATS, VARIANTS, ExportError, NotSupported, Variant, parse_formats, select

if TYPE_CHECKING:
    from edgetl.export.inputs import ExportInputs
    from edgetl.export.optimize import Prepared

__all__ = ["export_run", "export_one", "parse_formats", "echo_summary", "ExportResult", "ExportError", "NotSupported",
           "VARIANTS", "FORMATS"]

# The distributions whose versions the manifest records: everything that converts or runs the artifacts.
DISTRIBUTIONS = ("tensorflow", "tf-keras", "tensorflow-model-optimization", "tf2onnx", "onnx", "onnxruntime",
                 "ai-edge-litert", "numpy")


@dataclass
class ExportResult:
    """The manifest as written, the names of the variants that failed, and the exports folder."""

    manifest: dict
    failed: list[str]
    exports_dir: Path


def export_run(run_dir, tflite: list[str] | None = None, onnx: list[str] | None = None,
               echo: Callable[[str], None] = print, isolate: bool | None = None) -> ExportResult:
    """Export the requested variants (None = the recipe's `export` lists) into RUN_DIR/exports/.

    The variants are exported in groups that share one prepared model and converter (`groups`); `isolate` runs
    each group in its own process (default: when there is more than one), so a group's memory (a fine-tune's
    TensorFlow graphs, onnxruntime's calibration buffers) is returned before the next starts and the export
    peaks at its largest group, not at their sum (flowers5: 5.2 GB in one process).
    """
    from edgetl.isolate import run_in_child

    run = RunDir(Path(run_dir))
    run.require(run.recipe_path, run.labels_path, run.model_path)
    recipe = run.load_recipe()
    variants = select({"tflite": recipe.export.tflite if tflite is None else tflite,
                       "onnx": recipe.export.onnx if onnx is None else onnx})
    if not variants:
        raise ExportError(f"{run.recipe_path}: no variants to export; list them under export.tflite / export.onnx "
                          f"or pass --formats (e.g. --formats tflite:int8)")
    manifest = _start_manifest(run, recipe)
    batches = groups(variants)
    for group in batches:
        if len(batches) > 1 if isolate is None else isolate:
            manifest = run_in_child(_export_group, (run.path, group, manifest), echo, f"exporting {group[0].key}")
        else:
            manifest = _export_group(run.path, group, manifest, echo)
    # Groups ran out of order, and re-exported entries were appended: the recipe's order, then the table's.
    order: dict[str, int] = {}
    for variant in [*select({"tflite": recipe.export.tflite, "onnx": recipe.export.onnx}), *variants, *VARIANTS]:
        order.setdefault(variant.key, len(order))
    manifest["artifacts"] = sorted(manifest["artifacts"], key=lambda a: order.get(a["name"], len(order)))
    atomic_write_json(run.exports_dir / "manifest.json", manifest)
    echo_summary(manifest, echo)
    requested = {v.key for v in variants}
    failed = [a["name"] for a in manifest["artifacts"] if a["status"] == "failed" and a["name"] in requested]
    return ExportResult(manifest, failed, run.exports_dir)


def groups(variants: list[Variant]) -> list[list[Variant]]:
    """The variants in groups that share what they convert: one per fine-tune (its TFLite and ONNX rows share the
    fine-tuned model), and one per format for the trained model (a SavedModel, a tf2onnx graph); request order."""
    grouped: dict[str, list[Variant]] = {}
    for variant in variants:
        grouped.setdefault(variant.prepare or variant.format, []).append(variant)
    return list(grouped.values())


def _export_group(run_path: Path, variants: list[Variant], manifest: dict, echo: Callable[[str], None]) -> dict:
    """Export `variants` in this process, rewriting manifest.json after each artifact; the updated manifest."""
    from edgetl.export.inputs import ExportInputs

    run = RunDir(run_path)
    inputs = ExportInputs(run, run.load_recipe())
    manifest = {**manifest, "artifacts": list(manifest["artifacts"])}
    head_files = write_labels(run.exports_dir, inputs.labels, inputs.head_labels)
    if head_files:
        manifest["head_labels"] = head_files
    cache = Cache()
    with tempfile.TemporaryDirectory(prefix="edgetl-export-") as workdir:
        for variant in variants:
            echo(f"exporting {variant.key} ...")
            _put(manifest["artifacts"], export_one(variant, inputs, cache, Path(workdir), echo))
            manifest["preparation"] = {**manifest["preparation"], **cache.reports}
            manifest["created"] = _now()
            atomic_write_json(run.exports_dir / "manifest.json", manifest)
    return manifest


def export_one(variant: Variant, inputs: ExportInputs, cache: Cache, workdir: Path,
               echo: Callable[[str], None] = print) -> dict:
    """Prepare, build, check and atomically write one artifact; its manifest entry (never raises Exception).

    What variants share (prepared models, their converter inputs) comes from `cache`, built before the
    clock starts: `seconds` is this artifact's conversion and checks, shared work is under `preparation`.
    """
    target = inputs.run.exports_dir / variant.filename
    entry = _entry(variant)
    t0 = None
    try:
        job = _conversion(variant, inputs, cache, workdir, echo)
        t0 = time.perf_counter()
        built = variant.builder()(job)
        entry.update(variant.inspector()(built.data, inputs.check_image()))
        _check_output_names(entry["outputs"], list(inputs.head_labels))
        atomic_write_bytes(target, built.data)
        for relative, data in built.files.items():  # what describes the artifact (e.g. its per-layer report)
            atomic_write_bytes(inputs.run.exports_dir / relative, data)
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
    entry["seconds"] = 0.0 if t0 is None else round(time.perf_counter() - t0, 2)
    return entry


def _conversion(variant: Variant, inputs: ExportInputs, cache: Cache, workdir: Path, echo) -> Conversion:
    """What `variant`'s builder needs, from the cache: its prepared model, that model's converter input, calibration."""
    if inputs.head_labels and not variant.multi_head:
        raise NotSupported(f"{variant.key} is not supported for multi-head recipes (model.heads): its "
                           f"{variant.prepare} fine-tune trains one output; use int8 (post-training quantization)")
    source = _prepared(variant.prepare, inputs, cache, echo)
    model_name = variant.prepare or "trained"
    graph = cache.get((variant.graph, model_name),
                      lambda: variant.grapher()(source.model, inputs, workdir / f"{variant.format}-{model_name}"))
    return Conversion(variant, source, graph, inputs, inputs.calibration if variant.calibrate else None,
                      _bias_shifts(variant, inputs, cache))


def _prepared(name: str | None, inputs: ExportInputs, cache: Cache, echo) -> Prepared:
    """The Keras model a variant converts: the trained one, or the flat graph after fine-tune `name`."""
    from edgetl.export.optimize import Prepared, prepare_flat, prepare_pruning, prepare_qat

    if name is None:
        return Prepared(inputs.model)
    flat = cache.prepare("flatten", lambda: prepare_flat(inputs.model, inputs.calibration[:8]))
    finetunes = {  # what a row's `prepare` names (the manifest's preparation keys)
        "qat": lambda: prepare_qat(flat, inputs.calibration, inputs.finetune_data, inputs.recipe.export.qat, echo),
        "pruning": lambda: prepare_pruning(flat, inputs.finetune_data, inputs.recipe.export.pruning, echo),
    }
    return cache.prepare(name, finetunes[name])


def _bias_shifts(variant: Variant, inputs: ExportInputs, cache: Cache) -> dict | None:
    """The per-layer bias corrections of the row's format (edgetl.export.bias_correction), for the rows that take
    them while export.int8.bias_correction is on; else None."""
    from edgetl.export.bias_correction import mean_shifts, weight_levels

    int8 = inputs.recipe.export.int8
    if not (variant.bias_correction and int8.bias_correction):
        return None
    levels = weight_levels(variant.format, inputs.recipe.export.target)

    def measure():
        try:
            return mean_shifts(inputs.model, inputs.calibration, levels, int8.per_channel)
        except Exception as exc:  # noqa: BLE001 - said as what to change; the variant is recorded failed
            raise ExportError(f"{inputs.run.recipe_path}: export.int8.bias_correction could not measure this model "
                              f"({type(exc).__name__}: {exc}); set export.int8.bias_correction: false to export "
                              f"the {variant.format} int8 variants without it") from exc

    return cache.prepare(f"bias_correction_{variant.format}", measure)


def _check_output_names(outputs: list[dict], heads: list[str]) -> None:
    """A multi-task artifact must expose one output per head, named after it, in head order."""
    names = [o["name"] for o in outputs]
    if heads and names != heads:
        raise RuntimeError(f"the artifact's outputs are {names}; expected one per head, in order: {heads}")


def _entry(variant: Variant) -> dict:
    return {"name": variant.key, "format": variant.format, "variant": variant.name, "status": None, "error": None,
            "path": None, "size_bytes": None, "gzip_bytes": None, "sha256": None, "input": None, "outputs": [],
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
            "versions": package_versions(DISTRIBUTIONS), "labels": "labels.txt", "preparation": {},
            "artifacts": kept}


def _put(artifacts: list[dict], entry: dict) -> None:
    """Replace the entry of the same name in place, or append."""
    names = [a.get("name") for a in artifacts]
    if entry["name"] in names:
        artifacts[names.index(entry["name"])] = entry
    else:
        artifacts.append(entry)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def echo_summary(manifest: dict, echo: Callable[[str], None] = print) -> None:
    """One line per artifact: name, size, gzip size, status (and the error of a failed one)."""
    echo(f"{'artifact':<20} {'size KB':>9} {'gzip KB':>9}  status")
    for a in manifest["artifacts"]:
        size = f"{a['size_bytes'] / 1024:9.1f}" if a.get("size_bytes") else f"{'-':>9}"
        packed = f"{a['gzip_bytes'] / 1024:9.1f}" if a.get("gzip_bytes") else f"{'-':>9}"
        note = f"  {a['error']}" if a.get("error") else ""
        echo(f"{a['name']:<20} {size} {packed}  {a['status']}{note}")

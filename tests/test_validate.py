"""Validation harness: every artifact of a tiny run on the same images, gates, recommendation, report files.

The shared validation runs in a fresh process on the default runtimes and OpenVINO, which checks that the
validating process itself never imports TensorFlow (only the Keras worker does). ONNX rows are covered by
tests/test_pipeline.py (its export stage produces onnx-fp32).
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_recipe_dict
from edge_support import env_with_repo
from export_support import tflite_bytes

from edgetl.io import atomic_write_json, atomic_write_text, read_json, write_labels
from edgetl.rundir import RunDir
from edgetl.validate import (
    GateFailure,
    ValidationError,
    check_gates,
    format_summary,
    format_table,
    load_validation,
    pareto_front,
    recommend,
    validate_run,
)

FAST = {"runs": 5, "warmup": 1}
MISSING_OPENVINO = "OpenVINO is not installed: pip install openvino (or edgetl[openvino])"
TENSORFLOW = ("tensorflow", "tf_keras", "keras")
# What train records in metrics.json when ImageNet weights were unavailable and the recipe allows the fallback.
RANDOM_FALLBACK = {"weights_source": "random (imagenet unavailable)",
                   "warning": "WARNING: ImageNet weights unavailable (/cache/mobilenet.h5 missing, download failed); "
                              "using RANDOM weights because the recipe sets weights_fallback: random. Accuracy will "
                              "be far below a pretrained model."}
# Validates argv[1] in a fresh interpreter; pickles the result, the printed lines and the TensorFlow modules
# imported by then into argv[2].
VALIDATE_IN_FRESH_PROCESS = f"""
import pickle, sys
from edgetl.validate import validate_run
log = []
result = validate_run(sys.argv[1], min_agreement=0.7, runtimes=["auto", "openvino"], echo=log.append, **{FAST!r})
with open(sys.argv[2], "wb") as f:
    pickle.dump({{"result": result, "log": log, "tensorflow": [m for m in {TENSORFLOW!r} if m in sys.modules]}}, f)
"""


def _tamper(model, fp32: bytes) -> bytes:
    """The fp32 file with the classifier's rows rotated in place: loads fine, every prediction changes."""
    kernel, bias = [layer for layer in model.layers if layer.__class__.__name__ == "Dense"][-1].get_weights()
    out = fp32
    for weights in (np.ascontiguousarray(kernel.T), bias):  # TFLite stores FullyConnected weights as (out, in)
        old = weights.astype(np.float32).tobytes()
        assert out.count(old) == 1
        out = out.replace(old, np.roll(weights, 1, axis=0).astype(np.float32).tobytes())
    return out


def _entry(exports: Path, name: str, fmt: str, variant: str, filename: str, data: bytes) -> dict:
    """A manifest entry in the export stage's schema."""
    (exports / filename).write_bytes(data)
    return {"name": name, "format": fmt, "variant": variant, "status": "ok", "error": None, "path": filename,
            "size_bytes": len(data), "gzip_bytes": len(gzip.compress(data)), "sha256": hashlib.sha256(data).hexdigest()}


def _small_classifier(classes: int):
    """Raw RGB 32 px -> Rescaling -> three strided 3x3 convolutions -> GAP -> softmax: 24k weights, so int8 is
    clearly smaller than fp32, and it loads and runs in a fraction of MobileNetV2's time."""
    import tf_keras as keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3), name="image")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    for filters in (16, 32, 64):
        x = keras.layers.Conv2D(filters, 3, strides=2, padding="same", activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(classes, activation="softmax")(x))


@pytest.fixture(scope="module")
def validated(tiny_data, tmp_path_factory):
    """A run directory of a small classifier fitted on the tiny data (metrics.json as train writes it after the
    random-weights fallback), four exports (two of them broken) and one failed export, validated once in a
    fresh process."""
    from edgetl.data import load_arrays, load_splits
    from edgetl.metrics import classification_metrics
    from edgetl.recipe import recipe_from_dict

    root = tmp_path_factory.mktemp("validate")
    run = RunDir(root / "run")
    recipe = recipe_from_dict(tiny_recipe_dict(tiny_data))
    splits = load_splits(recipe)
    train_images, train_labels = load_arrays(splits.train, 32)
    test_images, test_labels = load_arrays(splits.test, 32)
    model = _small_classifier(len(splits.class_names))
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(train_images.astype(np.float32), train_labels, epochs=15, batch_size=16, verbose=0)
    test = classification_metrics(test_labels, model.predict(test_images.astype(np.float32), verbose=0),
                                  splits.class_names)
    atomic_write_text(run.recipe_path, recipe.to_yaml())
    write_labels(run.path, splits.class_names, {})
    model.save(run.model_path)
    atomic_write_json(run.metrics_path, {"test": test, **RANDOM_FALLBACK})
    calibration = train_images[:16]
    run.exports_dir.mkdir()
    fp32 = tflite_bytes(model)
    artifacts = [
        _entry(run.exports_dir, "tflite-fp32", "tflite", "fp32", "model_fp32.tflite", fp32),
        _entry(run.exports_dir, "tflite-int8", "tflite", "int8", "model_int8.tflite", tflite_bytes(model, calibration)),
        _entry(run.exports_dir, "tflite-tampered", "tflite", "fp32", "tampered.tflite", fp32),
        _entry(run.exports_dir, "tflite-truncated", "tflite", "fp32", "truncated.tflite", fp32[:4096]),
        {"name": "onnx-int8", "format": "onnx", "variant": "int8", "status": "failed", "error": "converter crashed",
         "path": None},
    ]
    (run.exports_dir / "tampered.tflite").write_bytes(_tamper(model, fp32))  # changed after export
    atomic_write_json(run.exports_dir / "manifest.json", {"artifacts": artifacts})
    proc = subprocess.run([sys.executable, "-c", VALIDATE_IN_FRESH_PROCESS, str(run.path), str(root / "out.pickle")],
                          capture_output=True, text=True, timeout=600, env=env_with_repo())
    assert proc.returncode == 0, proc.stderr
    out = pickle.loads((root / "out.pickle").read_bytes())
    result = out["result"]
    return {"run": run, "result": result, "rows": {r["name"]: r for r in result.report["artifacts"]},
            "log": "\n".join(out["log"]), "training_top1": test["top1"],
            "tensorflow_in_parent": out["tensorflow"]}


def test_the_validating_process_never_imports_tensorflow(validated):
    assert validated["rows"]["keras"]["status"] == "ok"  # the Keras row ran, in its own worker
    assert validated["tensorflow_in_parent"] == []


def test_every_artifact_has_a_row_with_the_same_keys(validated):
    report = validated["result"].report
    names = [r["name"] for r in report["artifacts"]]
    assert names == ["keras", "tflite-fp32", "openvino:tflite-fp32", "tflite-int8", "openvino:tflite-int8",
                     "tflite-tampered", "openvino:tflite-tampered", "tflite-truncated", "openvino:tflite-truncated"]
    assert len({tuple(sorted(r)) for r in report["artifacts"]}) == 1  # stable keys, null when not applicable
    assert report["skipped"] == [{"name": "onnx-int8", "format": "onnx", "variant": "int8", "status": "failed",
                                  "error": "converter crashed"}]
    folder = validated["run"].validation_dir
    for name in ("report.json", "report.md", "accuracy_vs_latency.png", "size_vs_accuracy.png", "confusion_matrix.png"):
        assert (folder / name).stat().st_size > 0
    assert read_json(folder / "report.json") == json.loads(json.dumps(report))
    assert not list(folder.glob(".*tmp*"))


def test_keras_top1_equals_training_metrics(validated):
    keras = validated["rows"]["keras"]
    assert keras["top1"] == validated["training_top1"]
    assert validated["result"].report["keras_matches_training"] is True
    assert keras["runtime"] == "tf_keras" and keras["input_dtype"] == "float32"


def test_fp32_tflite_agrees_with_keras(validated):
    row = validated["rows"]["tflite-fp32"]
    assert row["agreement"] == 1.0 and row["max_abs_prob_diff"] < 1e-4
    assert row["top1"] == validated["rows"]["keras"]["top1"] and row["gate"] == "pass"


def test_each_row_is_measured_in_its_own_runtime(validated):
    rows = validated["rows"]
    int8 = rows["tflite-int8"]
    assert int8["input_dtype"] == "uint8" and int8["runtime"] == "ai_edge_litert"
    for name in ("keras", "tflite-fp32", "tflite-int8"):
        row = rows[name]
        assert row["latency"]["runs"] == 5 and row["latency"]["batch"] == 1
        assert 0 < row["latency"]["p50_ms"] <= row["latency"]["p99_ms"]
        assert row["throughput"]["batch"] == 16 and row["throughput"]["images_per_s"] > 0
        assert row["load_time_s"] > 0 and row["gzip_bytes"] < row["size_bytes"] * 1.01
        assert set(row["per_class_recall"]) == set(validated["result"].report["data"]["classes"])
    # TFLite workers never import TensorFlow, so their peak memory is far below the Keras worker's.
    assert rows["tflite-fp32"]["peak_rss_mb"] < rows["keras"]["peak_rss_mb"] / 2
    assert int8["size_bytes"] < rows["tflite-fp32"]["size_bytes"] / 2


def test_broken_artifacts_trip_the_gates_by_name(validated):
    result, log = validated["result"], validated["log"]
    failed = {(f.artifact, f.gate) for f in result.failures}
    for runtime in ("", "openvino:"):
        assert (f"{runtime}tflite-tampered", "min_agreement") in failed
        assert (f"{runtime}tflite-truncated", "evaluation") in failed
    assert not {name for name, _ in failed} & {"keras", "tflite-fp32", "openvino:tflite-fp32"}
    assert not result.passed and result.report["gates"]["passed"] is False
    tampered = validated["rows"]["tflite-tampered"]
    assert tampered["agreement"] == 0.0 and tampered["gate"] == "fail" and tampered["modified_since_export"] is True
    assert validated["rows"]["tflite-truncated"]["status"] == "error"
    # 0 of 12 images: even the interval's top (26 %) is far below 70 %, so it fails beyond noise
    assert "GATE FAILED  tflite-tampered: agrees with Keras on 0.00% of images; min-agreement 70.00% missed by " \
           "70.00 pp beyond noise (95% interval: [0.00%, 26.46%])" in log
    assert "GATE FAILED  tflite-truncated: could not be evaluated" in log
    assert "warning  tflite-tampered: the file differs from the exported one" in log
    assert result.recommendation.artifact not in {"tflite-tampered", "tflite-truncated"}


def test_saved_report_reads_back_as_the_same_result(validated):
    again = load_validation(validated["run"].path)
    assert again.failures == validated["result"].failures
    assert again.recommendation == validated["result"].recommendation


def test_report_repeats_the_random_weights_warning_and_names_real_commands(validated):
    warning = RANDOM_FALLBACK["warning"]
    folder = validated["run"].validation_dir
    assert validated["result"].report["training_warning"] == warning
    assert read_json(folder / "report.json")["training_warning"] == warning
    markdown = (folder / "report.md").read_text(encoding="utf-8")
    assert f"> **{warning}** (recorded by training in metrics.json)" in markdown
    assert "edgetl edge" not in markdown and "run `edgetl bench` on the device for device numbers" in markdown
    lines = validated["log"].splitlines()  # the summary ends with the recommendation, then the warning
    assert lines.index(warning) == lines.index(validated["result"].recommendation.message) + 1


def test_report_without_a_training_warning_has_no_warning_text(validated):
    from edgetl.validate.report import render_markdown

    report = validated["result"].report
    quiet = {**report, "training_warning": None}
    warning = f"> **{report['training_warning']}** (recorded by training in metrics.json)\n\n"
    assert render_markdown(quiet) == render_markdown(report).replace(warning, "")
    assert format_summary(quiet) == format_summary(report).removesuffix(f"\n{report['training_warning']}")
    older = {k: v for k, v in quiet.items() if k != "training_warning"}  # written before the key existed
    assert format_summary(older) == format_summary(quiet) and render_markdown(older) == render_markdown(quiet)


def test_an_export_worker_imports_neither_tensorflow_nor_statsmodels(validated, tmp_path):
    """Each row's worker starts a fresh interpreter: only its runtime may load (statsmodels alone takes seconds)."""
    from edgetl.validate.worker import Job

    np.save(tmp_path / "images.npy", np.zeros((3, 32, 32, 3), np.uint8))
    job = Job("litert", str(validated["run"].exports_dir / "model_int8.tflite"), str(tmp_path / "images.npy"),
              str(tmp_path), threads=1, runs=2, warmup=0, batch_size=2)
    atomic_write_json(tmp_path / "job.json", dataclasses.asdict(job))
    code = ("import runpy, sys\n"
            "runpy.run_module('edgetl.validate.worker', run_name='__main__')\n"  # as `python -m` runs it
            f"print([m for m in {TENSORFLOW + ('statsmodels', 'scipy')!r} if m in sys.modules])\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "job.json")], capture_output=True, text=True,
                          timeout=120, env=env_with_repo())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]" and "found in sys.modules" not in proc.stderr
    result = read_json(tmp_path / "result.json")
    assert result["runtime"] == "ai_edge_litert" and result["input_dtype"] == "uint8"
    assert np.load(tmp_path / "probs.npy").shape == (3, 3)


def test_openvino_rows_measure_the_same_files_with_the_same_columns(validated):
    rows, report = validated["rows"], validated["result"].report
    for name in ("tflite-fp32", "tflite-int8"):
        litert, ov = rows[name], rows[f"openvino:{name}"]
        assert (litert["backend"], litert["runtime"], ov["backend"], ov["runtime"]) == (
            "litert", "ai_edge_litert", "openvino", "openvino")
        assert ov["path"] == litert["path"] and ov["sha256"] == litert["sha256"]  # the same file, another runtime
        assert ov["input_dtype"] == litert["input_dtype"] and ov["status"] == "ok"
        assert ov["latency"]["runs"] == 5 and ov["latency"]["batch"] == 1 and ov["throughput"]["batch"] == 16
    fp32 = rows["openvino:tflite-fp32"]
    assert fp32["agreement"] == 1.0 and fp32["max_abs_prob_diff"] < 1e-5 and fp32["gate"] == "pass"
    assert fp32["top1"] == rows["keras"]["top1"] and fp32["noise"]["verdict"] == "pass"
    assert rows["openvino:tflite-int8"]["agreement"] >= 0.75
    assert report["settings"]["runtimes"] == ["auto", "openvino"]
    assert report["settings"]["openvino_config"] == {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32",
                                                     "INFERENCE_NUM_THREADS": report["settings"]["threads"]}
    assert "OpenVINO on its CPU plugin (PERFORMANCE_HINT LATENCY" in (
        validated["run"].validation_dir / "report.md").read_text(encoding="utf-8")
    assert report["recommendation"]["artifact"] is not None
    assert set(report["pareto_front"]) <= {r["name"] for r in report["artifacts"] if r["status"] == "ok"}


def test_every_row_carries_its_paired_statistics(validated):
    rows, report = validated["rows"], validated["result"].report
    assert rows["keras"]["noise"] is None and rows["tflite-truncated"]["noise"] is None
    fp32 = rows["tflite-fp32"]["noise"]
    assert (fp32["n_images"], fp32["keras_only_correct"], fp32["artifact_only_correct"]) == (12, 0, 0)
    assert (fp32["delta_ci_low_pp"], fp32["delta_ci_high_pp"], fp32["mcnemar_p"]) == (0.0, 0.0, 1.0)
    assert (fp32["max_drop_pp"], fp32["min_agreement"], fp32["confidence"]) == (1.0, 0.7, 0.95)
    assert fp32["agreement_ci_low"] == pytest.approx(0.025 ** (1 / 12))  # 12 of 12 agree: >= 73.5 %, so >= 70 %
    tampered = rows["tflite-tampered"]["noise"]
    assert tampered["agreement_verdict"] == "fail" and tampered["disagreements"] == 12
    assert report["gates"]["inconclusive_policy"] == "warn" and report["gates"]["confidence"] == 0.95
    assert report["gates"]["unavailable"] == []
    line = next(x for x in validated["log"].splitlines() if x.startswith("tflite-fp32 "))
    assert "+0.00 pp [+0.00,+0.00]" in line and line.endswith("pass")
    assert "gates (max top-1 drop 1 pp vs Keras, min agreement 0.7; 95% paired intervals, inconclusive: warn): " \
           "FAILED for 4 artifact(s)" in validated["log"]


def test_missing_openvino_is_noted_and_the_other_rows_still_run(validated, tmp_path, monkeypatch):
    """`import openvino` fails in the workers (a package of that name that raises ImportError comes first on
    their PYTHONPATH): its rows carry the one-line pip install note and fail no gate.

    The Keras reference is stood in for by the fp32 file that agrees with it (tested above) on LiteRT, which
    saves a TensorFlow worker; the other rows run their real workers.
    """
    from edgetl.validate import worker

    measure = worker.measure

    def keras_as_fp32(job, *args):
        if job.runtime == worker.KERAS_RUNTIME:
            job = dataclasses.replace(job, runtime="litert", model=str(run.exports_dir / "model_fp32.tflite"))
        return measure(job, *args)

    monkeypatch.setattr(worker, "measure", keras_as_fp32)
    run = RunDir(tmp_path / "run")
    shutil.copytree(validated["run"].path, run.path, ignore=shutil.ignore_patterns("validation", "*.tflite"))
    manifest = read_json(run.exports_dir / "manifest.json")
    shutil.copy(validated["run"].exports_dir / "model_fp32.tflite", run.exports_dir)
    atomic_write_json(run.exports_dir / "manifest.json",
                      {"artifacts": [a for a in manifest["artifacts"] if a["name"] == "tflite-fp32"]})
    (tmp_path / "shadow" / "openvino").mkdir(parents=True)
    (tmp_path / "shadow" / "openvino" / "__init__.py").write_text("raise ImportError('simulated: not installed')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "shadow"))
    log: list[str] = []
    result = validate_run(run.path, runtimes=["auto", "openvino"], echo=log.append, **FAST)
    rows = {r["name"]: r for r in result.report["artifacts"]}
    assert list(rows) == ["keras", "tflite-fp32", "openvino:tflite-fp32"]
    assert rows["tflite-fp32"]["status"] == "ok" and rows["tflite-fp32"]["gate"] == "pass"
    missing = rows["openvino:tflite-fp32"]
    assert (missing["status"], missing["gate"], missing["error"]) == ("unavailable", "unavailable", MISSING_OPENVINO)
    assert result.passed and result.failures == [] and result.recommendation.artifact == "tflite-fp32"
    assert result.report["gates"]["unavailable"] == ["openvino:tflite-fp32"]
    lines = "\n".join(log).splitlines()
    assert [x for x in lines if MISSING_OPENVINO in x] == [f"  [3/3] openvino:tflite-fp32: not measured: {MISSING_OPENVINO}",
                                                         f"not measured  openvino:tflite-fp32: {MISSING_OPENVINO}"]
    assert "; 1 not measured (runtime not installed)" in "\n".join(log)
    assert format_table(result.report["artifacts"]).splitlines()[-1].endswith("n/a")


def test_validate_help_names_the_recipe_keys_it_defaults_to():
    from click.testing import CliRunner

    from edgetl.cli import cli

    result = CliRunner().invoke(cli, ["validate", "--help"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "default 1.0" not in text
    for key in ("threads", "runs", "warmup", "max_accuracy_drop", "min_agreement", "runtimes", "inconclusive",
                "confidence"):
        assert f"(recipe: validate.{key})" in text


def test_runtimes_are_checked_on_the_command_line_and_match_the_recipe_choices(tmp_path):
    import typing

    from click.testing import CliRunner

    from edgetl.cli import cli
    from edgetl.edge.runtime import RUNTIMES
    from edgetl.recipe import ValidateConfig

    result = CliRunner().invoke(cli, ["validate", str(tmp_path), "--runtimes", "auto,tvm"])
    assert result.exit_code == 2 and "tvm: choose from auto, litert, onnxruntime, openvino" in result.output
    field_type = typing.get_type_hints(ValidateConfig)["runtimes"]
    assert typing.get_args(typing.get_args(field_type)[0]) == RUNTIMES
    assert ValidateConfig().runtimes == ["auto"] and ValidateConfig().inconclusive == "warn"


def test_rows_per_runtime_and_their_names():
    from edgetl.validate.worker import row_name, runtimes_for

    assert runtimes_for("tflite") == ("litert",) and runtimes_for("onnx") == ("onnxruntime",)
    assert runtimes_for("tflite", ["auto", "openvino"]) == ("litert", "openvino")
    assert runtimes_for("onnx", ["openvino"]) == ("openvino",)
    assert runtimes_for("tflite", ["onnxruntime"]) == ()
    assert runtimes_for("keras", ["openvino"]) == ("tf_keras",)  # the reference is always measured
    assert runtimes_for("pt", ["openvino"]) == () and runtimes_for("pt") == ("auto",)
    assert row_name("litert", "tflite", "tflite-int8") == "tflite-int8"  # report.json names stay as they were
    assert row_name("openvino", "onnx", "onnx-fp32") == "openvino:onnx-fp32"
    assert row_name("auto", "pt", "model-pt") == "model-pt"


def test_data_with_other_classes_is_refused(validated, tmp_path):
    image = next(Path(validated["result"].report["data"]["root"]).rglob("*.png"))
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        for i in range(4):
            shutil.copy(image, tmp_path / name / f"{i}.png")
    with pytest.raises(ValidationError, match="classes"):
        validate_run(validated["run"].path, data_dir=tmp_path, echo=lambda *_: None)


# ---------------------------------------------------------------------------------------------------------
# Pure decisions on handmade tables


def _row(name, top1, p50, kb, *, agreement=1.0, status="ok", gate=None) -> dict:
    return {"name": name, "reference": name == "keras", "status": status, "error": None if status == "ok" else "boom",
            "top1": top1, "agreement": agreement, "size_bytes": int(kb * 1024), "gate": gate,
            "latency": {"p50_ms": p50}}


TABLE = [
    _row("keras", 0.90, 20.0, 9000),
    _row("fp32", 0.90, 5.0, 3000),
    _row("fp16", 0.90, 6.0, 1500),
    _row("dynamic", 0.89, 4.0, 800),
    _row("int8", 0.88, 2.0, 800),
    _row("int8-b", 0.88, 1.5, 800),
]


def test_check_gates_reports_each_gate_and_margin():
    rows = TABLE + [_row("bad", 0.70, 1.0, 500, agreement=0.6), _row("gone", None, None, 500, status="error")]
    failures = check_gates(rows, max_accuracy_drop=1.0, min_agreement=0.8)
    got = {(f.artifact, f.gate): f for f in failures}
    assert set(got) == {("int8", "max_accuracy_drop"), ("int8-b", "max_accuracy_drop"), ("bad", "max_accuracy_drop"),
                        ("bad", "min_agreement"), ("gone", "evaluation")}
    assert got[("bad", "max_accuracy_drop")].excess == pytest.approx(19.0)
    assert got[("bad", "min_agreement")].excess == pytest.approx(0.2)
    assert got[("int8", "max_accuracy_drop")].message.startswith("int8: top-1 88.00% is 2.00 pp below Keras")
    assert check_gates(TABLE, max_accuracy_drop=2.0, min_agreement=0.0) == []
    assert all(isinstance(f, GateFailure) for f in failures)


def test_recommend_most_accurate_then_smaller_then_faster():
    assert recommend(TABLE).artifact == "fp16"  # 90% ties: fp16 is smaller than fp32; Keras is the reference
    assert recommend(TABLE, budget_latency_ms=5.5).artifact == "fp32"
    assert recommend(TABLE, budget_size_kb=1000).artifact == "dynamic"
    assert recommend(TABLE, budget_latency_ms=3, budget_size_kb=1000).artifact == "int8-b"  # equal size: faster
    tie = [_row("keras", 0.9, 9, 9), _row("a", 0.8, 2.0, 700), _row("b", 0.8, 1.0, 700), _row("c", 0.8, 0.5, 900)]
    assert recommend(tie).artifact == "b"


def test_recommend_says_when_nothing_fits_and_names_the_closest():
    choice = recommend(TABLE, budget_latency_ms=1.0, budget_size_kb=700)
    assert choice.artifact is None and not choice.within_budget
    assert choice.closest == "int8-b"  # worst overrun 1.5x (latency); int8 2x, dynamic 4x
    assert choice.message.startswith("no artifact fits the budget (<= 1 ms p50 latency and <= 700 KB); closest: int8-b")
    assert "1.50x the budget" in choice.message
    assert recommend(TABLE, budget_latency_ms=1.0, budget_size_kb=100).closest == "dynamic"  # 8x each: most accurate
    gated = [dict(r, gate="fail") if r["name"] == "fp16" else r for r in TABLE]
    assert recommend(gated).artifact == "fp32"
    assert recommend([TABLE[0]]).artifact is None


def test_pareto_front_keeps_only_undominated_points():
    assert pareto_front(TABLE) == ["int8-b", "dynamic", "fp32"]


def test_format_table_is_plain_aligned_text_with_keras_first():
    rows = [dict(_row("keras", 0.9, 20.0, 9000), input_dtype="float32", top5=1.0, top5_k=3, delta_top1_pp=0.0,
                 max_abs_prob_diff=0.0, throughput=None, load_time_s=1.0, gzip_bytes=100, peak_rss_mb=700.0,
                 gate="reference"),
            dict(_row("tflite-int8", 0.85, 1.234, 500), input_dtype="uint8", top5=1.0, top5_k=3, delta_top1_pp=-5.0,
                 max_abs_prob_diff=0.25, throughput={"images_per_s": 900.0}, load_time_s=0.01, gzip_bytes=400,
                 peak_rss_mb=60.0, gate="fail")]
    lines = format_table(rows).splitlines()
    assert lines[0].split()[:5] == ["artifact", "input", "top-1", "vs", "keras"] and "top-3" in lines[0]
    assert lines[1].startswith("keras ") and " ref " in lines[1]
    assert lines[2].startswith("tflite-int8") and "-5.00 pp" in lines[2] and "1.23" in lines[2]
    assert lines[2].endswith("FAIL") and "\x1b" not in "".join(lines)
    assert len({len(line) for line in lines}) == 1


def test_recommendation_and_front_span_runtimes():
    table = [dict(r, backend=b) for r, b in [
        (_row("keras", 0.90, 20.0, 9000), "tf_keras"),
        (_row("tflite-fp32", 0.90, 6.8, 3000), "litert"),
        (_row("openvino:tflite-fp32", 0.90, 4.9, 3000), "openvino"),
        (_row("onnx-fp32", 0.90, 7.7, 3100), "onnxruntime"),
        (_row("openvino:onnx-fp32", 0.90, 4.8, 3100), "openvino"),
        (_row("onnx-int8", 0.88, 5.7, 900), "onnxruntime"),
        (_row("openvino:onnx-int8", 0.88, 10.6, 900), "openvino"),
    ]]
    assert recommend(table).artifact == "openvino:tflite-fp32"  # 90 %: the smaller file, on its faster runtime
    choice = recommend(table, budget_latency_ms=5.0)
    assert choice.artifact == "openvino:tflite-fp32" and "most accurate of 2 within <= 5 ms" in choice.message
    no_tflite = [r for r in table if "tflite" not in r["name"]]
    assert recommend(no_tflite, budget_latency_ms=5.0).artifact == "openvino:onnx-fp32"  # "onnx-fp32 on OpenVINO"
    assert pareto_front(table) == ["openvino:onnx-fp32"]
    assert pareto_front(no_tflite + [dict(_row("tflite-int8", 0.88, 2.0, 800), backend="litert")]) == [
        "tflite-int8", "openvino:onnx-fp32"]


def _scored_rows(cases: dict[str, tuple[list[int], list[int]]], labels: list[int], **bounds) -> list[dict]:
    """Report rows through the real scoring: a Keras reference and one row per case (its predicted classes),
    each given as (predictions, unused) one-hot scores on the same labelled images."""
    from edgetl.validate.score import Artifact, score_rows
    from edgetl.validate.worker import Output

    def out(pred):
        return Output(None, {"latency": {"p50_ms": 1.0}}, np.eye(3, dtype=np.float32)[pred])

    arts = [Artifact(name, "tflite", None, Path("missing.tflite"), "missing.tflite", None, reference=name == "keras")
            for name in cases]
    return score_rows(arts, [out(pred) for pred, _ in cases.values()], np.asarray(labels), ["a", "b", "c"],
                      **bounds)


# 20 images, Keras right on all of them; the artifact misses image 0: -5 pp on a 1 pp gate, one discordant image.
LABELS = [i % 3 for i in range(20)]
ONE_MISS = [1] + LABELS[1:]


def test_inconclusive_on_a_small_set_where_the_point_gate_fails():
    from edgetl.validate.decide import mark_gates

    rows = _scored_rows({"keras": (LABELS, None), "int8": (ONE_MISS, None)}, LABELS, max_drop_pp=1.0,
                        min_agreement=0.0)
    noise = rows[1]["noise"]
    assert noise["delta_top1_pp"] == pytest.approx(-5.0) and noise["drop_verdict"] == "inconclusive"
    assert noise["delta_ci_low_pp"] == pytest.approx(-5.0) and noise["delta_ci_high_pp"] == pytest.approx(4.75)
    point = check_gates(rows, 1.0, 0.0, inconclusive="point")
    assert [(f.artifact, f.gate, f.verdict) for f in point] == [("int8", "max_accuracy_drop", None)]
    assert check_gates(rows, 1.0, 0.0, inconclusive="warn") == []
    warned = mark_gates(rows, [], "warn")
    assert warned[1]["gate"] == "inconclusive"
    cells = format_table(warned).splitlines()[2]
    assert "-5.00 pp [-5.00,+4.75]" in cells and cells.endswith("inconclusive")
    failed = check_gates(rows, 1.0, 0.0, inconclusive="fail")
    assert [(f.artifact, f.gate, f.verdict) for f in failed] == [("int8", "max_accuracy_drop", "inconclusive")]
    assert f"inconclusive (~{noise['drop_images_needed']:,} test images would settle it), counted as failed" \
           in failed[0].message
    assert mark_gates(rows, failed, "fail")[1]["gate"] == "fail"
    with pytest.raises(ValueError, match="inconclusive policy"):
        check_gates(rows, 1.0, 0.0, inconclusive="maybe")


def test_point_policy_reproduces_the_point_estimate_gate():
    from edgetl.validate.decide import mark_gates

    rows = _scored_rows({"keras": (LABELS, None), "int8": (ONE_MISS, None), "fp32": (LABELS, None)}, LABELS,
                        max_drop_pp=1.0, min_agreement=0.97)
    old = check_gates([{k: v for k, v in r.items() if k != "noise"} for r in rows], 1.0, 0.97)  # rows without noise
    point = check_gates(rows, 1.0, 0.97, inconclusive="point")
    assert point == old and {(f.artifact, f.gate) for f in point} == {("int8", "max_accuracy_drop"),
                                                                       ("int8", "min_agreement")}
    assert point[0].message == "int8: top-1 95.00% is 5.00 pp below Keras (100.00%); max-accuracy-drop 1 pp " \
                               "exceeded by 4.00 pp"
    assert [r["gate"] for r in mark_gates(rows, point, "point")] == ["reference", "fail", "pass"]
    # 20 of 20 agreeing images cannot show agreement >= 97 % either (the interval reaches down to 83 %)
    assert [r["gate"] for r in mark_gates(rows, check_gates(rows, 1.0, 0.97, "warn"), "warn")] == [
        "reference", "inconclusive", "inconclusive"]


def test_recommend_prefers_pass_over_inconclusive():
    from edgetl.validate.noise import paired_gate

    # 1000 images, Keras 90 %: `wide` equals Keras but 40 discordant images leave +-1.3 pp (inconclusive for
    # a 1 pp gate); `tight` is 0.3 pp worse, all three misses one way, so its drop is below 1 pp beyond noise.
    wide = dict(_row("wide", 0.90, 2.0, 800, gate="inconclusive"),
                noise=paired_gate(1000, 20, 20, max_drop_pp=1.0).to_dict())
    tight = dict(_row("tight", 0.897, 3.0, 800, gate="pass"), noise=paired_gate(1000, 3, 0, max_drop_pp=1.0).to_dict())
    assert (wide["noise"]["verdict"], tight["noise"]["verdict"]) == ("inconclusive", "pass")
    table = [_row("keras", 0.90, 20.0, 9000, gate="reference"), wide, tight]
    assert recommend(table).artifact == "tight"
    alone = recommend([table[0], wide])
    assert alone.artifact == "wide" and "gate inconclusive" in alone.message
    assert recommend(table, budget_latency_ms=2.5).artifact == "wide"  # the only one within budget


def test_noise_per_head_of_a_multi_task_row():
    from edgetl.validate.decide import mark_gates
    from edgetl.validate.score import Artifact, score_rows
    from edgetl.validate.worker import Output

    eye = np.eye(3, dtype=np.float32)
    heads = {"species": (np.asarray(LABELS), ["a", "b", "c"]), "color": (np.asarray(LABELS), ["x", "y", "z"])}

    def out(species, color):
        return Output(None, {}, eye[species], {"species": eye[species], "color": eye[color]})

    arts = [Artifact(n, "tflite", None, Path("none.tflite"), "none.tflite", None, reference=n == "keras")
            for n in ("keras", "int8")]
    rows = score_rows(arts, [out(LABELS, LABELS), out(LABELS, ONE_MISS)], np.asarray(LABELS), ["a", "b", "c"],
                      heads, max_drop_pp=1.0, min_agreement=0.0)
    assert rows[1]["noise"] == rows[1]["heads"]["species"]["noise"]  # the row's figures are the primary head's
    assert rows[1]["noise"]["verdict"] == "pass" and rows[1]["heads"]["color"]["noise"]["verdict"] == "inconclusive"
    assert rows[0]["heads"]["color"]["noise"] is None
    assert mark_gates(rows, check_gates(rows, 1.0, 0.0, "warn"), "warn")[1]["gate"] == "inconclusive"
    assert [f.head for f in check_gates(rows, 1.0, 0.0, "fail")] == ["color"]

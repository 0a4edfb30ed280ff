"""Validation harness: every artifact of a tiny run on the same images, gates, recommendation, report files.

ONNX rows are covered by tests/test_pipeline.py (its export stage produces onnx-fp32).
"""
from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgetl.io import atomic_write_json, read_json
from edgetl.rundir import RunDir
from edgetl.validate import (GateFailure, ValidationError, check_gates, format_table, load_validation, pareto_front,
                             recommend, validate_run)

FAST = {"runs": 5, "warmup": 1}


def _tflite(model, train_images=None) -> bytes:
    """fp32 TFLite, or full-integer with uint8 input/output calibrated on `train_images`.

    Converted from a concrete function without the model as trackable object: no SavedModel export, ~20x faster.
    """
    import tensorflow as tf

    size = model.input_shape[1]
    call = tf.function(lambda x: model(x, training=False))
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [call.get_concrete_function(tf.TensorSpec((None, size, size, 3), tf.float32))])
    if train_images is not None:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([img[None].astype(np.float32)] for img in train_images)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = converter.inference_output_type = tf.uint8
    return converter.convert()


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


@pytest.fixture(scope="module")
def validated(tiny_run, tmp_path_factory):
    """A copy of the shared tiny run with four exports (two of them broken), one failed export, and one validation."""
    from edgetl.data import load_arrays, load_splits

    run = RunDir(tmp_path_factory.mktemp("validate") / "run")
    shutil.copytree(tiny_run.run_dir, run.path)
    recipe, model = run.load_recipe(), run.load_model()
    calibration, _ = load_arrays(load_splits(recipe).train[:16], 32)
    run.exports_dir.mkdir()
    fp32 = _tflite(model)
    artifacts = [
        _entry(run.exports_dir, "tflite-fp32", "tflite", "fp32", "model_fp32.tflite", fp32),
        _entry(run.exports_dir, "tflite-int8", "tflite", "int8", "model_int8.tflite", _tflite(model, calibration)),
        _entry(run.exports_dir, "tflite-tampered", "tflite", "fp32", "tampered.tflite", fp32),
        _entry(run.exports_dir, "tflite-truncated", "tflite", "fp32", "truncated.tflite", fp32[:4096]),
        {"name": "onnx-int8", "format": "onnx", "variant": "int8", "status": "failed", "error": "converter crashed",
         "path": None},
    ]
    (run.exports_dir / "tampered.tflite").write_bytes(_tamper(model, fp32))  # changed after export
    atomic_write_json(run.exports_dir / "manifest.json", {"artifacts": artifacts})
    log: list[str] = []
    result = validate_run(run.path, min_agreement=0.9, echo=log.append, **FAST)
    return {"run": run, "result": result, "rows": {r["name"]: r for r in result.report["artifacts"]},
            "log": "\n".join(log), "training_top1": tiny_run.metrics["test"]["top1"]}


def test_every_artifact_has_a_row_with_the_same_keys(validated):
    report = validated["result"].report
    names = [r["name"] for r in report["artifacts"]]
    assert names == ["keras", "tflite-fp32", "tflite-int8", "tflite-tampered", "tflite-truncated"]
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
    assert ("tflite-tampered", "min_agreement") in failed
    assert ("tflite-truncated", "evaluation") in failed
    assert not {name for name, _ in failed} & {"keras", "tflite-fp32"}
    assert not result.passed and result.report["gates"]["passed"] is False
    tampered = validated["rows"]["tflite-tampered"]
    assert tampered["agreement"] == 0.0 and tampered["gate"] == "fail" and tampered["modified_since_export"] is True
    assert validated["rows"]["tflite-truncated"]["status"] == "error"
    assert "GATE FAILED  tflite-tampered: agrees with Keras on 0.00% of images; min-agreement 90.00% missed by " \
           "90.00 pp" in log
    assert "GATE FAILED  tflite-truncated: could not be evaluated" in log
    assert "warning  tflite-tampered: the file differs from the exported one" in log
    assert result.recommendation.artifact not in {"tflite-tampered", "tflite-truncated"}


def test_saved_report_reads_back_as_the_same_result(validated):
    again = load_validation(validated["run"].path)
    assert again.failures == validated["result"].failures
    assert again.recommendation == validated["result"].recommendation


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

"""The per-layer int8 report: it names a deliberately damaged layer as the worst, for TFLite and ONNX."""
from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from quant_support import DAMAGED, make_damaged_run


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """(run dir, ExportInputs) of the damaged run."""
    from edgetl.export.inputs import ExportInputs
    from edgetl.rundir import RunDir

    run = RunDir(make_damaged_run(tmp_path_factory.mktemp("damaged")))
    return run, ExportInputs(run, run.load_recipe())


def test_tflite_report_names_the_damaged_layer_worst(damaged, tmp_path):
    from edgetl.export.quant_debug import TfliteQuantizer, ranked
    from edgetl.export.tflite import saved_model

    run, inputs = damaged
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        layers = TfliteQuantizer(saved_model(inputs.model, inputs, tmp_path / "sm").path, inputs.calibration).report()
    assert not [w for w in seen if "tf.lite.Interpreter is deprecated" in str(w.message)
                or "preserve_all_tensors" in str(w.message)]  # the debugger's own noise stays out of the output
    worst, runner_up = ranked(layers)[:2]
    assert DAMAGED in worst.name and worst.op == "FULLY_CONNECTED"
    assert worst.snr_db < 3 and runner_up.snr_db > 20  # crushed (about 0 dB) against ordinary int8 rounding
    assert [layer.depth for layer in layers] == list(range(len(layers))) and len(layers) >= 5


def test_onnx_report_names_the_damaged_node_worst(damaged):
    from edgetl.export.onnx import fp32_graph
    from edgetl.export.quant_debug import OnnxQuantizer, ranked

    run, inputs = damaged
    with OnnxQuantizer(fp32_graph(inputs.model, inputs, None), inputs.calibration) as quantizer:
        full, settings = quantizer.quantize()
        layers = quantizer.report(full)
    worst, runner_up = ranked(layers)[:2]
    assert DAMAGED in worst.name and worst.op in ("Gemm", "MatMul") and settings["nodes_to_exclude"] == []
    assert worst.snr_db < 3 and runner_up.snr_db > worst.snr_db + 6


def test_write_report_is_json_and_png_with_the_worst_first(tmp_path):
    from edgetl.export.quant_debug import LayerError, write_report

    layers = [LayerError(0, "a", "CONV_2D", 40.0), LayerError(1, "b", "CONV_2D", 2.0),
              LayerError(2, "c", "MEAN", math.inf)]
    summary = write_report(tmp_path, "tflite-int8", layers, images=8, source="test")
    report = json.loads((tmp_path / summary["report"]).read_text())
    assert [w["name"] for w in report["worst"]] == ["b", "a", "c"] and report["layers"][2]["snr_db"] is None
    assert summary["worst"][0] == {"name": "b", "snr_db": 2.0}
    assert (tmp_path / summary["plot"]).read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in (tmp_path / "quantization").iterdir()) == ["tflite-int8.json", "tflite-int8.png"]


def test_snr_db_edges():
    from edgetl.export.quant_debug import snr_db

    assert snr_db(1.0, 0.0) == math.inf and snr_db(0.0, 1.0) == -math.inf
    assert snr_db(100.0, 1.0) == pytest.approx(20.0) and np.isclose(snr_db(1.0, 1.0), 0.0)


def test_plain_int8_exports_write_their_report_and_manifest_summary(tiny_export):
    from pathlib import Path

    exports = Path(tiny_export.run_dir) / "exports"
    found = {a["name"]: a for a in tiny_export.result.manifest["artifacts"]}
    for name in ("tflite-int8", "onnx-int8"):
        summary = found[name]["quantization"]["layer_report"]
        report = json.loads((exports / summary["report"]).read_text())
        assert summary["report"] == f"quantization/{name}.json" and (exports / summary["plot"]).stat().st_size > 1000
        assert report["artifact"] == name and report["images"] == 24 and summary["layers"] == len(report["layers"]) >= 4
        assert summary["worst"][0]["name"] == report["worst"][0]["name"]
    assert {p.stem for p in (exports / "quantization").glob("*.json")} == {"tflite-int8", "onnx-int8"}


def test_quant_report_prints_an_artifacts_worst_layers(tiny_export, tmp_path):
    from click.testing import CliRunner

    from edgetl.cli import cli

    artifact = tiny_export.run_dir / "exports" / "tflite-int8.tflite"
    done = CliRunner().invoke(cli, ["quant-report", str(artifact), "--top", "2", "--json", str(tmp_path / "r.json")])
    assert done.exit_code == 0, done.output
    (report,) = json.loads((tmp_path / "r.json").read_text())
    rows = [line.split() for line in done.output.splitlines()[2:-1]]  # after the title and header, before "JSON written"
    assert [row[0] for row in rows] == ["1", "2"]  # --top 2, ranked
    worst = report["worst"][0]
    assert rows[0][-1] == worst["name"] and float(rows[0][2]) == pytest.approx(worst["snr_db"], abs=0.05)
    assert done.output.startswith("tflite-int8: ")
    refused = CliRunner().invoke(cli, ["quant-report", str(artifact.with_name("tflite-fp32.tflite"))])
    assert refused.exit_code == 1 and "no per-layer report" in refused.output and "Traceback" not in refused.output


def test_quant_report_computes_a_missing_report_like_the_export(tiny_export, tmp_path):
    import shutil

    from click.testing import CliRunner

    from edgetl.cli import cli

    run = tmp_path / "run"
    shutil.copytree(tiny_export.run_dir, run, ignore=shutil.ignore_patterns("quantization", "*fp*", "*qat*", "*prun*"))
    done = CliRunner().invoke(cli, ["quant-report", str(run), "--json", str(tmp_path / "r.json")])
    assert done.exit_code == 0, done.output
    computed = {r["artifact"]: r for r in json.loads((tmp_path / "r.json").read_text())}
    assert set(computed) == {"tflite-int8", "onnx-int8"} and done.output.count("computing the per-layer report") == 2
    for name, report in computed.items():
        exported = json.loads((tiny_export.run_dir / "exports" / "quantization" / f"{name}.json").read_text())
        assert [e["name"] for e in report["layers"]] == [e["name"] for e in exported["layers"]]
        assert [e["snr_db"] for e in report["layers"]] == pytest.approx([e["snr_db"] for e in exported["layers"]],
                                                                        abs=0.5)
        assert (run / "exports" / "quantization" / f"{name}.png").exists()

"""Work in a spawned process (edgetl.isolate): progress streamed back live, results and errors returned, and the
export run group by group in such processes."""
from __future__ import annotations

import os
import shutil

import pytest

from edgetl.isolate import ChildDied, ChildFailed, run_in_child
from edgetl.recipe import RecipeError


def _work(count, echo):
    for i in range(count):
        echo(f"step {i}")
    return {"pid": os.getpid(), "count": count}


def _user_error(echo):
    raise RecipeError("recipe.yaml: train.stage1.epochs must be >= 0; set it to 0 to skip the stage")


def _bug(echo):
    return {}["missing"]


def _killed(echo):
    echo("about to die")
    os._exit(9)


def test_child_streams_progress_and_returns_its_result():
    lines = []
    result = run_in_child(_work, (3,), lines.append, "a test")
    assert lines == ["step 0", "step 1", "step 2"]
    assert result["count"] == 3 and result["pid"] != os.getpid()


def test_expected_errors_come_back_as_themselves_and_bugs_with_their_traceback():
    with pytest.raises(RecipeError, match="train.stage1.epochs must be >= 0"):
        run_in_child(_user_error, (), print, "a test")
    with pytest.raises(ChildFailed, match=r"(?s)Traceback.*in _bug.*KeyError: 'missing'"):
        run_in_child(_bug, (), print, "a test")


def test_a_child_that_dies_is_an_error_naming_the_work():
    lines = []
    with pytest.raises(ChildDied, match=r"the process of the export ended without finishing \(exit code 9"):
        run_in_child(_killed, (), lines.append, "the export")
    assert lines == ["about to die"]


def test_isolated_export_runs_a_process_per_group_and_writes_one_manifest(tiny_export, tmp_path):
    """Two groups (a TFLite and an ONNX row): each in its own process, one manifest, progress in the parent."""
    from edgetl.export import export_run, groups
    from edgetl.io import read_json
    from edgetl.variants import select

    run = tmp_path / "run"
    shutil.copytree(tiny_export.run_dir, run, ignore=shutil.ignore_patterns("exports"))
    lines = []
    result = export_run(run, tflite=["fp32", "qat_int8"], onnx=["fp32"], echo=lines.append, isolate=True)
    assert [[v.key for v in g] for g in groups(select({"tflite": ["fp32", "qat_int8"], "onnx": ["fp32"]}))] == [
        ["tflite-fp32"], ["tflite-qat_int8"], ["onnx-fp32"]]
    assert [a["name"] for a in result.manifest["artifacts"]] == ["tflite-fp32", "tflite-qat_int8", "onnx-fp32"]
    assert all(a["status"] == "ok" for a in result.manifest["artifacts"]) and not result.failed
    assert read_json(run / "exports" / "manifest.json")["artifacts"] == result.manifest["artifacts"]
    assert "qat" in result.manifest["preparation"]  # a child's preparation report reaches the manifest
    assert [line for line in lines if line.startswith("exporting")] == [
        "exporting tflite-fp32 ...", "exporting tflite-qat_int8 ...", "exporting onnx-fp32 ..."]
    assert sorted(p.name for p in (run / "exports").iterdir()) == [
        "labels.txt", "manifest.json", "onnx-fp32.onnx", "tflite-fp32.tflite", "tflite-qat_int8.tflite"]

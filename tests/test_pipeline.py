"""`edgetl run`: train -> export -> validate in one call, resuming finished stages and restarting interrupted ones."""
from __future__ import annotations

import json
import shutil

import pytest
import yaml
from conftest import tiny_recipe_dict

import edgetl.training
import edgetl.validate
from edgetl.io import read_json
from edgetl.pipeline import MARKER, STAGES, PipelineError, default_run_dir, resolve_data_source, run_pipeline
from edgetl.recipe import load_recipe
from edgetl.rundir import RunDir


class Interrupted(BaseException):
    """Stands in for Ctrl-C / a killed process in the middle of a stage."""


@pytest.fixture(scope="module")
def recipe_path(tiny_data, tmp_path_factory):
    """A tiny recipe: one short training stage, one ONNX export, fast latency settings."""
    raw = tiny_recipe_dict(tiny_data, train={"stage1": {"epochs": 2, "learning_rate": 0.01}, "stage2": {"epochs": 0}},
                           export={"tflite": [], "onnx": ["fp32"]}, validate={"runs": 5, "warmup": 1})
    raw["name"] = "pipe"
    path = tmp_path_factory.mktemp("recipes") / "pipe.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def first(recipe_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("models")
    log: list[str] = []
    result = run_pipeline(recipe_path, out_root=out, echo=log.append)
    return {"result": result, "out": out, "log": "\n".join(log), "run": RunDir(result.run_dir)}


def _mtimes(run: RunDir) -> dict:
    return {p: p.stat().st_mtime_ns for p in (run.model_path, run.metrics_path, run.exports_dir / "manifest.json",
                                              run.validation_dir / "report.json")}


def test_first_run_trains_exports_and_validates(first, recipe_path):
    result, run = first["result"], first["run"]
    recipe = load_recipe(recipe_path)
    recipe = resolve_data_source(recipe)
    assert result.ran == list(STAGES) and result.skipped == []
    assert run.path == default_run_dir(first["out"], recipe) and run.path.name == f"run-{recipe.fingerprint()}"
    assert run.load_recipe().fingerprint() == recipe.fingerprint()  # recipe.yaml reproduces the run's identity
    marker = read_json(run.path / MARKER)
    assert set(marker["stages"]) == set(STAGES)
    assert all(s["fingerprint"] == recipe.fingerprint() for s in marker["stages"].values())
    rows = result.validation.report["artifacts"]
    assert [r["name"] for r in rows] == ["keras", "onnx-fp32"]
    assert rows[0]["top1"] == read_json(run.metrics_path)["test"]["top1"]
    assert rows[1]["runtime"] == "onnxruntime" and rows[1]["agreement"] == 1.0 and rows[1]["max_abs_prob_diff"] < 1e-4
    assert result.passed and result.export_failed == []
    assert "== train" in first["log"] and "stage 1 (feature extraction)" in first["log"]
    assert first["log"].rstrip().splitlines()[-1].startswith("report: ")


def test_rerun_skips_every_finished_stage(first, recipe_path):
    before = _mtimes(first["run"])
    log: list[str] = []
    again = run_pipeline(recipe_path, out_root=first["out"], echo=log.append)
    text = "\n".join(log)
    assert again.run_dir == first["run"].path
    assert again.ran == [] and again.skipped == list(STAGES)
    assert _mtimes(first["run"]) == before  # nothing retrained, re-exported or re-validated
    assert "stage 1" not in text and "exporting" not in text and "== train: done earlier" in text
    assert "keras" in text and "gates (" in text  # the stored validation table is printed again
    assert again.passed and again.validation.report == first["result"].validation.report


def test_interrupted_stage_is_cleaned_and_restarted(first, recipe_path, monkeypatch):
    run = first["run"]
    before = _mtimes(run)
    report = (run.validation_dir / "report.json").read_bytes()
    calls = []

    def crash(run_dir, **_):
        RunDir(run_dir).validation_dir.mkdir()
        (RunDir(run_dir).validation_dir / "half-written.png").write_bytes(b"partial")
        raise Interrupted

    def finish(run_dir, **_):  # stands in for a real validation (tested above): records what it found
        calls.append(sorted(p.name for p in RunDir(run_dir).validation_dir.glob("*")))
        RunDir(run_dir).validation_dir.mkdir()
        (RunDir(run_dir).validation_dir / "report.json").write_bytes(report)
        return edgetl.validate.load_validation(run_dir)

    marker = read_json(run.path / MARKER)
    del marker["stages"]["validate"]  # as if the first validation had never finished
    (run.path / MARKER).write_text(json.dumps(marker))
    monkeypatch.setattr(edgetl.validate, "validate_run", crash)
    with pytest.raises(Interrupted):
        run_pipeline(recipe_path, out_root=first["out"], echo=lambda *_: None)
    assert "validate" not in read_json(run.path / MARKER)["stages"]
    assert (run.validation_dir / "half-written.png").exists()

    monkeypatch.setattr(edgetl.validate, "validate_run", finish)
    log: list[str] = []
    resumed = run_pipeline(recipe_path, out_root=first["out"], echo=log.append)
    assert resumed.skipped == ["train", "export"] and resumed.ran == ["validate"]
    assert calls == [[]]  # the partial outputs were removed before the stage started again
    assert "removing unfinished or outdated outputs: validation" in "\n".join(log)
    after = _mtimes(run)
    assert [after[p] == before[p] for p in before] == [True, True, True, False]
    assert set(read_json(run.path / MARKER)["stages"]) == set(STAGES)


def test_isolated_stage_runs_in_its_own_process_and_reraises_its_errors(first, recipe_path, tmp_path):
    run = first["run"]
    marker = read_json(run.path / MARKER)
    del marker["stages"]["validate"]
    (run.path / MARKER).write_text(json.dumps(marker))
    resumed = run_pipeline(recipe_path, out_root=first["out"], echo=print, isolate=True)
    assert resumed.ran == ["validate"] and resumed.passed
    assert resumed.validation.report["artifacts"][1]["agreement"] == 1.0
    assert resumed.validation.report["created"] != first["result"].validation.report["created"]  # re-validated
    bad = tmp_path / "bad.yaml"  # a data error raised in the child surfaces here, as the same exception type
    bad.write_text(recipe_path.read_text(encoding="utf-8"), encoding="utf-8")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(Exception, match="no class folders found") as info:
        run_pipeline(bad, data_dir=tmp_path / "nothing", out_root=tmp_path / "m", echo=print, isolate=True)
    assert type(info.value).__module__.startswith("edgetl")


def test_interrupted_training_starts_the_run_over(first, tmp_path, recipe_path, monkeypatch):
    run_dir = tmp_path / "run"
    shutil.copytree(first["run"].path, run_dir)
    marker = read_json(run_dir / MARKER)
    marker["stages"] = {}
    (run_dir / MARKER).write_text(json.dumps(marker))
    seen = {}

    def fake_train(recipe, run_dir=None, **_):
        seen["left"] = sorted(p.name for p in run_dir.iterdir())
        raise Interrupted

    monkeypatch.setattr(edgetl.training, "train", fake_train)
    with pytest.raises(Interrupted):
        run_pipeline(recipe_path, run_dir=run_dir, echo=lambda *_: None)
    assert seen["left"] == [MARKER]  # model, exports and validation of the unfinished run are gone


def test_changed_recipe_gets_a_new_run_and_is_said(first, recipe_path, monkeypatch):
    def fake_train(recipe, run_dir=None, **_):
        raise Interrupted

    monkeypatch.setattr(edgetl.training, "train", fake_train)
    log: list[str] = []
    with pytest.raises(Interrupted):
        run_pipeline(recipe_path, overrides=["train.stage1.epochs=3"], out_root=first["out"], echo=log.append)
    assert f"recipe changed since {first['run'].path}" in "\n".join(log)
    with pytest.raises(PipelineError, match="the recipe changed"):
        run_pipeline(recipe_path, overrides=["train.stage1.epochs=3"], run_dir=first["run"].path)


def test_data_dir_is_part_of_the_run_identity(recipe_path, tiny_data, tmp_path, monkeypatch):
    default = load_recipe(recipe_path)
    default = resolve_data_source(default)
    same = load_recipe(recipe_path)
    monkeypatch.chdir(tiny_data.parent)
    same = resolve_data_source(same, tiny_data.name)  # a relative --data naming the same folder
    other = load_recipe(recipe_path)
    other = resolve_data_source(other, tmp_path)
    assert default.fingerprint() == same.fingerprint() != other.fingerprint()
    assert default_run_dir("m", default) != default_run_dir("m", other)


def test_refuses_a_folder_it_did_not_make(recipe_path, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(PipelineError, match="not made by `edgetl run`"):
        run_pipeline(recipe_path, run_dir=tmp_path)
    assert (tmp_path / "notes.txt").exists()

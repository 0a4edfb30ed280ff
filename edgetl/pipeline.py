"""`edgetl run RECIPE`: train -> export -> validate in one command, resuming where an earlier run stopped.

The run directory is named by the recipe's fingerprint (`<out>/<name>/run-<fingerprint>`, the data
source included), so running the same recipe again finds it, and a changed recipe gets a new one. A
stage is done when its outputs exist and `<run>/.stages.json` records it as finished for this
fingerprint. The record is written atomically after the stage, so an interrupted stage is detected: its
partial outputs are removed and it runs again, followed by every later stage.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from edgetl.errors import EdgetlError
from edgetl.io import atomic_write_json, read_json
from edgetl.rundir import RunDir

STAGES = ("train", "export", "validate")
MARKER = ".stages.json"

if TYPE_CHECKING:
    from edgetl.validate import ValidationResult


class PipelineError(EdgetlError, ValueError):
    """A run directory the pipeline must not touch; the message says why and what to do instead."""


@dataclass
class PipelineResult:
    """The run directory, which stages ran or were skipped, export variants that failed, and the validation."""

    run_dir: Path
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    export_failed: list[str] = field(default_factory=list)
    validation: ValidationResult | None = None

    @property
    def passed(self) -> bool:
        """True when every artifact passed the validation gates."""
        return self.validation is not None and self.validation.passed


def default_run_dir(out_root, recipe) -> Path:
    """`<out_root>/<recipe name>/run-<recipe fingerprint>`: the same recipe always maps to the same folder."""
    return Path(out_root) / recipe.name / f"run-{recipe.fingerprint()}"


def resolve_data_source(recipe, data_dir=None):
    """A copy of `recipe` whose data source is `data_dir` (if given), a folder made absolute, so it identifies the data."""
    from edgetl.data import BUILTIN_DATASETS

    source = str(data_dir) if data_dir is not None else recipe.data.source
    source = source if source in BUILTIN_DATASETS else str(Path(source).expanduser().resolve())
    return replace(recipe, data=replace(recipe.data, source=source))


def run_pipeline(recipe_path, overrides=(), data_dir=None, run_dir=None, out_root="models",
                 echo=print, isolate: bool = False) -> PipelineResult:
    """Train, export and validate RECIPE into one run directory, skipping stages that already finished.

    `isolate` runs each stage in a fresh process (the run directory carries everything between them), so
    peak memory is the largest stage's, not their sum.
    """
    from edgetl.recipe import load_recipe

    recipe = resolve_data_source(load_recipe(recipe_path, overrides), data_dir)
    fingerprint = recipe.fingerprint()
    run = RunDir(Path(run_dir) if run_dir else default_run_dir(out_root, recipe))
    if run_dir is None:
        _note_changed_recipe(run, echo)
    marker = _read_marker(run, fingerprint)
    result = PipelineResult(run.path)
    echo(f"run directory: {run.path} (recipe {recipe.name}, fingerprint {fingerprint})")
    rerun = False
    for stage in STAGES:
        if not rerun and _is_done(run, stage, marker, fingerprint):
            echo(f"== {stage}: done earlier ({marker['stages'][stage]['finished']}), skipped")
            result.skipped.append(stage)
            continue
        rerun = True
        _clear_from(run, stage, marker, echo)
        echo(f"== {stage}")
        start = time.perf_counter()
        outcome = run_isolated(stage, recipe, run, echo) if isolate else _STAGE_RUNNERS[stage](recipe, run, echo)
        if stage == "validate":
            result.validation = outcome
        marker["stages"][stage] = {"fingerprint": fingerprint, "seconds": round(time.perf_counter() - start, 1),
                                   "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        atomic_write_json(run.path / MARKER, marker)
        result.ran.append(stage)
    manifest = read_json(run.exports_dir / "manifest.json")
    result.export_failed = [a["name"] for a in manifest.get("artifacts", []) if a.get("status") == "failed"]
    if "validate" in result.skipped:
        from edgetl.validate import format_summary, load_validation

        result.validation = load_validation(run.path)
        echo(format_summary(result.validation.report))
    return result


def _train(recipe, run: RunDir, echo):
    from edgetl.training import train

    return train(recipe, run_dir=run.path, echo=echo)


def _export(recipe, run: RunDir, echo):
    from edgetl.export import export_run

    return export_run(run.path, echo=echo)


def _validate(recipe, run: RunDir, echo):
    from edgetl.validate import validate_run

    return validate_run(run.path, echo=echo)


_STAGE_RUNNERS = {"train": _train, "export": _export, "validate": _validate}


def run_isolated(stage: str, recipe, run: RunDir, echo):
    """Run one stage in a spawned process (edgetl.isolate); its exceptions are re-raised here. Returns the
    validation for `validate` (read back from the run directory), else None."""
    from edgetl.isolate import run_in_child

    run_in_child(_run_stage, (stage, recipe, run.path), echo, f"the {stage} stage")
    if stage == "validate":
        from edgetl.validate import load_validation

        return load_validation(run.path)
    return None


def _run_stage(stage: str, recipe, run_path: Path, echo) -> None:
    """The child's side of `run_isolated` (results stay in the run directory)."""
    _STAGE_RUNNERS[stage](recipe, RunDir(run_path), echo)


def stage_outputs(run: RunDir, stage: str) -> list[Path]:
    """The files whose presence (with a matching marker) means `stage` finished."""
    return {
        "train": [run.recipe_path, run.labels_path, run.model_path, run.metrics_path, run.manifest_path],
        "export": [run.exports_dir / "manifest.json"],
        "validate": [run.validation_dir / "report.json"],
    }[stage]


def _is_done(run: RunDir, stage: str, marker: dict, fingerprint: str) -> bool:
    entry = marker["stages"].get(stage)
    outputs_exist = all(p.exists() for p in stage_outputs(run, stage))
    return bool(entry) and entry.get("fingerprint") == fingerprint and outputs_exist


def _clear_from(run: RunDir, stage: str, marker: dict, echo) -> None:
    """Forget `stage` and the stages after it, and delete whatever they left behind."""
    later = STAGES[STAGES.index(stage):]
    for name in later:
        marker["stages"].pop(name, None)
    if run.path.exists():
        atomic_write_json(run.path / MARKER, marker)
    if stage == "train":
        leftovers = [p for p in run.path.iterdir() if p.name != MARKER] if run.path.exists() else []
    else:
        folders = {"export": run.exports_dir, "validate": run.validation_dir}
        leftovers = [folders[name] for name in later if folders[name].exists()]
    if leftovers:
        echo(f"   removing unfinished or outdated outputs: {', '.join(p.name for p in leftovers)}")
    for path in leftovers:
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def _read_marker(run: RunDir, fingerprint: str) -> dict:
    """This run's stage record; refuses folders that hold something else."""
    path = run.path / MARKER
    if path.is_file():
        marker = read_json(path)
        if marker.get("recipe_fingerprint") != fingerprint:
            raise PipelineError(
                f"{run.path} holds a run of recipe fingerprint {marker.get('recipe_fingerprint')}, but this recipe "
                f"(with its data source and --set overrides) has fingerprint {fingerprint}: the recipe changed. "
                f"Leave out --run-dir to start a new run directory, or give a new folder")
        marker.setdefault("stages", {})
        return marker
    if run.path.exists() and any(run.path.iterdir()):
        raise PipelineError(f"{run.path} is not empty and was not made by `edgetl run` (no {MARKER}); "
                            f"give a new or empty folder")
    return {"recipe_fingerprint": fingerprint, "stages": {}}


def _note_changed_recipe(run: RunDir, echo) -> None:
    """Say so when the same recipe name already has runs made from a different version of the recipe."""
    others = [p for p in run.path.parent.glob("run-*") if p != run.path and (p / MARKER).is_file()]
    if others and not run.path.exists():
        latest = max(others, key=lambda p: (p / MARKER).stat().st_mtime)
        echo(f"recipe changed since {latest} (fingerprint {latest.name[4:]}): starting a new run from scratch")

"""Validation harness: every artifact of a run on the same held-out images, compared with the Keras model.

Each row of the table is one artifact on one runtime (the Keras model on tf_keras first; recipe
`validate.runtimes` adds e.g. OpenVINO rows), loaded, run and timed in its own process
(`edgetl.validate.worker`), so its load time and peak memory are those of its runtime alone; this process
never imports TensorFlow. It decodes the test split once, scores the predictions against the labels and the
Keras model with their paired statistics (`score`, `noise`), applies the gates, recommends a row (`decide`)
and writes `<run>/validation/` (`report`).

Multi-task runs (recipe `model.heads`): every head is scored (top-1, agreement, ... under each row's
`heads`), the gates apply to every head, and the row's top-level figures, the recommendation and the
plots are the primary (first) head's.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgetl.edge.runtime import RUNTIMES
from edgetl.errors import EdgetlError
from edgetl.io import read_json
from edgetl.rundir import RunDir, RunDirError
from edgetl.validate.decide import (
    LATENCY_KEY,
    POLICIES,
    REFERENCE,
    GateFailure,
    Recommendation,
    check_gates,
    mark_gates,
    pareto_front,
    recommend,
)
from edgetl.validate.report import build_report, format_summary, format_table, write_report
from edgetl.validate.score import Artifact, score_rows

__all__ = ["validate_run", "load_validation", "check_gates", "recommend", "pareto_front", "format_table",
           "format_summary", "ValidationResult", "GateFailure", "Recommendation", "ValidationError"]


class ValidationError(EdgetlError, ValueError):
    """A run that cannot be validated; the message names the file and the fix."""


@dataclass
class ValidationResult:
    """What `validate_run` wrote to `<run>/validation/report.json`, plus its decisions as objects."""

    run_dir: Path
    report: dict
    failures: list[GateFailure] = field(default_factory=list)
    recommendation: Recommendation | None = None

    @property
    def passed(self) -> bool:
        return not self.failures


def validate_run(run_dir, data_dir=None, threads: int | None = None, runs: int | None = None,
                 warmup: int | None = None, max_accuracy_drop: float | None = None,
                 min_agreement: float | None = None, budget_latency_ms: float | None = None,
                 budget_size_kb: float | None = None, runtimes: list[str] | None = None,
                 inconclusive: str | None = None, confidence: float | None = None, echo=print) -> ValidationResult:
    """Evaluate the Keras model and every exported artifact of `run_dir` on each of `runtimes`; write and return
    the report.

    Arguments left as None take the recipe's `validate:` values. `data_dir` evaluates on the test split
    of another dataset with the same classes.
    """
    from edgetl.backbones import image_size_for
    from edgetl.data import load_arrays, load_splits
    from edgetl.validate import worker  # here, not at the top: `python -m edgetl.validate.worker` imports this package

    run = RunDir(run_dir)
    run.require(run.recipe_path, run.model_path, run.labels_path)
    recipe = run.load_recipe()
    cfg = dataclasses.replace(recipe.validate, **{k: v for k, v in dict(
        threads=threads, runs=runs, warmup=warmup, max_accuracy_drop=max_accuracy_drop,
        min_agreement=min_agreement, budget_latency_ms=budget_latency_ms, budget_size_kb=budget_size_kb,
        runtimes=None if runtimes is None else list(runtimes), inconclusive=inconclusive,
        confidence=confidence).items() if v is not None})
    _check_settings(cfg)
    class_names = run.labels()
    head_labels = run.head_labels()
    splits = load_splits(recipe, data_dir)
    expected = [(run.head_labels_path(h.name), head_labels[h.name], h.class_names) for h in splits.heads] \
        or [(run.labels_path, class_names, splits.class_names)]
    for path, names, found in expected:
        if found != names:
            raise ValidationError(f"{splits.root}: classes {found} differ from the run's {path} {names}; validate "
                                  f"on data with the same class folders (and label files)")
    size = image_size_for(recipe)
    images, labels = load_arrays(splits.test, size, recipe.data.resize)
    targets = splits.targets(splits.test)
    if targets:
        labels = targets[splits.heads[0].name]
    artifacts, skipped = list_artifacts(run)
    plan = [dataclasses.replace(art, name=worker.row_name(runtime, art.format, art.name), runtime=runtime)
            for art in artifacts for runtime in worker.runtimes_for(art.format, cfg.runtimes)]
    echo(f"validating {len(plan)} rows ({len(artifacts)} artifacts, runtimes {', '.join(cfg.runtimes)}) on "
         f"{len(images)} test images ({splits.root}, {size}px), {cfg.threads} threads, {cfg.warmup} warm-up + "
         f"{cfg.runs} timed runs each")
    for item in skipped:
        echo(f"  skipping {item['name']}: {item['status']} at export ({item['error'] or 'no reason given'})")
    unmeasured = [art.name for art in artifacts if not worker.runtimes_for(art.format, cfg.runtimes)]
    if unmeasured:
        echo(f"  not measured (no chosen runtime reads them): {', '.join(unmeasured)}")

    outputs = []
    with tempfile.TemporaryDirectory(prefix="edgetl-validate.") as tmp:
        images_path = Path(tmp) / "images.npy"
        np.save(images_path, images)
        for i, art in enumerate(plan, 1):
            out = worker.measure(worker.Job(art.runtime, str(art.path), str(images_path), str(Path(tmp) / f"job{i}"),
                                            cfg.threads, cfg.runs, cfg.warmup, recipe.data.batch_size,
                                            tuple(head_labels)))
            outputs.append(out)
            echo(f"  [{i}/{len(plan)}] {art.name}: " + (
                f"not measured: {out.error}" if out.unavailable else f"error: {out.error}" if out.error else
                f"{out.result['latency'][LATENCY_KEY]:.2f} ms p50, load {out.result['load_time_s']:.2f}s"))

    if outputs[0].error:
        raise ValidationError(f"the Keras model {artifacts[0].path} could not be evaluated: {outputs[0].error}")
    heads = {name: (targets[name], names) for name, names in head_labels.items()}
    rows = score_rows(plan, outputs, labels, class_names, heads, max_drop_pp=cfg.max_accuracy_drop,
                      min_agreement=cfg.min_agreement, confidence=cfg.confidence)
    failures = check_gates(rows, cfg.max_accuracy_drop, cfg.min_agreement, cfg.inconclusive)
    rows = mark_gates(rows, failures, cfg.inconclusive)
    choice = recommend(rows, cfg.budget_latency_ms, cfg.budget_size_kb)
    report = build_report(run, recipe, cfg, splits, images, data_dir,
                          worker.settings(cfg.threads, cfg.runs, cfg.warmup, LATENCY_KEY, cfg.runtimes), rows,
                          skipped, failures, choice)
    _check_training_match(report, echo)
    write_report(run.validation_dir, report, class_names)
    result = ValidationResult(run.path, report, failures, choice)
    echo("")
    echo(format_summary(report))
    echo(f"report: {run.validation_dir / 'report.json'} (also report.md and plots)")
    return result


def load_validation(run_dir) -> ValidationResult:
    """The result of an earlier `validate_run`, read back from `<run>/validation/report.json`."""
    run = RunDir(run_dir)
    path = run.validation_dir / "report.json"
    if not path.is_file():
        raise RunDirError(f"{path} is missing: validate the run first (`edgetl validate {run.path}`)")
    report = read_json(path)
    failures = [GateFailure(**f) for f in report["gates"]["failures"]]
    return ValidationResult(run.path, report, failures, Recommendation(**report["recommendation"]))


def list_artifacts(run: RunDir) -> tuple[list[Artifact], list[dict]]:
    """(artifacts to evaluate, Keras first; exports that were not produced) from the run and its manifest."""
    artifacts = [Artifact(REFERENCE, "keras", "fp32", run.model_path, run.model_path.name, None, reference=True)]
    manifest_path = run.exports_dir / "manifest.json"
    if not manifest_path.is_file():
        return artifacts, []
    skipped = []
    for entry in read_json(manifest_path).get("artifacts", []):
        name = entry.get("name") or f"{entry.get('format')}-{entry.get('variant')}"
        if entry.get("status", "ok") != "ok":
            skipped.append({"name": name, "format": entry.get("format"), "variant": entry.get("variant"),
                            "status": entry.get("status"), "error": entry.get("error")})
            continue
        path = run.exports_dir / str(entry.get("path"))
        fmt = entry.get("format") or path.suffix.lstrip(".").lower()
        artifacts.append(Artifact(name, fmt, entry.get("variant"), path, os.path.relpath(path, run.path),
                                  entry.get("sha256")))
    return artifacts, skipped


def _check_settings(cfg) -> None:
    """Refuse runtimes and policies edgetl does not know (the recipe checks its own; this covers the arguments)."""
    unknown = [r for r in cfg.runtimes if r not in RUNTIMES]
    if unknown or not cfg.runtimes:
        raise ValidationError(f"runtimes {', '.join(unknown) or '(none)'}: choose one or more of {', '.join(RUNTIMES)} "
                              f"(recipe validate.runtimes, --runtimes)")
    if cfg.inconclusive not in POLICIES:
        raise ValidationError(f"inconclusive policy {cfg.inconclusive!r}: choose one of {', '.join(POLICIES)} "
                              f"(recipe validate.inconclusive, --inconclusive)")


def _check_training_match(report: dict, echo) -> None:
    """Warn when the Keras row's top-1 differs from the one training measured on the same test split."""
    if report["keras_matches_training"] is False:
        echo(f"warning: Keras top-1 here ({report['artifacts'][0]['top1']:.4f}) differs from metrics.json "
             f"({report['training_top1']:.4f}) on the same test split; were the data files changed?")

"""Validation harness: every artifact of a run on the same held-out images, compared with the Keras model.

Each artifact (the Keras model too) is loaded, run and timed in its own subprocess
(`python -m edgetl.validate --worker JOB`), so its load time and peak memory are those of its runtime
alone. The parent decodes the test split once, scores the predictions against the labels and the Keras
model, applies the gates, recommends an artifact and writes `<run>/validation/`.

Multi-task runs (recipe `model.heads`): every head is scored (top-1, agreement, ... under each row's
`heads`), the gates apply to every head, and the row's top-level figures, the recommendation and the
plots are the primary (first) head's.
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

import edgetl
from edgetl.edge.runtime import Runner, open_model, peak_rss_mb
from edgetl.report import format_summary, format_table, write_report
from edgetl.io import atomic_write_json, read_json
from edgetl.rundir import RunDir, load_keras_model

__all__ = ["validate_run", "load_validation", "check_gates", "recommend", "pareto_front", "format_table",
           "format_summary", "ValidationResult", "GateFailure", "Recommendation", "ValidationError"]

SCHEMA_VERSION = 1
REFERENCE = "keras"
LATENCY_KEY = "p50_ms"  # the latency figure used for budgets, the Pareto front and the plots
THROUGHPUT_BATCH = 16
WORKER_TIMEOUT_S = 1800.0
_EPS = 1e-9  # gates compare measured fractions; keep float noise from tripping them


class ValidationError(ValueError):
    """A run that cannot be validated; the message names the file and the fix."""


@dataclass(frozen=True)
class GateFailure:
    """One artifact missing one gate: `excess` is how far past the threshold it is (in the gate's unit)."""

    artifact: str
    gate: str  # "max_accuracy_drop" (percentage points), "min_agreement" (fraction) or "evaluation"
    value: float | None
    threshold: float | None
    excess: float | None
    message: str
    head: str | None = None  # the head that missed it (multi-task runs)


@dataclass(frozen=True)
class Recommendation:
    """The chosen artifact (None when nothing qualifies), whether it fits the budgets, and the closest miss."""

    artifact: str | None
    within_budget: bool
    closest: str | None
    message: str


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


# ---------------------------------------------------------------------------------------------------------
# Orchestration


def validate_run(run_dir, data_dir=None, threads: int | None = None, runs: int | None = None,
                 warmup: int | None = None, max_accuracy_drop: float | None = None,
                 min_agreement: float | None = None, budget_latency_ms: float | None = None,
                 budget_size_kb: float | None = None, echo=print) -> ValidationResult:
    """Evaluate the Keras model and every exported artifact of `run_dir`; write and return the report.

    Arguments left as None take the recipe's `validate:` values. `data_dir` evaluates on the test split
    of another dataset with the same classes.
    """
    from edgetl.data import load_arrays, load_splits
    from edgetl.backbones import image_size_for

    run = RunDir(run_dir)
    run.require(run.recipe_path, run.model_path, run.labels_path)
    recipe = run.load_recipe()
    cfg = dataclasses.replace(recipe.validate, **{k: v for k, v in dict(
        threads=threads, runs=runs, warmup=warmup, max_accuracy_drop=max_accuracy_drop,
        min_agreement=min_agreement, budget_latency_ms=budget_latency_ms,
        budget_size_kb=budget_size_kb).items() if v is not None})
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
    echo(f"validating {len(artifacts)} artifacts on {len(images)} test images ({splits.root}, {size}px), "
         f"{cfg.threads} threads, {cfg.warmup} warm-up + {cfg.runs} timed runs each")
    for item in skipped:
        echo(f"  skipping {item['name']}: {item['status']} at export ({item['error'] or 'no reason given'})")

    outputs = []
    with tempfile.TemporaryDirectory(prefix="edgetl-validate.") as tmp:
        images_path = Path(tmp) / "images.npy"
        np.save(images_path, images)
        for i, art in enumerate(artifacts, 1):
            out = _run_worker(art, images_path, Path(tmp) / f"job{i}", cfg, recipe.data.batch_size,
                              list(head_labels))
            outputs.append(out)
            echo(f"  [{i}/{len(artifacts)}] {art['name']}: " + (
                f"error: {out['error']}" if out["error"] else
                f"{out['result']['latency'][LATENCY_KEY]:.2f} ms p50, load {out['result']['load_time_s']:.2f}s"))

    heads = {name: (targets[name], names) for name, names in head_labels.items()}
    rows = score_rows(artifacts, outputs, labels, class_names, heads)
    failures = check_gates(rows, cfg.max_accuracy_drop, cfg.min_agreement)
    failed = {f.artifact for f in failures}
    for row in rows:
        row["gate"] = ("reference" if row["reference"] else "error" if row["status"] != "ok"
                       else "fail" if row["name"] in failed else "pass")
    choice = recommend(rows, cfg.budget_latency_ms, cfg.budget_size_kb)
    report = _report(run, recipe, splits, cfg, rows, skipped, failures, choice, images, data_dir)
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
        raise FileNotFoundError(f"{path} is missing: validate the run first (`edgetl validate {run.path}`)")
    report = read_json(path)
    failures = [GateFailure(**f) for f in report["gates"]["failures"]]
    return ValidationResult(run.path, report, failures, Recommendation(**report["recommendation"]))


def list_artifacts(run: RunDir) -> tuple[list[dict], list[dict]]:
    """(artifacts to evaluate, Keras first; exports that were not produced) from the run and its manifest."""
    artifacts = [{"name": REFERENCE, "format": "keras", "variant": "fp32", "path": run.model_path,
                  "relpath": run.model_path.name, "sha256": None}]
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
        artifacts.append({"name": name, "format": fmt, "variant": entry.get("variant"), "path": path,
                          "relpath": os.path.relpath(path, run.path), "sha256": entry.get("sha256")})
    return artifacts, skipped


def _run_worker(art: dict, images_path: Path, work: Path, cfg, batch_size: int, heads: list[str]) -> dict:
    """Evaluate one artifact in a fresh interpreter: {"result", "probs", "heads"} or {"error"}.

    `heads` (multi-task runs) names the outputs to score; "probs" is then the first head's.
    """
    work.mkdir()
    job = {"format": art["format"], "model": str(art["path"]), "images": str(images_path), "out": str(work),
           "threads": cfg.threads, "runs": cfg.runs, "warmup": cfg.warmup, "batch_size": batch_size,
           "heads": heads}
    atomic_write_json(work / "job.json", job)
    argv = [sys.executable, "-m", "edgetl.validate", "--worker", str(work / "job.json")]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S, env=_worker_env())
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish within {WORKER_TIMEOUT_S:.0f} s", "result": None, "probs": None,
                "heads": None}
    if proc.returncode != 0 or not (work / "result.json").is_file():
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        error = re.sub(r"^(?:\w+\.)+(\w+: )", r"\1", lines[-1]) if lines else f"worker exit status {proc.returncode}"
        return {"error": error, "result": None, "probs": None, "heads": None}
    head_probs = dict(np.load(work / "heads.npz")) if heads else None
    return {"error": None, "result": read_json(work / "result.json"), "probs": np.load(work / "probs.npy"),
            "heads": head_probs}


def _worker_env() -> dict:
    """This environment with the folder holding the edgetl package first on PYTHONPATH."""
    root = str(Path(edgetl.__file__).resolve().parent.parent)
    parts = [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(parts)}


# ---------------------------------------------------------------------------------------------------------
# Scoring and decisions (pure functions over report rows)


def score_rows(artifacts: list[dict], outputs: list[dict], labels: np.ndarray, class_names: list[str],
               heads: dict[str, tuple[np.ndarray, list[str]]] | None = None) -> list[dict]:
    """One report row per artifact: accuracy, agreement and probability difference vs Keras, timings, sizes.

    `heads` ({head: (labels, class names)}, multi-task runs) adds a `heads` entry per row with the same
    figures for each head (outputs[i]["heads"] holds their probabilities); `labels`/`class_names` and
    outputs[i]["probs"] are then the primary head's.
    """
    ref = outputs[0]
    if ref["error"]:
        raise ValidationError(f"the Keras model {artifacts[0]['path']} could not be evaluated: {ref['error']}")
    rows = []
    for art, out in zip(artifacts, outputs):
        row = _file_facts(art)
        error = out["error"]
        if error is None:
            scored = [(out["probs"], ref["probs"], "")] + [(out["heads"][h], ref["heads"][h], f"head {h!r} ")
                                                           for h in heads or {}]
            error = next((e for e in (_output_error(p, r, where) for p, r, where in scored) if e), None)
        row.update(status="error" if error else "ok", error=error)
        res = out["result"] or {}
        row.update({key: res.get(key) for key in ("runtime", "runtime_version", "input_dtype", "input_shape",
                                                   "latency", "throughput", "throughput_error", "load_time_s",
                                                   "peak_rss_mb", "baseline_rss_mb")})
        ref_row = rows[0] if rows else None
        row.update(_scores(None if error else out["probs"], ref["probs"], labels, class_names, ref_row))
        if heads:
            row["heads"] = {h: _scores(None if error else out["heads"][h], ref["heads"][h], y, names,
                                       ref_row and ref_row["heads"][h]) for h, (y, names) in heads.items()}
        row["gate"] = None
        rows.append(row)
    return rows


def _output_error(probs: np.ndarray, ref: np.ndarray, where: str = "") -> str | None:
    """Why an artifact's scores cannot be compared with the Keras model's, or None."""
    if probs.shape != ref.shape:
        return f"{where}outputs {probs.shape[1:]} scores per image, the Keras model {ref.shape[1:]}"
    if not np.isfinite(probs).all():
        return f"{where}outputs NaN or infinite scores"
    return None


def _scores(probs: np.ndarray | None, ref: np.ndarray, labels: np.ndarray, class_names: list[str],
            ref_row: dict | None) -> dict:
    """Accuracy of `probs` (None: not evaluated), its agreement and differences with the Keras scores `ref`."""
    from edgetl.metrics import classification_metrics

    scores = {"top5_k": min(5, len(class_names))}
    if probs is None:
        return {**scores, **dict.fromkeys(("top1", "top5", "delta_top1_pp", "agreement", "mean_abs_prob_diff",
                                           "max_abs_prob_diff", "per_class_recall", "confusion_matrix"))}
    m = classification_metrics(labels, probs, class_names)
    diff = np.abs(probs.astype(np.float64) - ref.astype(np.float64))
    return {**scores, "top1": m["top1"], "top5": m["top5"],
            "delta_top1_pp": 100.0 * (m["top1"] - ref_row["top1"]) if ref_row else 0.0,
            "agreement": float(np.mean(probs.argmax(1) == ref.argmax(1))),
            "mean_abs_prob_diff": float(diff.mean()), "max_abs_prob_diff": float(diff.max()),
            "per_class_recall": {c: v["recall"] for c, v in m["per_class"].items()},
            "confusion_matrix": m["confusion_matrix"]}


def _file_facts(art: dict) -> dict:
    """Identity, size, gzip size and hash of an artifact file (gzip -9, as a download would be compressed)."""
    facts = {"name": art["name"], "format": art["format"], "variant": art["variant"],
             "reference": art["name"] == REFERENCE, "path": art["relpath"], "size_bytes": None, "gzip_bytes": None,
             "sha256": None, "modified_since_export": None}
    if Path(art["path"]).is_file():
        data = Path(art["path"]).read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        facts.update(size_bytes=len(data), gzip_bytes=len(gzip.compress(data, compresslevel=9, mtime=0)), sha256=sha,
                     modified_since_export=None if not art["sha256"] else sha != art["sha256"])
    return facts


def check_gates(rows: list[dict], max_accuracy_drop: float | None, min_agreement: float | None) -> list[GateFailure]:
    """Every (artifact, gate) that fails: top-1 drop vs Keras in pp, agreement with Keras, or no result at all.

    Rows of a multi-task run are gated on every head (`heads`), each failure naming its head.
    """
    ref = next(r for r in rows if r["reference"])
    failures = []
    for row in rows:
        if row["reference"]:
            continue
        name = row["name"]
        if row["status"] != "ok":
            failures.append(GateFailure(name, "evaluation", None, None, None,
                                        f"{name}: could not be evaluated ({row['error']})"))
            continue
        scored = [(h, row["heads"][h], ref["heads"][h]) for h in row["heads"]] if "heads" in row else [(None, row, ref)]
        for head, scores, ref_scores in scored:
            failures += _gate_failures(name, head, scores, ref_scores, max_accuracy_drop, min_agreement)
    return failures


def _gate_failures(name: str, head: str | None, row: dict, ref: dict, max_accuracy_drop: float | None,
                   min_agreement: float | None) -> list[GateFailure]:
    """The gates one artifact's scores (of one head) miss against the Keras scores `ref`."""
    failures = []
    what = f"{name} [{head}]" if head else name
    drop = 100.0 * (ref["top1"] - row["top1"])
    if max_accuracy_drop is not None and drop > max_accuracy_drop + _EPS:
        failures.append(GateFailure(
            name, "max_accuracy_drop", drop, max_accuracy_drop, drop - max_accuracy_drop,
            f"{what}: top-1 {row['top1']:.2%} is {drop:.2f} pp below Keras ({ref['top1']:.2%}); "
            f"max-accuracy-drop {max_accuracy_drop:g} pp exceeded by {drop - max_accuracy_drop:.2f} pp", head))
    agreement = row["agreement"]
    if min_agreement is not None and agreement < min_agreement - _EPS:
        failures.append(GateFailure(
            name, "min_agreement", agreement, min_agreement, min_agreement - agreement,
            f"{what}: agrees with Keras on {agreement:.2%} of images; min-agreement {min_agreement:.2%} "
            f"missed by {100 * (min_agreement - agreement):.2f} pp", head))
    return failures


def _latency(row: dict) -> float | None:
    return (row.get("latency") or {}).get(LATENCY_KEY)


def _rank(row: dict) -> tuple:
    """Most accurate first; ties go to the smaller, then the faster artifact."""
    latency = _latency(row)
    return -row["top1"], row["size_bytes"], latency if latency is not None else float("inf")


def recommend(rows: list[dict], budget_latency_ms: float | None = None,
              budget_size_kb: float | None = None) -> Recommendation:
    """The most accurate exported artifact that passed the gates and fits the budgets (KB = 1024 bytes).

    Without budgets that is simply the most accurate one. When none fits, the closest is the one whose
    worst budget overrun (value / budget) is smallest.
    """
    candidates = [r for r in rows if not r["reference"] and r["status"] == "ok" and r.get("gate") != "fail"]
    if not candidates:
        return Recommendation(None, False, None, "no exported artifact was evaluated and passed the gates; "
                                                 "nothing to recommend")
    budgets = [(b, fn, unit) for b, fn, unit in (
        (budget_latency_ms, _latency, "ms p50 latency"),
        (budget_size_kb, lambda r: r["size_bytes"] / 1024.0, "KB")) if b is not None]
    if not budgets:
        best = min(candidates, key=_rank)
        return Recommendation(best["name"], True, None,
                              f"recommended: {_describe(best)} (most accurate; no budget given)")

    def overrun(row):
        return max((fn(row) if fn(row) is not None else float("inf")) / max(b, _EPS) for b, fn, _ in budgets)

    wanted = " and ".join(f"<= {b:g} {unit}" for b, _, unit in budgets)
    fits = [r for r in candidates if overrun(r) <= 1.0 + _EPS]
    if fits:
        best = min(fits, key=_rank)
        return Recommendation(best["name"], True, None,
                              f"recommended: {_describe(best)} (most accurate of {len(fits)} within {wanted})")
    closest = min(candidates, key=lambda r: (overrun(r), _rank(r)))
    return Recommendation(None, False, closest["name"],
                          f"no artifact fits the budget ({wanted}); closest: {_describe(closest)}, "
                          f"{overrun(closest):.2f}x the budget")


def _describe(row: dict) -> str:
    latency = _latency(row)
    return (f"{row['name']} (top-1 {row['top1']:.2%}, "
            f"{'-' if latency is None else f'{latency:.2f}'} ms p50, {row['size_bytes'] / 1024:.0f} KB)")


def pareto_front(rows: list[dict]) -> list[str]:
    """Names of the evaluated artifacts that no other is both at least as fast and at least as accurate as
    (strictly better in one), fastest first."""
    points = [r for r in rows if r["status"] == "ok" and _latency(r) is not None]
    front = [r for r in points if not any(
        _latency(o) <= _latency(r) and o["top1"] >= r["top1"] and (_latency(o) < _latency(r) or o["top1"] > r["top1"])
        for o in points)]
    return [r["name"] for r in sorted(front, key=_latency)]


# ---------------------------------------------------------------------------------------------------------
# The report document


def _report(run: RunDir, recipe, splits, cfg, rows, skipped, failures, choice, images, data_dir) -> dict:
    from edgetl.edge.bench import device_facts

    metrics = read_json(run.metrics_path) if run.metrics_path.is_file() else {}
    same_data = data_dir is None or Path(splits.root) == Path(recipe.data.source).expanduser().resolve()
    training_top1 = metrics.get("test", {}).get("top1") if same_data else None
    previous = run.validation_dir / "report.json"
    report = {
        "schema_version": SCHEMA_VERSION,
        "tool": "edgetl validate", "edgetl_version": edgetl.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run_dir": str(run.path), "recipe": recipe.name, "recipe_fingerprint": recipe.fingerprint(),
        "data": {"source": splits.source, "root": splits.root, "split": "test", "images": int(len(images)),
                 "image_size": int(images.shape[1]), "resize": recipe.data.resize,
                 "classes": splits.primary_class_names,
                 **({"heads": {h.name: h.class_names for h in splits.heads}} if splits.heads else {})},
        "settings": {"threads": cfg.threads, "runs": cfg.runs, "warmup": cfg.warmup, "latency_batch": 1,
                     "latency_statistic": LATENCY_KEY, "throughput_batch": THROUGHPUT_BATCH,
                     "throughput_runs": throughput_runs(cfg.runs), "xnnpack": True,
                     "onnx_provider": "CPUExecutionProvider"},
        "host": device_facts(),
        "reference": REFERENCE,
        "training_top1": training_top1,
        "keras_matches_training": None if training_top1 is None else abs(rows[0]["top1"] - training_top1) < _EPS,
        "artifacts": rows,
        "skipped": skipped,
        "gates": {"max_accuracy_drop_pp": cfg.max_accuracy_drop, "min_agreement": cfg.min_agreement,
                  "passed": not failures, "failures": [dataclasses.asdict(f) for f in failures]},
        "budgets": {"latency_ms": cfg.budget_latency_ms, "size_kb": cfg.budget_size_kb},
        "recommendation": dataclasses.asdict(choice),
        "pareto_front": pareto_front(rows),
        "plots": {"accuracy_vs_latency": "accuracy_vs_latency.png", "size_vs_accuracy": "size_vs_accuracy.png",
                  "confusion_matrix": "confusion_matrix.png"},
    }
    if previous.is_file():  # keep the on-device results `edgetl edge` merged into an earlier report
        edge = read_json(previous).get("edge")
        if edge is not None:
            report["edge"] = edge
    return report


def _check_training_match(report: dict, echo) -> None:
    if report["keras_matches_training"] is False:
        echo(f"warning: Keras top-1 here ({report['artifacts'][0]['top1']:.4f}) differs from metrics.json "
             f"({report['training_top1']:.4f}) on the same test split; were the data files changed?")


def throughput_runs(runs: int) -> int:
    """Timed runs at the throughput batch: a tenth of the batch-1 runs, at least 3."""
    return max(3, runs // 10)


# ---------------------------------------------------------------------------------------------------------
# Worker: runs in its own process, one artifact each


class KerasRunner(Runner):
    """model.keras on tf_keras behind the edge `Runner` interface, so it is timed by the same loop."""

    def __init__(self, path: Path, threads: int | None, batch_size: int):
        import tensorflow as tf
        import tf_keras as keras

        if threads:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        start = time.perf_counter()
        self._model = load_keras_model(path)
        self.load_time_s = time.perf_counter() - start
        self._call = tf.function(lambda x: self._model(x, training=False))
        self._tf, self._batch_size = tf, batch_size
        self.path, self.kind = Path(path), "keras"
        self.runtime_name, self.runtime_version = "tf_keras", keras.__version__
        self.input_shape = tuple(int(d) for d in self._model.input_shape[1:])
        self.input_dtype, self.output_names = "float32", list(self._model.output_names)
        self.threads, self.xnnpack, self.labels = threads, None, None

    def _run(self, images: np.ndarray) -> dict:
        out = self._model.predict(self._check_images(images).astype(np.float32), batch_size=self._batch_size,
                                  verbose=0)
        return dict(zip(self.output_names, out if isinstance(out, list) else [out]))

    def _prepare_invoke(self, pixels: np.ndarray):
        x = self._tf.constant(pixels.astype(np.float32))
        self._call(x)  # trace the graph for this shape outside the timed runs
        return lambda: self._call(x)


def _worker(job_path: str) -> None:
    """Load one artifact, time batch-1 invoke, predict the images in chunks, time a larger batch."""
    job = read_json(job_path)
    out = Path(job["out"])
    images = np.load(job["images"])
    baseline = peak_rss_mb()
    if job["format"] == "keras":
        runner = KerasRunner(Path(job["model"]), job["threads"], job["batch_size"])
    else:
        runner = open_model(job["model"], threads=job["threads"], xnnpack=True)
    latency = runner.time_invoke(batch=1, runs=job["runs"], warmup=job["warmup"])
    peak = peak_rss_mb()  # load + batch-1 inference: what serving one image at a time costs
    step = job["batch_size"]
    heads = job.get("heads") or []
    if heads:
        missing = [h for h in heads if h not in runner.output_names]
        if missing:
            raise RuntimeError(f"no output named {', '.join(missing)}: the artifact's outputs are "
                               f"{runner.output_names}, the run's heads {heads}")
        chunks = [runner.predict_all(images[i:i + step]) for i in range(0, len(images), step)]
        by_head = {h: np.concatenate([c[h] for c in chunks]).astype(np.float32) for h in heads}
        np.savez(out / "heads.npz", **by_head)
        probs = by_head[heads[0]]
    else:
        probs = np.concatenate([runner.predict(images[i:i + step]) for i in range(0, len(images), step)])
    throughput, throughput_error = None, None
    try:
        stats = runner.time_invoke(batch=THROUGHPUT_BATCH, runs=throughput_runs(job["runs"]), warmup=1)
        throughput = {"batch": stats.batch, "runs": stats.runs, "mean_ms": stats.mean_ms,
                      "images_per_s": stats.batch * 1000.0 / stats.mean_ms}
    except Exception as exc:  # noqa: BLE001 - runtimes raise their own types; a fixed batch size is not a failure
        throughput_error = f"batch {THROUGHPUT_BATCH} not possible: {str(exc).splitlines()[0] if str(exc) else exc!r}"
    np.save(out / "probs.npy", probs.astype(np.float32))
    atomic_write_json(out / "result.json", {
        "runtime": runner.runtime_name, "runtime_version": runner.runtime_version,
        "input_dtype": runner.input_dtype, "input_shape": list(runner.input_shape),
        "load_time_s": runner.load_time_s, "latency": latency.to_dict(), "throughput": throughput,
        "throughput_error": throughput_error, "peak_rss_mb": peak, "baseline_rss_mb": baseline})


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--worker":
        sys.exit("usage: python -m edgetl.validate --worker JOB.json (internal; use `edgetl validate RUN_DIR`)")
    _worker(sys.argv[2])

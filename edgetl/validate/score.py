"""Report rows from what the workers measured: accuracy, agreement and probability differences vs Keras, file facts.

Each row also carries `noise`: the paired statistics of its top-1 against Keras's on the same images (interval,
McNemar p-value and gate verdicts, `edgetl.validate.noise`), which the gates decide on.
Multi-task runs (recipe `model.heads`) get the same figures per head under each row's `heads`; the row's
top-level figures are the primary (first) head's.
"""
from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgetl.validate.noise import paired_gate_from_predictions

if TYPE_CHECKING:  # imported by the parent only when it starts workers (see edgetl.validate.validate_run)
    from edgetl.validate.worker import Output

RESULT_KEYS = ("runtime", "runtime_version", "input_dtype", "input_shape", "latency", "throughput",
               "throughput_error", "load_time_s", "peak_rss_mb", "baseline_rss_mb")  # copied from the worker


@dataclass(frozen=True)
class Artifact:
    """One file to evaluate: the Keras model (`reference`) or an export listed in exports/manifest.json, and
    the runtime a row measures it on (`name` is then the row's, e.g. openvino:onnx-fp32)."""

    name: str
    format: str
    variant: str | None
    path: Path
    relpath: str  # relative to the run directory, as the report shows it
    sha256: str | None  # as recorded at export; None for the Keras model
    reference: bool = False
    runtime: str | None = None  # tf_keras, litert, onnxruntime or openvino (edgetl.validate.worker.FORMAT_RUNTIMES)


def score_rows(artifacts: list[Artifact], outputs: list[Output], labels: np.ndarray, class_names: list[str],
               heads: dict[str, tuple[np.ndarray, list[str]]] | None = None, *, max_drop_pp: float | None = None,
               min_agreement: float | None = None, confidence: float = 0.95) -> list[dict]:
    """One report row per (artifact, output), the reference first: scores vs labels and the reference, timings, sizes.

    `heads` ({head: (labels, class names)}, multi-task runs) adds a `heads` entry per row with the same
    figures for each head; `labels`/`class_names` and each output's `probs` are then the primary head's.
    The gate bounds and `confidence` set the verdicts of each row's (and head's) `noise`. The reference
    output must have a result; an `unavailable` output (optional runtime missing) gives that status.
    """
    bounds = {"max_drop_pp": max_drop_pp, "min_agreement": min_agreement, "confidence": confidence}
    ref = outputs[0]
    rows = []
    for art, out in zip(artifacts, outputs):
        row = _file_facts(art)
        error = out.error
        if error is None:
            scored = [(out.probs, ref.probs, "")] + [(out.heads[h], ref.heads[h], f"head {h!r} ") for h in heads or {}]
            error = next((e for e in (_output_error(p, r, where) for p, r, where in scored) if e), None)
        row.update(status="unavailable" if out.unavailable else "error" if error else "ok", error=error)
        res = out.result or {}
        row.update({key: res.get(key) for key in RESULT_KEYS})
        ref_row = rows[0] if rows else None
        row.update(_scores(None if error else out.probs, ref.probs, labels, class_names, ref_row, bounds))
        if heads:
            row["heads"] = {h: _scores(None if error else out.heads[h], ref.heads[h], y, names,
                                       ref_row and ref_row["heads"][h], bounds) for h, (y, names) in heads.items()}
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
            ref_row: dict | None, bounds: dict) -> dict:
    """Accuracy of `probs` (None: not evaluated), its agreement and differences with the Keras scores `ref`, and
    (except for the reference row itself) the paired statistics against them under the gate `bounds`."""
    from edgetl.metrics import classification_metrics

    scores = {"top5_k": min(5, len(class_names))}
    if probs is None:
        return {**scores, **dict.fromkeys(("top1", "top5", "delta_top1_pp", "agreement", "mean_abs_prob_diff",
                                           "max_abs_prob_diff", "per_class_recall", "confusion_matrix", "noise"))}
    m = classification_metrics(labels, probs, class_names)
    diff = np.abs(probs.astype(np.float64) - ref.astype(np.float64))
    noise = paired_gate_from_predictions(labels, ref.argmax(1), probs.argmax(1), **bounds) if ref_row else None
    return {**scores, "top1": m["top1"], "top5": m["top5"],
            "delta_top1_pp": 100.0 * (m["top1"] - ref_row["top1"]) if ref_row else 0.0,
            "agreement": float(np.mean(probs.argmax(1) == ref.argmax(1))),
            "mean_abs_prob_diff": float(diff.mean()), "max_abs_prob_diff": float(diff.max()),
            "per_class_recall": {c: v["recall"] for c, v in m["per_class"].items()},
            "confusion_matrix": m["confusion_matrix"], "noise": noise and noise.to_dict()}


def _file_facts(art: Artifact) -> dict:
    """Identity, size, gzip size and hash of an artifact file (gzip -9, as a download would be compressed)."""
    facts = {"name": art.name, "format": art.format, "variant": art.variant, "reference": art.reference,
             "backend": art.runtime, "path": art.relpath, "size_bytes": None, "gzip_bytes": None, "sha256": None,
             "modified_since_export": None}
    if art.path.is_file():
        data = art.path.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        facts.update(size_bytes=len(data), gzip_bytes=len(gzip.compress(data, compresslevel=9, mtime=0)), sha256=sha,
                     modified_since_export=None if not art.sha256 else sha != art.sha256)
    return facts

"""Host-side sweep: run the edge runner on every exported artifact of a run and record an `edge` report.

Each artifact is benchmarked in its own `python -m edgetl.edge.bench` process (`bench_in_subprocess`),
so load time and peak memory are those of the runner alone, not of a process that already holds
TensorFlow; the CLI uses the same for the host side of a remote comparison.
"""
from __future__ import annotations

import json
import subprocess
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

from edgetl.edge.bench import BenchOptions, device_facts, format_table
from edgetl.edge.process import error_line, run_module
from edgetl.edge.runtime import MODEL_SUFFIXES
from edgetl.errors import EdgetlError
from edgetl.io import RunPaths, atomic_write_json, read_json

REPORT_FIELDS = ("model", "latency", "peak_rss_mb", "accuracy", "images")


def bench_run_dir(run_dir, options: BenchOptions = BenchOptions(), timeout_s: float = 1800.0) -> dict:
    """Benchmark every artifact in `<run>/exports/manifest.json`; write the `edge` section and return it.

    The section goes into `<run>/validation/report.json` when validation has run, else into
    `<run>/validation/edge_report.json` as {"edge": section}. The run's labels.txt is used unless
    `options.labels` names another file. A failing artifact gets an "error" entry; the others still run.
    """
    run = RunPaths(run_dir)
    manifest_path = run.exports_dir / "manifest.json"
    if not manifest_path.is_file():
        raise BenchFailed(f"{manifest_path} is missing: export the run first (`edgetl export {run.path}`)")
    if not options.labels and run.labels_path.is_file():
        options = replace(options, labels=str(run.labels_path))
    entries = [_bench_artifact(run.exports_dir, artifact, options, timeout_s)
               for artifact in read_json(manifest_path).get("artifacts", [])]
    section = {"device": device_facts(), "settings": {**asdict(options), "threads": list(options.threads)},
               "artifacts": entries}
    report = run.validation_dir / "report.json"
    if report.is_file():
        atomic_write_json(report, {**read_json(report), "edge": section})
    else:
        atomic_write_json(run.validation_dir / "edge_report.json", {"edge": section})
    return section


def _bench_artifact(exports_dir: Path, artifact: dict, options: BenchOptions, timeout_s: float) -> dict:
    """One report entry: variant/format/path plus the runner's results, or an "error" saying why not."""
    entry = {key: artifact.get(key) for key in ("variant", "format", "path")}
    if artifact.get("error"):
        return {**entry, "error": f"not exported: {artifact['error']}"}
    path = exports_dir / str(artifact.get("path"))
    if path.suffix.lower() not in MODEL_SUFFIXES:
        return {**entry, "error": f"{path.name} is not a {' or '.join(MODEL_SUFFIXES)} file"}
    try:
        doc = bench_in_subprocess(path, options, timeout_s)
    except BenchFailed as exc:
        return {**entry, "error": str(exc)}
    return {**entry, **{key: doc.get(key) for key in REPORT_FIELDS}}


class BenchFailed(EdgetlError, RuntimeError):
    """The runner process failed; the message is its one-line error."""


def bench_in_subprocess(model_path, options: BenchOptions = BenchOptions(), timeout_s: float = 1800.0) -> dict:
    """The edgetl-bench document for one model, measured in a fresh `python -m edgetl.edge.bench` process."""
    with tempfile.TemporaryDirectory(prefix="edgetl-bench.") as tmp:
        out = Path(tmp) / "result.json"
        try:
            result = run_module("edgetl.edge.bench", [str(model_path), "--json", str(out), *options.to_args()],
                                timeout_s)
        except subprocess.TimeoutExpired:
            raise BenchFailed(f"{model_path}: runner did not finish within {timeout_s:.0f} s") from None
        if result.returncode != 0:
            raise BenchFailed(error_line(result, "runner").replace("edgetl-bench: error: ", ""))
        return json.loads(out.read_text(encoding="utf-8"))


def format_sweep(section: dict) -> str:
    """One line per artifact and setting: size, runtime, threads, XNNPACK, mean/p90 ms, accuracy, or the error."""
    rows = []
    for entry in section["artifacts"]:
        if "error" in entry:
            rows.append([entry["variant"], entry["format"], None, None, None, None, None, None, entry["error"]])
            continue
        size_kb = entry["model"]["size_bytes"] / 1024
        for r in entry["latency"]:
            accuracy = entry["accuracy"]
            rows.append([entry["variant"], entry["format"], size_kb, r["threads"], r["xnnpack"], r["mean_ms"],
                         r["p90_ms"], None if accuracy is None else f"{accuracy * 100:.1f}%", ""])
    return format_table(["variant", "format", "size KB", "threads", "xnnpack", "mean ms", "p90 ms", "accuracy", "note"], rows)

"""The validation report: report.json's document, and the console summary, report.md and plots rendered from it.

Rendering only reads the report document, so an earlier run's `validation/report.json` prints the same
summary as the run that wrote it (the pipeline relies on that when it skips a finished validation).
"""
from __future__ import annotations

import dataclasses
from datetime import datetime, timezone
from pathlib import Path

import edgetl
from edgetl.io import atomic_write_json, atomic_write_text, read_json
from edgetl.rundir import RunDir
from edgetl.validate.decide import EPS, REFERENCE, GateFailure, Recommendation, pareto_front
from edgetl.validate.noise import INCONCLUSIVE, PairedGate

SCHEMA_VERSION = 1

HEADERS = ("artifact", "input", "top-1", "vs keras", "top-5", "agree", "max|dp|", "p50 ms", "p90 ms",
           "img/s", "load ms", "KB", "gzip KB", "RSS MB", "gate")
HEAD_HEADERS = ("top-1", "vs keras", "agree")  # per head of a multi-task run, in place of HEADERS[2:7]
GATE_CELLS = {"reference": "ref", "pass": "pass", "fail": "FAIL", "inconclusive": "inconclusive", "error": "ERROR",
              "unavailable": "n/a"}


def build_report(run: RunDir, recipe, cfg, splits, images, data_dir, settings: dict, rows: list[dict],
                 skipped: list[dict], failures: list[GateFailure], choice: Recommendation) -> dict:
    """report.json's document: data, measurement `settings`, host, every row, gates and budgets (`cfg`, the
    recipe's `validate` with the caller's overrides, including the inconclusive policy) and the decisions.

    Carries the training run's warning (metrics.json, e.g. random weights instead of ImageNet) and keeps the
    on-device section that `edgetl bench RUN_DIR` merged into an earlier report.
    """
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
        "settings": settings,
        "host": device_facts(),
        "reference": REFERENCE,
        "training_top1": training_top1,
        "keras_matches_training": None if training_top1 is None else abs(rows[0]["top1"] - training_top1) < EPS,
        "training_warning": metrics.get("warning"),
        "artifacts": rows,
        "skipped": skipped,
        "gates": {"max_accuracy_drop_pp": cfg.max_accuracy_drop, "min_agreement": cfg.min_agreement,
                  "inconclusive_policy": cfg.inconclusive, "confidence": cfg.confidence,
                  "passed": not failures, "failures": [dataclasses.asdict(f) for f in failures],
                  "inconclusive": [r["name"] for r in rows if r["gate"] == INCONCLUSIVE],
                  "unavailable": [r["name"] for r in rows if r["status"] == "unavailable"]},
        "budgets": {"latency_ms": cfg.budget_latency_ms, "size_kb": cfg.budget_size_kb},
        "recommendation": dataclasses.asdict(choice),
        "pareto_front": pareto_front(rows),
        "plots": {"accuracy_vs_latency": "accuracy_vs_latency.png", "size_vs_accuracy": "size_vs_accuracy.png",
                  "confusion_matrix": "confusion_matrix.png"},
    }
    if previous.is_file():
        edge = read_json(previous).get("edge")
        if edge is not None:
            report["edge"] = edge
    return report


def table_headers(rows: list[dict]) -> list[str]:
    """HEADERS with top-5 renamed to the k actually used (k is capped at the class count); a multi-task
    run gets `<head> top-1`, `<head> vs keras` and `<head> agree` per head instead of the accuracy columns."""
    heads = rows[0].get("heads") if rows else None
    if heads:
        return [*HEADERS[:2], *(f"{h} {c}" for h in heads for c in HEAD_HEADERS), *HEADERS[7:]]
    k = rows[0]["top5_k"] if rows else 5
    return [f"top-{k}" if h == "top-5" else h for h in HEADERS]


def table_cells(rows: list[dict]) -> list[list[str]]:
    """One list of formatted cells per report row (table_headers order); the Keras row shows `ref` for deltas."""
    cells = []
    for r in rows:
        lat, thr = r.get("latency") or {}, r.get("throughput") or {}
        ok, ref = r["status"] == "ok", r["reference"]
        if r.get("heads"):
            scores = [_score_cells(h, ok, ref)[c] for h in r["heads"].values() for c in HEAD_HEADERS]
        else:
            scores = list(_score_cells(r, ok, ref).values())
        cells.append([
            r["name"], r.get("input_dtype") or "-", *scores,
            _num(lat.get("p50_ms"), "{:.2f}"), _num(lat.get("p90_ms"), "{:.2f}"),
            _num(thr.get("images_per_s"), "{:.0f}"),
            _num(None if r.get("load_time_s") is None else r["load_time_s"] * 1000, "{:.0f}"),
            _num(None if r["size_bytes"] is None else r["size_bytes"] / 1024, "{:.0f}"),
            _num(None if r["gzip_bytes"] is None else r["gzip_bytes"] / 1024, "{:.0f}"),
            _num(r.get("peak_rss_mb"), "{:.0f}"), GATE_CELLS.get(r.get("gate"), "-"),
        ])
    return cells


def _score_cells(s: dict, ok: bool, ref: bool) -> dict[str, str]:
    """The accuracy cells (HEADERS[2:7]) of one row, or of one head of it; `vs keras` with its paired interval."""
    return {"top-1": _pct(s["top1"]), "vs keras": "ref" if ref else _delta_cell(s) if ok else "-",
            "top-5": _pct(s["top5"]), "agree": "ref" if ref else _num(s["agreement"], "{:.3f}"),
            "max|dp|": "ref" if ref else _num(s["max_abs_prob_diff"], "{:.4f}")}


def _delta_cell(s: dict) -> str:
    """`-1.50 pp [-2.47,+1.08]`: the top-1 difference and its interval (rows without `noise`: the difference)."""
    noise = s.get("noise")
    interval = f" [{noise['delta_ci_low_pp']:+.2f},{noise['delta_ci_high_pp']:+.2f}]" if noise else ""
    return f"{s['delta_top1_pp']:+.2f} pp{interval}"


def _pct(value) -> str:
    return "-" if value is None else f"{value:.2%}"


def _num(value, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def format_table(rows: list[dict]) -> str:
    """Plain aligned text, one line per artifact (readable on a terminal, in a log file and in CI):
    name and input type left-aligned, the figures right-aligned."""
    lines = [table_headers(rows)] + table_cells(rows)
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
                     for line in lines)


def format_summary(report: dict) -> str:
    """Table, errors, skipped exports, gate verdict and recommendation: what `edgetl validate` prints."""
    lines = [format_table(report["artifacts"]), ""]
    lines += [f"error  {r['name']}: {r['error']}" for r in report["artifacts"] if r["status"] == "error"]
    lines += [f"warning  {r['name']}: the file differs from the exported one (sha256 in exports/manifest.json)"
              for r in report["artifacts"] if r["modified_since_export"]]
    lines += [f"not evaluated  {s['name']}: {s['status']} at export ({s['error'] or 'no reason given'})"
              for s in report["skipped"]]
    lines += [f"not measured  {', '.join(names)}: {error}" for error, names in _unavailable(report).items()]
    gates = report["gates"]
    lines.append(f"gates ({_gate_terms(gates)}): {_gate_verdict(report)}")
    lines += [f"  GATE FAILED  {f['message']}" for f in gates["failures"]]
    lines += [f"  inconclusive  {what}: {text}" for what, text in _inconclusive(report)]
    lines.append(report["recommendation"]["message"])
    if report.get("training_warning"):  # reports written before it was recorded have no such key
        lines.append(report["training_warning"])
    return "\n".join(lines)


def render_markdown(report: dict) -> str:
    """report.md: settings, the results table, gates, recommendation, per-class recall and the plots."""
    data, s, host = report["data"], report["settings"], report["host"]
    rows = report["artifacts"]
    lines = [
        f"# Validation of `{report['recipe']}`", "",
        f"Run `{report['run_dir']}` (recipe fingerprint `{report['recipe_fingerprint']}`), {report['created']}.", "",
        *([f"> **{report['training_warning']}** (recorded by training in metrics.json)", ""]
          if report.get("training_warning") else []),
        f"- Data: test split of `{data['root']}`, {data['images']} images at {data['image_size']} px "
        f"({data['resize']} resize), {len(data['classes'])} classes, decoded once with Pillow and fed to every "
        f"artifact as raw RGB in its input dtype.",
        f"- Latency: batch 1, {s['threads']} threads, {s['warmup']} warm-up then {s['runs']} timed runs of the "
        f"runtime's invoke only (no decoding); throughput at batch {s['throughput_batch']} "
        f"({s['throughput_runs']} runs). TFLite on XNNPACK, ONNX on {s['onnx_provider']}{_openvino_note(report)}.",
        f"- Host: {host.get('cpu') or host.get('machine')}, {host.get('cpu_count')} CPUs, {host.get('os')}, "
        f"Python {host.get('python')}. These are host figures; run `edgetl bench` on the device for device numbers.", "",
        "## Results", "",
        _md_table(table_headers(rows), table_cells(rows)), "",
    ]
    if report["training_top1"] is not None:
        same = "matches" if report["keras_matches_training"] else "DOES NOT match"
        lines += [f"Keras top-1 {same} the training run's test top-1 ({report['training_top1']:.2%}).", ""]
    lines += [f"- **{r['name']}** could not be evaluated: {r['error']}" for r in rows if r["status"] == "error"]
    lines += [f"- **{r['name']}** differs from the exported file (sha256 in exports/manifest.json)"
              for r in rows if r["modified_since_export"]]
    lines += [f"- **{x['name']}** was not exported ({x['status']}): {x['error'] or 'no reason given'}"
              for x in report["skipped"]]
    lines += [f"- **{', '.join(names)}** not measured: {error}" for error, names in _unavailable(report).items()]
    gates = report["gates"]
    lines += ["", "## Gates", "",
              f"Gates: {_gate_terms(gates)}. Result: **{_gate_verdict(report)}**.", ""]
    lines += [f"- {f['message']}" for f in gates["failures"]]
    lines += [f"- **{what}** inconclusive: {text}" for what, text in _inconclusive(report)]
    budgets = report["budgets"]
    lines += ["", "## Recommendation", "",
              f"Budgets: latency {_num(budgets['latency_ms'], '{:g} ms')}, size {_num(budgets['size_kb'], '{:g} KB')}.",
              "", report["recommendation"]["message"], "",
              f"Pareto front (p50 latency vs top-1): {', '.join(report['pareto_front']) or '-'}.", ""]
    ok = [r for r in rows if r["status"] == "ok"]
    heads = data.get("heads") or {None: data["classes"]}
    for head, classes in heads.items() if ok else ():
        recall = [(r["heads"][head] if head else r)["per_class_recall"] for r in ok]
        lines += [f"## Per-class recall{f' ({head})' if head else ''}", "",
                  _md_table(["class"] + [r["name"] for r in ok],
                            [[c] + [f"{rc[c]:.2%}" for rc in recall] for c in classes]), ""]
    lines += ["## Plots", ""] + [f"![{key.replace('_', ' ')}]({name})" for key, name in report["plots"].items()]
    return "\n".join(lines) + "\n"


def _gate_terms(gates: dict) -> str:
    """The bounds and how they are decided, e.g. `max top-1 drop 1 pp vs Keras, min agreement 0; 95% paired
    intervals, inconclusive: warn` (reports written before the policy existed were point-estimate gates)."""
    policy = gates.get("inconclusive_policy", "point")
    how = "point estimates" if policy == "point" else f"{gates['confidence']:.0%} paired intervals, inconclusive: {policy}"
    return (f"max top-1 drop {_num(gates['max_accuracy_drop_pp'], '{:g}')} pp vs Keras, "
            f"min agreement {_num(gates['min_agreement'], '{:g}')}; {how}")


def _gate_verdict(report: dict) -> str:
    """`passed` or `FAILED for N artifact(s)`, with the rows left inconclusive (policy warn) and not measured."""
    gates = report["gates"]
    failed = {f["artifact"] for f in gates["failures"]}
    verdict = f"FAILED for {len(failed)} artifact(s)" if failed else "passed"
    if gates.get("inconclusive"):
        verdict += f"; {len(gates['inconclusive'])} inconclusive (not failed; the test set is too small to tell)"
    if gates.get("unavailable"):
        verdict += f"; {len(gates['unavailable'])} not measured (runtime not installed)"
    return verdict


def _inconclusive(report: dict) -> list[tuple[str, str]]:
    """(row [head], its paired statistics in words) for every gate left inconclusive under the warn policy."""
    out = []
    for row in report["artifacts"]:
        if row["gate"] != INCONCLUSIVE:
            continue
        scored = row["heads"].items() if row.get("heads") else [(None, row)]
        out += [(f"{row['name']} [{head}]" if head else row["name"], PairedGate.from_dict(s["noise"]).describe())
                for head, s in scored if s["noise"]["verdict"] == INCONCLUSIVE]
    return out


def _unavailable(report: dict) -> dict[str, list[str]]:
    """{why (e.g. the pip install line): rows} for the rows whose optional runtime is not installed."""
    out: dict[str, list[str]] = {}
    for row in report["artifacts"]:
        if row["status"] == "unavailable":
            out.setdefault(row["error"], []).append(row["name"])
    return out


def _openvino_note(report: dict) -> str:
    """`, OpenVINO on its CPU plugin (...)` when the report has OpenVINO rows: how they were configured."""
    if not any(r.get("backend") == "openvino" for r in report["artifacts"]):
        return ""
    config = report["settings"].get("openvino_config") or {}
    return f", OpenVINO on its CPU plugin ({', '.join(f'{k} {v}' for k, v in config.items())})"


def _md_table(headers, cells) -> str:
    esc = [[str(c).replace("|", "\\|") for c in row] for row in [list(headers)] + list(cells)]
    out = ["| " + " | ".join(esc[0]) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(out + ["| " + " | ".join(row) + " |" for row in esc[1:]])


def _group(row: dict) -> str:
    """A plot point's color group: the format and, where recorded, the runtime, e.g. `onnx (openvino)`."""
    return f"{row['format']} ({row['backend']})" if row.get("backend") else row["format"]


def write_report(folder: Path, report: dict, class_names: list[str]) -> None:
    """Write report.json, report.md and the three plots into `folder`, each atomically."""
    from edgetl.plots import plot_confusion_matrix, plot_labeled_scatter

    folder = Path(folder)
    rows = [r for r in report["artifacts"] if r["status"] == "ok"]
    choice = report["recommendation"]["artifact"]
    points = [(r["name"], r["latency"]["p50_ms"], 100 * r["top1"], _group(r)) for r in rows]
    plot_labeled_scatter(points, folder / report["plots"]["accuracy_vs_latency"], xlabel="latency, ms (p50, batch 1)",
                         ylabel="top-1 accuracy, %", title="Accuracy vs latency (host)",
                         front=report["pareto_front"], highlight=choice, logx=True)
    points = [(r["name"], r["size_bytes"] / 1024, 100 * r["top1"], _group(r)) for r in rows]
    plot_labeled_scatter(points, folder / report["plots"]["size_vs_accuracy"], xlabel="file size, KB",
                         ylabel="top-1 accuracy, %", title="Size vs accuracy", highlight=choice, logx=True)
    shown = next(r for r in rows if r["name"] == (choice or report["reference"]))
    plot_confusion_matrix(shown["confusion_matrix"], class_names, folder / report["plots"]["confusion_matrix"],
                          title=f"{shown['name']}{' (recommended)' if choice else ''}: test confusion matrix "
                                f"(top-1 {shown['top1']:.1%})")
    atomic_write_text(folder / "report.md", render_markdown(report))
    atomic_write_json(folder / "report.json", report)

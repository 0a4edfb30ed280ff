"""Validation decisions on report rows: accuracy gates, latency/size budgets, the Pareto front and the recommendation.

Pure functions over plain row dicts (those of `report.json`'s `artifacts`), so they are tested on handmade
tables and give the same answer on a report read back from disk. Rows span runtimes (one row per runtime
and artifact), so the recommendation and the Pareto front may name the same file on another runtime.

What an *inconclusive* gate (its paired confidence interval, the row's `noise`, straddles the bound) does is
the policy (recipe `validate.inconclusive`): "warn" flags the row and fails only a drop or disagreement shown
beyond noise, "fail" counts inconclusive as failed too, "point" gates on the point estimates alone, as
edgetl did before the intervals (a drop of 0.01 pp past the bound fails, whatever the test-set size).
"""
from __future__ import annotations

from dataclasses import dataclass

from edgetl.validate.noise import FAIL, INCONCLUSIVE

REFERENCE = "keras"  # the row every other row is compared with
LATENCY_KEY = "p50_ms"  # the latency figure used for budgets, the Pareto front and the plots
EPS = 1e-9  # gates compare measured fractions; keep float noise from tripping them
POLICIES = ("warn", "fail", "point")  # what an inconclusive verdict does (see above)


@dataclass(frozen=True)
class GateFailure:
    """One artifact missing one gate: `excess` is how far the point estimate is past the threshold (in the gate's
    unit; <= 0 for an inconclusive verdict counted as failed)."""

    artifact: str
    gate: str  # "max_accuracy_drop" (percentage points), "min_agreement" (fraction) or "evaluation"
    value: float | None
    threshold: float | None
    excess: float | None
    message: str
    head: str | None = None  # the head that missed it (multi-task runs)
    verdict: str | None = None  # the paired verdict, "fail" or "inconclusive" (policy "fail"); None: point gate


@dataclass(frozen=True)
class Recommendation:
    """The chosen artifact (None when nothing qualifies), whether it fits the budgets, and the closest miss."""

    artifact: str | None
    within_budget: bool
    closest: str | None
    message: str


def check_gates(rows: list[dict], max_accuracy_drop: float | None, min_agreement: float | None,
                inconclusive: str = "point") -> list[GateFailure]:
    """Every (artifact, gate) that fails: top-1 drop vs Keras in pp, agreement with Keras, or no result at all.

    `inconclusive` is the policy (POLICIES); "warn" and "fail" decide on the verdicts in each row's `noise`,
    which `score_rows` computed for the same bounds. Rows of a multi-task run are gated on every head
    (`heads`), each failure naming its head. An unavailable row (optional runtime not installed) fails nothing.
    """
    if inconclusive not in POLICIES:
        raise ValueError(f"inconclusive policy {inconclusive!r}: expected one of {', '.join(POLICIES)}")
    ref = next(r for r in rows if r["reference"])
    failures = []
    for row in rows:
        if row["reference"] or row["status"] == "unavailable":
            continue
        name = row["name"]
        if row["status"] != "ok":
            failures.append(GateFailure(name, "evaluation", None, None, None,
                                        f"{name}: could not be evaluated ({row['error']})"))
            continue
        for head, scores in _scored(row):
            ref_scores = ref["heads"][head] if head else ref
            if inconclusive == "point":
                failures += _gate_failures(name, head, scores, ref_scores, max_accuracy_drop, min_agreement)
            else:
                failures += _paired_gate_failures(name, head, scores, ref_scores, max_accuracy_drop, min_agreement,
                                                  count_inconclusive=inconclusive == "fail")
    return failures


def _scored(row: dict) -> list[tuple[str | None, dict]]:
    """(head, its scores) per head of a multi-task row, else (None, the row itself)."""
    return list(row["heads"].items()) if "heads" in row else [(None, row)]


def _gate_failures(name: str, head: str | None, row: dict, ref: dict, max_accuracy_drop: float | None,
                   min_agreement: float | None) -> list[GateFailure]:
    """The gates one artifact's scores (of one head) miss against the Keras scores `ref`, on point estimates."""
    failures = []
    what = f"{name} [{head}]" if head else name
    drop = 100.0 * (ref["top1"] - row["top1"])
    if max_accuracy_drop is not None and drop > max_accuracy_drop + EPS:
        failures.append(GateFailure(
            name, "max_accuracy_drop", drop, max_accuracy_drop, drop - max_accuracy_drop,
            f"{what}: top-1 {row['top1']:.2%} is {drop:.2f} pp below Keras ({ref['top1']:.2%}); "
            f"max-accuracy-drop {max_accuracy_drop:g} pp exceeded by {drop - max_accuracy_drop:.2f} pp", head))
    agreement = row["agreement"]
    if min_agreement is not None and agreement < min_agreement - EPS:
        failures.append(GateFailure(
            name, "min_agreement", agreement, min_agreement, min_agreement - agreement,
            f"{what}: agrees with Keras on {agreement:.2%} of images; min-agreement {min_agreement:.2%} "
            f"missed by {100 * (min_agreement - agreement):.2f} pp", head))
    return failures


def _paired_gate_failures(name: str, head: str | None, row: dict, ref: dict, max_accuracy_drop: float | None,
                          min_agreement: float | None, count_inconclusive: bool) -> list[GateFailure]:
    """The gates one artifact's scores (of one head) fail by their paired verdicts (`row["noise"]`): a fail, and
    an inconclusive one if `count_inconclusive`; the message gives the interval (and the images needed)."""
    noise, failures = row["noise"], []
    what = f"{name} [{head}]" if head else name
    counted = (FAIL, INCONCLUSIVE) if count_inconclusive else (FAIL,)
    level = f"{noise['confidence']:.0%} interval"
    drop, agreement = 100.0 * (ref["top1"] - row["top1"]), row["agreement"]
    verdict = noise["drop_verdict"]
    if max_accuracy_drop is not None and verdict in counted:
        interval = f"[{-noise['delta_ci_high_pp']:.2f}, {-noise['delta_ci_low_pp']:.2f}] pp"
        message = (f"{what}: top-1 {row['top1']:.2%} is {drop:.2f} pp below Keras ({ref['top1']:.2%}); max-accuracy-drop "
                   f"{max_accuracy_drop:g} pp exceeded beyond noise (the drop's {level}: {interval})" if verdict == FAIL
                   else f"{what}: top-1 {row['top1']:.2%} vs Keras {ref['top1']:.2%}, the drop's {level} {interval} "
                        f"straddles max-accuracy-drop {max_accuracy_drop:g} pp: {_counted(noise['drop_images_needed'])}")
        failures.append(GateFailure(name, "max_accuracy_drop", drop, max_accuracy_drop, drop - max_accuracy_drop,
                                    message, head, verdict))
    verdict = noise["agreement_verdict"]
    if min_agreement is not None and verdict in counted:
        interval = f"[{noise['agreement_ci_low']:.2%}, {noise['agreement_ci_high']:.2%}]"
        message = (f"{what}: agrees with Keras on {agreement:.2%} of images; min-agreement {min_agreement:.2%} missed "
                   f"by {100 * (min_agreement - agreement):.2f} pp beyond noise ({level}: {interval})" if verdict == FAIL
                   else f"{what}: agrees with Keras on {agreement:.2%} of images, {level} {interval}; it straddles "
                        f"min-agreement {min_agreement:.2%}: {_counted(noise['agreement_images_needed'])}")
        failures.append(GateFailure(name, "min_agreement", agreement, min_agreement, min_agreement - agreement,
                                    message, head, verdict))
    return failures


def _counted(images_needed: int | None) -> str:
    """How the message of an inconclusive verdict that the "fail" policy counts as failed ends."""
    settle = f"~{images_needed:,} test images would settle it" if images_needed else "no test-set size settles it"
    return f"inconclusive ({settle}), counted as failed (validate.inconclusive: fail)"


def mark_gates(rows: list[dict], failures: list[GateFailure], inconclusive: str = "point") -> list[dict]:
    """Copies of `rows` with `gate` set: "reference", "unavailable" (optional runtime missing), "error" (not
    evaluated), "fail", "inconclusive" (policy "warn" only: a paired verdict straddles its bound) or "pass"."""
    failed = {f.artifact for f in failures}

    def gate(row):
        if row["reference"]:
            return "reference"
        if row["status"] != "ok":
            return "unavailable" if row["status"] == "unavailable" else "error"
        if row["name"] in failed:
            return "fail"
        undecided = inconclusive == "warn" and any(s["noise"]["verdict"] == INCONCLUSIVE for _, s in _scored(row))
        return "inconclusive" if undecided else "pass"

    return [{**row, "gate": gate(row)} for row in rows]


def latency(row: dict) -> float | None:
    """The row's latency figure (LATENCY_KEY), None when it has none."""
    return (row.get("latency") or {}).get(LATENCY_KEY)


def _rank(row: dict) -> tuple:
    """Passed before inconclusive, then most accurate first; ties go to the smaller, then the faster artifact."""
    ms = latency(row)
    return row.get("gate") == INCONCLUSIVE, -row["top1"], row["size_bytes"], ms if ms is not None else float("inf")


def recommend(rows: list[dict], budget_latency_ms: float | None = None,
              budget_size_kb: float | None = None) -> Recommendation:
    """The most accurate exported artifact that passed the gates and fits the budgets (KB = 1024 bytes).

    Without budgets that is simply the most accurate one. A row whose gate is inconclusive is chosen only
    when no passed one qualifies. When none fits, the closest is the one whose worst budget overrun
    (value / budget) is smallest.
    """
    candidates = [r for r in rows if not r["reference"] and r["status"] == "ok" and r.get("gate") != "fail"]
    if not candidates:
        return Recommendation(None, False, None, "no exported artifact was evaluated and passed the gates; "
                                                 "nothing to recommend")
    budgets = [(b, fn, unit) for b, fn, unit in (
        (budget_latency_ms, latency, "ms p50 latency"),
        (budget_size_kb, lambda r: r["size_bytes"] / 1024.0, "KB")) if b is not None]
    if not budgets:
        best = min(candidates, key=_rank)
        return Recommendation(best["name"], True, None,
                              f"recommended: {_describe(best)} (most accurate; no budget given)")

    def overrun(row):
        return max((fn(row) if fn(row) is not None else float("inf")) / max(b, EPS) for b, fn, _ in budgets)

    wanted = " and ".join(f"<= {b:g} {unit}" for b, _, unit in budgets)
    fits = [r for r in candidates if overrun(r) <= 1.0 + EPS]
    if fits:
        best = min(fits, key=_rank)
        return Recommendation(best["name"], True, None,
                              f"recommended: {_describe(best)} (most accurate of {len(fits)} within {wanted})")
    closest = min(candidates, key=lambda r: (overrun(r), _rank(r)))
    return Recommendation(None, False, closest["name"],
                          f"no artifact fits the budget ({wanted}); closest: {_describe(closest)}, "
                          f"{overrun(closest):.2f}x the budget")


def _describe(row: dict) -> str:
    """`name (top-1, p50 ms, KB)`: how the recommendation names an artifact (and an inconclusive gate)."""
    ms = latency(row)
    return (f"{row['name']} (top-1 {row['top1']:.2%}, {'-' if ms is None else f'{ms:.2f}'} ms p50, "
            f"{row['size_bytes'] / 1024:.0f} KB{', gate inconclusive' if row.get('gate') == INCONCLUSIVE else ''})")


def pareto_front(rows: list[dict]) -> list[str]:
    """Names of the evaluated artifacts that no other is both at least as fast and at least as accurate as
    (strictly better in one), fastest first."""
    points = [r for r in rows if r["status"] == "ok" and latency(r) is not None]
    front = [r for r in points if not any(
        latency(o) <= latency(r) and o["top1"] >= r["top1"] and (latency(o) < latency(r) or o["top1"] > r["top1"])
        for o in points)]
    return [r["name"] for r in sorted(front, key=latency)]

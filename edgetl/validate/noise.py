"""Paired accuracy statistics for the gates: top-1 difference vs Keras with its confidence interval, McNemar, verdicts.

The artifact and the Keras model are scored on the same test images, so their top-1 difference is paired: only
the discordant images carry information, b (Keras right, artifact wrong) and c (Keras wrong, artifact right).
This module turns those counts into an interval, an exact p-value and a three-way verdict per gate, so that a
200-image test set that cannot tell a 1.5 pp drop from noise says so instead of "failed". Pure and TF-free.

Interval for the difference: the conditional exact one. Given m = b + c discordant images, c ~ Binomial(m, p)
and the difference (artifact - Keras) is (c - b) / n = m / n * (2p - 1); the Clopper-Pearson interval for p
(statsmodels `proportion_confint(method="beta")`) is mapped through that line. Why this one: it is exact (its
coverage is at least the nominal level for every m, where Wald intervals collapse to zero width as soon as b or
c is 0, the usual case with 0-20 discordant images), it inverts the same conditional binomial test as McNemar's
exact test (the interval excludes 0 exactly when p < 1 - confidence, so interval, p-value and verdict never
contradict each other), and a library provides it (the Newcombe and Tango paired intervals are not in
statsmodels or scipy, whose `confint_proportions_2indep` is for independent samples). Its limit: it conditions
on m, so with no discordant image the interval is [0, 0]; the uncertainty of the disagreement rate itself is
what the agreement interval (Clopper-Pearson on the agreeing images) carries.

Verdicts, for a gate "drop <= max_drop_pp" (drop = Keras - artifact) and "agreement >= min_agreement": *pass*
when the whole interval is within the allowance, *fail* when the whole interval is beyond it, *inconclusive*
when it straddles the bound. With a two-sided 95 % interval each is a one-sided test at 2.5 %. A decided
verdict always agrees with today's point-estimate gate (the interval contains the point estimate), so only
*inconclusive* needs a policy.

Images needed: the smallest test set on which this same interval, computed from b and c scaled to the new size
(fractional counts: the observed disagreement rate and difference held fixed), would be decided. It extrapolates
the observed rates as if they were the true ones, so it is a break-even size, not a power calculation: a fresh
set of that size settles the question about half the time; allow about twice as many to settle it reliably.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

# statsmodels (with scipy and pandas, seconds to import) is imported where it is used: every validation worker
# imports this package (`python -m edgetl.validate.worker`) and only the parent computes statistics.

PASS, FAIL, INCONCLUSIVE = "pass", "fail", "inconclusive"
TOLERANCE = 1e-9  # bounds are compared with computed floats (pp or fractions); keep float noise from deciding a verdict
MAX_DOUBLINGS = 64  # images_needed searches up to n * 2**64 images, then gives up (None)


@dataclass(frozen=True)
class PairedGate:
    """One artifact against Keras on the same n images: the paired top-1 difference, its interval and the verdicts.

    Differences are in percentage points (artifact - Keras, negative = the artifact is worse), agreement in
    fractions. A verdict or bound is None where its gate was not asked for; `*_images_needed` is the test-set
    size that would settle an *inconclusive* verdict if the images kept the observed per-image rates (None when
    the verdict is already decided, or when the observed value equals the bound, which no test set settles).
    """

    n_images: int
    keras_only_correct: int  # b: Keras right, artifact wrong
    artifact_only_correct: int  # c: Keras wrong, artifact right
    confidence: float
    delta_top1_pp: float
    delta_ci_low_pp: float
    delta_ci_high_pp: float
    mcnemar_p: float
    max_drop_pp: float | None
    drop_verdict: str | None
    drop_images_needed: int | None
    disagreements: int | None  # images whose top-1 class differs from Keras's (>= b + c)
    agreement: float | None
    agreement_ci_low: float | None
    agreement_ci_high: float | None
    min_agreement: float | None
    agreement_verdict: str | None
    agreement_images_needed: int | None

    @property
    def verdict(self) -> str | None:
        """The row's verdict over its gates: fail if any fails, else inconclusive if any is, else pass (None: no gate)."""
        verdicts = {v for v in (self.drop_verdict, self.agreement_verdict) if v is not None}
        return next((v for v in (FAIL, INCONCLUSIVE, PASS) if v in verdicts), None)

    def to_dict(self) -> dict:
        """JSON-ready fields (plain ints, floats, strings and None) plus the combined `verdict`."""
        return {**asdict(self), "verdict": self.verdict}

    @classmethod
    def from_dict(cls, fields: dict) -> "PairedGate":
        """The gate `to_dict` wrote (e.g. a report row's `noise`), so a report read back describes it the same."""
        return cls(**{k: v for k, v in fields.items() if k != "verdict"})

    def describe(self) -> str:
        """One line for reports and the console, e.g. `-1.50 pp [-2.47, +1.08], McNemar p = 0.375: inconclusive`."""
        text = (f"{self.delta_top1_pp:+.2f} pp [{self.delta_ci_low_pp:+.2f}, {self.delta_ci_high_pp:+.2f}], "
                f"McNemar p = {self.mcnemar_p:.3g}")
        if self.agreement is not None:
            text += f", agreement {self.agreement:.2%} [{self.agreement_ci_low:.2%}, {self.agreement_ci_high:.2%}]"
        if self.verdict is not None:
            text += f": {self.verdict}"
        needed = [x for x in (self.drop_images_needed, self.agreement_images_needed) if x is not None]
        if self.verdict == INCONCLUSIVE:
            text += f" (~{max(needed):,} test images would settle it)" if needed else " (no test-set size settles it)"
        return text


def discordant_counts(keras_correct: Sequence[bool], artifact_correct: Sequence[bool]) -> tuple[int, int, int]:
    """(n, b, c) from per-image correctness: b = Keras right and artifact wrong, c = Keras wrong and artifact right."""
    ref, art = np.asarray(keras_correct, dtype=bool), np.asarray(artifact_correct, dtype=bool)
    if ref.shape != art.shape or ref.ndim != 1:
        raise ValueError(f"correctness vectors must be 1-D and of one length, got shapes {ref.shape} and {art.shape}")
    return int(ref.size), int(np.sum(ref & ~art)), int(np.sum(~ref & art))


def paired_gate_from_predictions(labels: Sequence[int], keras_pred: Sequence[int], artifact_pred: Sequence[int], *,
                                 max_drop_pp: float | None = None, min_agreement: float | None = None,
                                 confidence: float = 0.95) -> PairedGate:
    """`paired_gate` from per-image true labels and the top-1 classes of Keras and the artifact."""
    labels, ref, art = (np.asarray(a) for a in (labels, keras_pred, artifact_pred))
    if not labels.shape == ref.shape == art.shape:
        raise ValueError(f"labels and predictions must be of one shape, got {labels.shape}, {ref.shape}, {art.shape}")
    n, b, c = discordant_counts(ref == labels, art == labels)
    return paired_gate(n, b, c, disagreements=int(np.sum(ref != art)), max_drop_pp=max_drop_pp,
                       min_agreement=min_agreement, confidence=confidence)


def paired_gate(n: int, b: int, c: int, *, disagreements: int | None = None, max_drop_pp: float | None = None,
                min_agreement: float | None = None, confidence: float = 0.95) -> PairedGate:
    """Statistics and verdicts for n paired images with b (Keras-only right) and c (artifact-only right) discordant.

    `disagreements` (images whose top-1 classes differ, >= b + c) enables the agreement figures and, with
    `min_agreement`, its gate; `max_drop_pp` (allowed drop, percentage points) enables the drop gate.
    """
    if not (n >= 1 and b >= 0 and c >= 0 and b + c <= n):
        raise ValueError(f"need n >= 1 and 0 <= b, c with b + c <= n, got n={n}, b={b}, c={c}")
    if disagreements is not None and not b + c <= disagreements <= n:
        raise ValueError(f"disagreements must lie in [b + c, n] = [{b + c}, {n}], got {disagreements}")
    if min_agreement is not None and disagreements is None:
        raise ValueError("min_agreement needs disagreements (images whose top-1 class differs from Keras's)")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    from statsmodels.stats.contingency_tables import mcnemar

    alpha = 1.0 - confidence
    low, high = _delta_interval(n, b, c, alpha)
    agree_low, agree_high = _agreement_interval(n, n - disagreements, alpha) if disagreements is not None else (None, None)
    drop_gate = max_drop_pp is not None
    agreement_gate = min_agreement is not None
    return PairedGate(
        n_images=n, keras_only_correct=b, artifact_only_correct=c, confidence=confidence,
        delta_top1_pp=100.0 * (c - b) / n, delta_ci_low_pp=low, delta_ci_high_pp=high,
        mcnemar_p=float(mcnemar([[0, b], [c, 0]], exact=True).pvalue),
        max_drop_pp=max_drop_pp,
        drop_verdict=_drop_verdict(n, b, c, max_drop_pp, alpha) if drop_gate else None,
        drop_images_needed=_drop_images_needed(n, b, c, max_drop_pp, alpha) if drop_gate else None,
        disagreements=disagreements,
        agreement=1.0 - disagreements / n if disagreements is not None else None,
        agreement_ci_low=agree_low, agreement_ci_high=agree_high,
        min_agreement=min_agreement,
        agreement_verdict=_agreement_verdict(n, disagreements, min_agreement, alpha) if agreement_gate else None,
        agreement_images_needed=(_agreement_images_needed(n, disagreements, min_agreement, alpha)
                                 if agreement_gate else None),
    )


def _delta_interval(n: float, b: float, c: float, alpha: float) -> tuple[float, float]:
    """Conditional exact interval of (c - b) / n in pp: Clopper-Pearson on c / (b + c), mapped to (b + c) / n * (2p - 1).

    Counts may be fractional (the images_needed search scales them); no discordant image gives [0, 0].
    """
    from statsmodels.stats.proportion import proportion_confint

    m = b + c
    if m == 0:
        return 0.0, 0.0
    p_low, p_high = proportion_confint(c, m, alpha=alpha, method="beta")
    return float(100.0 * m / n * (2.0 * p_low - 1.0)), float(100.0 * m / n * (2.0 * p_high - 1.0))


def _agreement_interval(n: float, agreeing: float, alpha: float) -> tuple[float, float]:
    """Clopper-Pearson interval of the agreeing fraction agreeing / n."""
    from statsmodels.stats.proportion import proportion_confint

    low, high = proportion_confint(agreeing, n, alpha=alpha, method="beta")
    return float(low), float(high)


def _three_way(low: float, high: float, bound: float) -> str:
    """pass when [low, high] lies at or below `bound`, fail when wholly above it, else inconclusive."""
    if high <= bound + TOLERANCE:
        return PASS
    return FAIL if low > bound + TOLERANCE else INCONCLUSIVE


def _drop_verdict(n: float, b: float, c: float, max_drop_pp: float, alpha: float) -> str:
    """Verdict of "drop <= max_drop_pp" where drop = Keras - artifact, i.e. the negated difference interval."""
    low, high = _delta_interval(n, b, c, alpha)
    return _three_way(-high, -low, max_drop_pp)


def _drop_images_needed(n: int, b: int, c: int, max_drop_pp: float, alpha: float) -> int | None:
    """Test-set size settling the drop gate with b / n and c / n kept (None: decided, or the drop equals the bound)."""
    if math.isclose(100.0 * (b - c) / n, max_drop_pp, abs_tol=TOLERANCE):
        return None
    return _images_to_settle(n, lambda size: _drop_verdict(size, b * size / n, c * size / n, max_drop_pp, alpha))


def _agreement_verdict(n: float, disagreements: float, min_agreement: float, alpha: float) -> str:
    """Verdict of "agreement >= min_agreement", flipped onto the disagreeing fraction so `_three_way` applies."""
    low, high = _agreement_interval(n, n - disagreements, alpha)
    return _three_way(1.0 - high, 1.0 - low, 1.0 - min_agreement)


def _agreement_images_needed(n: int, disagreements: int, min_agreement: float, alpha: float) -> int | None:
    """Test-set size settling the agreement gate with disagreements / n kept (None: decided, or it equals the bound)."""
    if math.isclose(1.0 - disagreements / n, min_agreement, abs_tol=TOLERANCE):
        return None
    return _images_to_settle(
        n, lambda size: _agreement_verdict(size, disagreements * size / n, min_agreement, alpha))


def _images_to_settle(n: int, verdict_at: Callable[[int], str]) -> int | None:
    """Smallest test-set size whose verdict (counts scaled from n at the observed rates) is decided.

    None when the verdict at n is already decided or nothing up to n * 2**MAX_DOUBLINGS settles it. The
    interval narrows monotonically as the scaled set grows, so a doubling search then a bisection finds it.
    """
    if verdict_at(n) != INCONCLUSIVE:
        return None
    undecided, decided = n, 2 * n
    for _ in range(MAX_DOUBLINGS):
        if verdict_at(decided) != INCONCLUSIVE:
            break
        undecided, decided = decided, 2 * decided
    else:
        return None
    while decided - undecided > 1:
        middle = (undecided + decided) // 2
        if verdict_at(middle) == INCONCLUSIVE:
            undecided = middle
        else:
            decided = middle
    return decided

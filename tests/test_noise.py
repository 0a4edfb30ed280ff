"""Paired gate statistics (edgetl.validate.noise) against hand-computed cases: intervals, McNemar, verdicts, sizes."""
from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import pytest
from scipy.stats import beta

from edgetl.validate.noise import (
    FAIL,
    INCONCLUSIVE,
    PASS,
    PairedGate,
    discordant_counts,
    paired_gate,
    paired_gate_from_predictions,
)

KEYS = {"n_images", "keras_only_correct", "artifact_only_correct", "confidence", "delta_top1_pp", "delta_ci_low_pp",
        "delta_ci_high_pp", "mcnemar_p", "max_drop_pp", "drop_verdict", "drop_images_needed", "disagreements",
        "agreement", "agreement_ci_low", "agreement_ci_high", "min_agreement", "agreement_verdict",
        "agreement_images_needed", "verdict"}


def exact_mcnemar(b: int, c: int) -> float:
    """Two-sided exact McNemar by hand: twice the smaller binomial(b + c, 1/2) tail, capped at 1."""
    m = b + c
    return min(1.0, 2 * sum(math.comb(m, k) for k in range(min(b, c) + 1)) / 2**m)


def test_all_agree_is_a_zero_difference_that_passes_any_nonnegative_bound():
    for max_drop in (0.0, 0.5, 1.0, 5.0):
        gate = paired_gate(200, 0, 0, disagreements=0, max_drop_pp=max_drop, min_agreement=0.0)
        assert (gate.delta_top1_pp, gate.delta_ci_low_pp, gate.delta_ci_high_pp) == (0.0, 0.0, 0.0)
        assert gate.mcnemar_p == 1.0
        assert (gate.drop_verdict, gate.drop_images_needed, gate.verdict) == (PASS, None, PASS)
    gate = paired_gate(200, 0, 0, disagreements=0)
    assert gate.agreement == 1.0
    assert gate.agreement_ci_high == 1.0
    assert gate.agreement_ci_low == pytest.approx(0.025 ** (1 / 200))  # Clopper-Pearson lower bound for 200/200
    assert gate.verdict is None  # no gate asked for


def test_all_discordant_against_the_artifact():
    gate = paired_gate(100, 5, 0, max_drop_pp=1.0)
    assert gate.delta_top1_pp == pytest.approx(-5.0)
    assert gate.mcnemar_p == pytest.approx(2 / 2**5) == pytest.approx(exact_mcnemar(5, 0))
    # c = 0 of m = 5: Clopper-Pearson [0, 1 - 0.025**(1/5)], mapped by (b + c) / n * (2p - 1) in pp.
    assert gate.delta_ci_low_pp == pytest.approx(-5.0)
    assert gate.delta_ci_high_pp == pytest.approx(5.0 * (2 * (1 - 0.025 ** (1 / 5)) - 1))
    assert gate.delta_ci_low_pp <= gate.delta_top1_pp <= gate.delta_ci_high_pp
    assert gate.drop_verdict == INCONCLUSIVE  # p = 0.0625: 5 images one way are not beyond noise at 95 %


def test_all_discordant_for_the_artifact_mirrors_it():
    gate = paired_gate(100, 0, 5, max_drop_pp=1.0)
    assert gate.delta_top1_pp == pytest.approx(5.0)
    assert gate.mcnemar_p == pytest.approx(exact_mcnemar(0, 5))
    assert gate.delta_ci_low_pp == pytest.approx(5.0 * (2 * 0.025 ** (1 / 5) - 1))
    assert gate.delta_ci_high_pp == pytest.approx(5.0)
    assert gate.drop_verdict == PASS  # the drop's interval is wholly <= 0.22 pp


@pytest.mark.parametrize("n,b,c", [(200, 4, 1), (200, 1, 4), (500, 12, 3), (1000, 30, 31), (60, 7, 0)])
def test_mixed_counts_match_the_formulas(n, b, c):
    gate = paired_gate(n, b, c)
    m = b + c
    p_low, p_high = beta.ppf(0.025, c, m - c + 1) if c else 0.0, beta.ppf(0.975, c + 1, m - c) if c < m else 1.0
    assert gate.delta_top1_pp == pytest.approx(100 * (c - b) / n)
    assert gate.delta_ci_low_pp == pytest.approx(100 * m / n * (2 * p_low - 1))
    assert gate.delta_ci_high_pp == pytest.approx(100 * m / n * (2 * p_high - 1))
    assert gate.delta_ci_low_pp <= gate.delta_top1_pp <= gate.delta_ci_high_pp
    assert gate.mcnemar_p == pytest.approx(exact_mcnemar(b, c))


@pytest.mark.parametrize("b,c", [(b, c) for b in range(0, 16) for c in range(0, 16)])
def test_interval_excludes_zero_exactly_when_mcnemar_rejects(b, c):
    gate = paired_gate(400, b, c)
    excludes_zero = gate.delta_ci_high_pp < 0 or gate.delta_ci_low_pp > 0
    assert excludes_zero == (gate.mcnemar_p < 0.05)


def test_inconclusive_where_the_point_estimate_gate_fails():
    gate = paired_gate(200, 4, 1, max_drop_pp=1.0)
    assert -gate.delta_top1_pp == pytest.approx(1.5)  # today's gate: 1.5 pp > 1.0 pp, failed
    assert gate.mcnemar_p == pytest.approx(12 / 32)
    assert gate.drop_verdict == INCONCLUSIVE == gate.verdict
    assert gate.drop_images_needed > 200
    assert "inconclusive" in gate.describe() and f"{gate.drop_images_needed:,}" in gate.describe()


def test_clear_fail_and_clear_pass_on_large_sets():
    fail = paired_gate(10_000, 300, 50, max_drop_pp=1.0)
    assert -fail.delta_ci_high_pp > 1.0  # the whole drop interval is above the bound
    assert (fail.drop_verdict, fail.drop_images_needed, fail.verdict) == (FAIL, None, FAIL)
    assert fail.mcnemar_p < 1e-30
    passed = paired_gate(10_000, 20, 15, max_drop_pp=1.0)
    assert -passed.delta_ci_low_pp < 1.0
    assert (passed.drop_verdict, passed.drop_images_needed) == (PASS, None)


def test_images_needed_is_the_size_that_settles_it():
    needed = paired_gate(200, 4, 1, max_drop_pp=1.0).drop_images_needed
    below, above = (needed - 1) // 200, -(-needed // 200)  # whole multiples of the 200-image set either side
    assert paired_gate(200 * below, 4 * below, below, max_drop_pp=1.0).drop_verdict == INCONCLUSIVE
    assert paired_gate(200 * above, 4 * above, above, max_drop_pp=1.0).drop_verdict == FAIL
    # a gap twice as wide from the bound needs fewer images
    assert paired_gate(200, 4, 1, max_drop_pp=0.5).drop_images_needed < needed


def test_no_size_settles_a_drop_equal_to_the_bound():
    gate = paired_gate(200, 3, 1, max_drop_pp=1.0)
    assert gate.drop_verdict == INCONCLUSIVE
    assert gate.drop_images_needed is None
    assert "no test-set size" in gate.describe()


def test_agreement_gate():
    n, d = 200, 6  # agreement 97 %
    low, high = beta.ppf(0.025, n - d, d + 1), beta.ppf(0.975, n - d + 1, d)
    gate = paired_gate(n, 2, 1, disagreements=d, min_agreement=0.9)
    assert gate.agreement == pytest.approx(0.97)
    assert (gate.agreement_ci_low, gate.agreement_ci_high) == (pytest.approx(low), pytest.approx(high))
    assert (gate.agreement_verdict, gate.agreement_images_needed) == (PASS, None)
    assert paired_gate(n, 2, 1, disagreements=d, min_agreement=0.995).agreement_verdict == FAIL
    inconclusive = paired_gate(n, 2, 1, disagreements=d, min_agreement=0.96)
    assert inconclusive.agreement_verdict == INCONCLUSIVE
    k = -(-inconclusive.agreement_images_needed // n)
    assert paired_gate(n * k, 2 * k, k, disagreements=d * k, min_agreement=0.96).agreement_verdict == PASS
    assert paired_gate(n, 2, 1, disagreements=d, min_agreement=0.97).agreement_images_needed is None


def test_combined_verdict_takes_the_worst_gate():
    gate = paired_gate(10_000, 20, 15, disagreements=500, max_drop_pp=1.0, min_agreement=0.99)
    assert (gate.drop_verdict, gate.agreement_verdict, gate.verdict) == (PASS, FAIL, FAIL)
    gate = paired_gate(200, 4, 1, disagreements=5, max_drop_pp=1.0, min_agreement=0.5)
    assert (gate.drop_verdict, gate.agreement_verdict, gate.verdict) == (INCONCLUSIVE, PASS, INCONCLUSIVE)


def test_from_predictions_counts_discordance_and_disagreement():
    labels = [0, 1, 2, 0, 1, 2, 0, 1]
    keras = [0, 1, 2, 0, 1, 0, 1, 1]  # right on 0-4 and 7
    artifact = [0, 1, 1, 0, 2, 2, 2, 1]  # wrong on 2 and 4 (Keras right), right on 5 (Keras wrong), both wrong on 6
    gate = paired_gate_from_predictions(labels, keras, artifact, max_drop_pp=50.0, min_agreement=0.0)
    assert (gate.n_images, gate.keras_only_correct, gate.artifact_only_correct) == (8, 2, 1)
    assert gate.disagreements == 4  # images 2, 4, 5 and 6 (both wrong, different classes)
    assert gate.agreement == pytest.approx(0.5)
    assert gate == paired_gate(8, 2, 1, disagreements=4, max_drop_pp=50.0, min_agreement=0.0)
    assert discordant_counts([True, True, False, False], [True, False, True, False]) == (4, 1, 1)


def test_to_dict_is_json_ready_with_stable_keys_and_the_result_is_frozen():
    gate = paired_gate(200, 4, 1, disagreements=6, max_drop_pp=1.0, min_agreement=0.95)
    record = gate.to_dict()
    assert set(record) == KEYS
    assert json.loads(json.dumps(record, allow_nan=False)) == record
    assert record["verdict"] == gate.verdict
    assert PairedGate.from_dict(json.loads(json.dumps(record))) == gate  # a report read back describes the same gate
    with pytest.raises(dataclasses.FrozenInstanceError):
        gate.n_images = 5


@pytest.mark.parametrize("args,kwargs", [
    ((0, 0, 0), {}), ((10, 6, 5), {}), ((10, -1, 0), {}),
    ((10, 2, 2), {"disagreements": 3}), ((10, 2, 2), {"disagreements": 11}),
    ((10, 2, 2), {"min_agreement": 0.9}), ((10, 2, 2), {"confidence": 1.0}),
])
def test_impossible_inputs_are_refused(args, kwargs):
    with pytest.raises(ValueError):
        paired_gate(*args, **kwargs)


def test_module_does_not_import_tensorflow():
    code = "import sys, edgetl.validate.noise; sys.exit(any(m.split('.')[0] == 'tensorflow' for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0

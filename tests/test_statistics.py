"""The statistics behind every accuracy and verdict, against published values."""

from __future__ import annotations

import pytest

from oipipe.measure.intervals import (
    mcnemar_exact,
    paired_counts,
    paired_difference,
    verdict,
    wilson,
    z_value,
)


@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    [
        # Newcombe (1998a), "Two-sided confidence intervals for the single proportion", Table I,
        # method 3 (Wilson score): 81/263, 15/148, 0/20, 1/29.
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0, 0.1611),
        (1, 29, 0.0061, 0.1718),
    ],
)
def test_wilson_matches_newcombe(k, n, low, high) -> None:
    lo, hi = wilson(k, n)
    assert lo == pytest.approx(low, abs=6e-5) and hi == pytest.approx(high, abs=6e-5)


def test_wilson_edges_and_errors() -> None:
    assert wilson(0, 0) == (0.0, 1.0)  # no image: nothing known
    assert wilson(37, 37)[1] == 1.0 and wilson(37, 37)[0] < 1.0
    assert wilson(9, 10, 0.99)[0] < wilson(9, 10, 0.95)[0]  # wider at higher confidence
    assert z_value(0.99) == pytest.approx(2.5758, abs=1e-4)
    with pytest.raises(ValueError):
        wilson(5, 4)


@pytest.mark.parametrize(
    ("b", "c", "p"),
    [
        # Bentur et al. 2009 in Fagerland, Lydersen & Laake (2014): 1 and 7 discordant -> 0.0703
        (1, 7, 0.0703125),
        (7, 1, 0.0703125),  # symmetric in the two directions
        (0, 5, 2 * 0.5**5),  # all five one way: 2 * (1/2)^5
        (3, 3, 1.0),  # balanced: capped at 1
        (0, 0, 1.0),  # no discordant pair: no evidence of any difference
        (6, 16, 0.052478790283203),  # Cavo et al. 2012 (Fagerland et al. 2014): 6 vs 16
    ],
)
def test_mcnemar_exact(b, c, p) -> None:
    assert mcnemar_exact(b, c) == pytest.approx(p, rel=1e-9)


def test_paired_interval_matches_published_square_and_add() -> None:
    # Cavo et al. 2012 (Fagerland et al. 2014, Table 8.x; the R package contingencytables'
    # test of Newcombe_square_and_add_CI_paired_2x2): table [[59, 6], [16, 80]] gives the
    # difference -0.0621 with 95% CI -0.1186 to -0.0046. Here the variant is the second
    # measurement, so the sign flips.
    p = paired_difference(both=59, worse=6, better=16, neither=80)
    assert p.delta == pytest.approx(0.0621, abs=5e-5)
    assert p.low == pytest.approx(0.0046, abs=5e-5) and p.high == pytest.approx(0.1186, abs=5e-5)
    flipped = paired_difference(both=59, worse=16, better=6, neither=80)
    assert flipped.low == pytest.approx(-p.high) and flipped.high == pytest.approx(-p.low)


def test_paired_counts() -> None:
    ref = [1, 1, 0, 0, 1, 1]
    var = [1, 0, 1, 0, 1, 0]
    assert paired_counts(ref, var) == (2, 2, 1, 1)
    with pytest.raises(ValueError):
        paired_counts([1], [1, 0])


def test_better_variant_passes() -> None:
    # The case: one image better of 37, none worse, was marked OUTSIDE a 1.5-point bar.
    p = paired_difference(both=30, worse=0, better=1, neither=6)
    v = verdict(p, 0.015)
    assert v.verdict == "pass" and v.images_to_decide is None
    # ...and says what 37 images cannot rule out
    assert "does not rule out a loss beyond the 1.5-point bar" in v.reason
    # equal accuracy with two disagreements (eager_bf16 in the issue) passes too
    assert verdict(paired_difference(30, 1, 1, 5), 0.005).verdict == "pass"


def test_many_flips_fail() -> None:
    p = paired_difference(both=60, worse=20, better=0, neither=20)
    v = verdict(p, 0.015)
    assert v.verdict == "fail" and "worse than fp32" in v.reason


def test_within_the_bar_with_confidence_passes() -> None:
    # 5 worse of 10,000: -0.05 points, the whole interval above -1.5 points
    p = paired_difference(both=9000, worse=5, better=0, neither=995)
    assert p.low > -0.015
    v = verdict(p, 0.015)
    assert v.verdict == "pass" and v.reason.startswith("within the 1.5-point bar with confidence")


def test_too_few_images_is_undecided_with_how_many_would_decide() -> None:
    # 3 worse of 37: -8.1 points, but the interval reaches above -1.5
    p = paired_difference(both=30, worse=3, better=0, neither=4)
    v = verdict(p, 0.015)
    assert v.verdict == "undecided" and "too few images" in v.reason
    need = v.images_to_decide
    assert need is not None and need > 37
    # at that many images, with the same rates, the verdict is decided (here: fail); one fewer
    # image is not enough
    f = need / 37
    scaled = paired_difference(round(30 * f), round(3 * f), 0, need - round(30 * f) - round(3 * f))
    assert verdict(scaled, 0.015).verdict == "fail"
    f = (need - 1) / 37
    fewer = paired_difference(
        round(30 * f), round(3 * f), 0, need - 1 - round(30 * f) - round(3 * f)
    )
    assert verdict(fewer, 0.015).verdict == "undecided"


def test_slightly_worse_but_within_the_bar_decides_to_pass_with_more_images() -> None:
    # -1 point observed against a 5-point bar: undecided on 100 images, a pass with more
    p = paired_difference(both=80, worse=2, better=1, neither=17)
    v = verdict(p, 0.05)
    assert v.verdict == "undecided" and v.images_to_decide is not None
    f = v.images_to_decide / 100
    n = v.images_to_decide
    more = paired_difference(
        round(80 * f), round(2 * f), round(1 * f), n - round(80 * f) - round(2 * f) - round(1 * f)
    )
    assert verdict(more, 0.05).verdict == "pass"


def test_difference_exactly_on_the_bar_never_decides() -> None:
    p = paired_difference(both=90, worse=2, better=0, neither=8)  # -2 points, bar 2 points
    v = verdict(p, 0.02)
    assert v.verdict == "undecided" and v.images_to_decide is None

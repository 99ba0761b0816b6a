"""Accuracy figures with their uncertainty, and the paired verdict of a variant against fp32.

Pure Python (no torch, no scipy): the report imports it without loading a deep-learning stack.

- `wilson(k, n)`: the Wilson score interval of a proportion (Wilson 1927; Newcombe 1998a's
  recommended method; good coverage down to a few dozen images, never outside [0, 1]).
- `mcnemar_exact(b, c)`: the exact two-sided McNemar p-value on the discordant pairs.
- `paired_difference(...)`: the difference of two accuracies measured on the *same* images,
  with Newcombe's square-and-add interval for paired proportions (Newcombe 1998b, method 10,
  with his continuity-corrected correlation; Fagerland, Lydersen & Laake 2014 recommend it).
- `verdict(...)`: pass / fail / undecided against an accuracy bar, one-sided.

Why paired: a variant and fp32 classify the same images, so most of the sampling noise is shared.
Two independent intervals overlapping says little; what matters is the images on which they
disagree (the discordant pairs).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

# Two-sided 95%: the level every interval in the pipeline is reported at.
Z95 = 1.959963984540054


def z_value(confidence: float) -> float:
    """The two-sided normal quantile for `confidence` (0.95 -> 1.96), by bisection on erf."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if confidence == 0.95:
        return Z95
    lo, hi = 0.0, 10.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if math.erf(mid / math.sqrt(2)) < confidence:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def wilson(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of `successes / n`, as fractions; (0, 1) when n is 0."""
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return 0.0, 1.0
    z = z_value(confidence)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # exact at the ends (rounding would put 0/n a hair above 0)
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return lo, hi


def _binom_cdf_half(k: int, m: int) -> float:
    """P(X <= k) for X ~ Binomial(m, 1/2), exact in log space (m up to millions)."""
    if k < 0:
        return 0.0
    if k >= m:
        return 1.0
    log_half_m = m * math.log(0.5)
    terms = [
        math.lgamma(m + 1) - math.lgamma(i + 1) - math.lgamma(m - i + 1) + log_half_m
        for i in range(k + 1)
    ]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def mcnemar_exact(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value: under 'no difference' each of the b + c discordant
    images is equally likely to fall either way, so min(b, c) ~ Binomial(b + c, 1/2)."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got {b} and {c}")
    if b + c == 0:
        return 1.0
    return min(1.0, 2 * _binom_cdf_half(min(b, c), b + c))


@dataclass(frozen=True)
class Paired:
    """Accuracy of a variant against a reference on the same n images (fractions)."""

    n: int
    both: int  # both right
    worse: int  # reference right, variant wrong
    better: int  # reference wrong, variant right
    neither: int  # both wrong
    delta: float  # variant minus reference accuracy
    low: float  # its interval
    high: float
    mcnemar_p: float

    @property
    def variant_correct(self) -> int:
        return self.both + self.better

    @property
    def reference_correct(self) -> int:
        return self.both + self.worse


def paired_counts(reference_ok, variant_ok) -> tuple[int, int, int, int]:
    """(both, worse, better, neither) from two equal-length sequences of booleans."""
    ref, var = [bool(x) for x in reference_ok], [bool(x) for x in variant_ok]
    if len(ref) != len(var):
        raise ValueError(f"paired results need equal lengths, got {len(ref)} and {len(var)}")
    both = sum(r and v for r, v in zip(ref, var, strict=True))
    worse = sum(r and not v for r, v in zip(ref, var, strict=True))
    better = sum(v and not r for r, v in zip(ref, var, strict=True))
    return both, worse, better, len(ref) - both - worse - better


def paired_difference(
    both: int, worse: int, better: int, neither: int, confidence: float = 0.95
) -> Paired:
    """Variant minus reference accuracy with Newcombe's square-and-add interval (paired)."""
    counts = (both, worse, better, neither)
    if min(counts) < 0:
        raise ValueError(f"counts must be >= 0, got {counts}")
    n = sum(counts)
    p_var, p_ref = (both + better) / n if n else 0.0, (both + worse) / n if n else 0.0
    delta = (better - worse) / n if n else 0.0  # exact: 0 when better == worse
    if n == 0:
        return Paired(0, 0, 0, 0, 0, 0.0, -1.0, 1.0, 1.0)
    l1, u1 = wilson(both + better, n, confidence)
    l2, u2 = wilson(both + worse, n, confidence)
    # Correlation of the two accuracies, with Newcombe's continuity correction of the
    # cross-product (positive correlation is shrunk towards 0 by n/2).
    margins = (both + better) * (worse + neither) * (both + worse) * (better + neither)
    psi = 0.0
    if margins:
        cross = both * neither - better * worse
        if cross > n / 2:
            psi = (cross - n / 2) / math.sqrt(margins)
        elif cross < 0:
            psi = cross / math.sqrt(margins)
    a, b = p_var - l1, u2 - p_ref
    low = delta - math.sqrt(max(0.0, a * a + b * b - 2 * psi * a * b))
    a, b = p_ref - l2, u1 - p_var
    high = delta + math.sqrt(max(0.0, a * a + b * b - 2 * psi * a * b))
    return Paired(
        n,
        both,
        worse,
        better,
        neither,
        delta,
        max(-1.0, low),
        min(1.0, high),
        mcnemar_exact(worse, better),
    )


# --- the verdict --------------------------------------------------------------------------------

VERDICTS = ("pass", "fail", "undecided")
MAX_IMAGES_TO_DECIDE = 10_000_000


@dataclass(frozen=True)
class Verdict:
    verdict: str  # pass | fail | undecided
    reason: str
    images_to_decide: int | None  # undecided: images at the same rates that would decide it

    def as_dict(self) -> dict:
        return asdict(self)


def _decide(p: Paired, bar: float) -> str:
    """One-sided: fail only when the variant is worse than the reference by more than `bar`
    with confidence (the whole interval below -bar); pass when it is at least as good on these
    images, or shown to be within the bar (the whole interval at or above -bar)."""
    if p.high < -bar:
        return "fail"
    if p.delta >= 0 or p.low >= -bar:
        return "pass"
    return "undecided"


def _scaled(p: Paired, n: int, confidence: float) -> Paired:
    f = n / p.n
    both, worse, better = round(p.both * f), round(p.worse * f), round(p.better * f)
    return paired_difference(both, worse, better, max(0, n - both - worse - better), confidence)


def images_to_decide(p: Paired, bar: float, confidence: float = 0.95) -> int | None:
    """How many images, at the rates observed, would turn an undecided verdict into a pass or
    a fail; None when no number would (the observed difference sits exactly on the bar)."""
    if p.n == 0 or _decide(p, bar) != "undecided" or math.isclose(p.delta, -bar, abs_tol=1e-12):
        return None
    lo, hi = p.n, p.n
    while _decide(_scaled(p, hi, confidence), bar) == "undecided":
        lo, hi = hi, hi * 2
        if hi > MAX_IMAGES_TO_DECIDE:
            return None
    while hi - lo > 1:  # the smallest n that decides, up to the rounding of scaled counts
        mid = (lo + hi) // 2
        if _decide(_scaled(p, mid, confidence), bar) == "undecided":
            lo = mid
        else:
            hi = mid
    return hi


def verdict(p: Paired, bar: float, confidence: float = 0.95) -> Verdict:
    """The variant's verdict against a bar in accuracy points as a fraction (0.015 = 1.5 pts)."""
    if bar < 0:
        raise ValueError(f"the accuracy bar must be >= 0, got {bar}")
    pts = 100 * bar
    span = (
        f"{100 * p.delta:+.1f} points, {confidence:.0%} interval [{100 * p.low:+.1f}, "
        f"{100 * p.high:+.1f}] on {p.n} images ({p.worse} worse, {p.better} better)"
    )
    decided = _decide(p, bar)
    if decided == "fail":
        return Verdict(
            "fail",
            f"worse than fp32 by more than the {pts:g}-point bar with confidence: {span}",
            None,
        )
    if decided == "pass":
        if p.low >= -bar:
            return Verdict("pass", f"within the {pts:g}-point bar with confidence: {span}", None)
        # the spec's "as good or better passes": say plainly what these images cannot rule out
        return Verdict(
            "pass",
            f"as good as fp32 or better on these images: {span}; the "
            f"interval does not rule out a loss beyond the {pts:g}-point bar",
            None,
        )
    need = images_to_decide(p, bar, confidence)
    more = (
        f"about {need} images at these rates would decide it"
        if need
        else "no number of images at these rates would decide it"
    )
    return Verdict(
        "undecided",
        f"too few images to tell whether it is within the {pts:g}-point bar: {span}; {more}",
        need,
    )

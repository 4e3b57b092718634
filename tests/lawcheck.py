"""Whether two samplers draw from the same law: two-sample statistics, corrected for the number of tests.

For each compared quantity (one variate's value at one forecast step, or a statistic of a whole
sample path), ``compare`` computes

- the two-sample Kolmogorov-Smirnov p-value (scipy);
- z-test p-values for the mean and for the variance.  Toto's Student-T components have 2 < df, so the
  raw fourth moment, and with it the spread of a sample variance, may be infinite: both samples are
  clipped to the pooled sample's 1..99% range first (the same for both, so the law being equal
  still means the clipped laws are equal), where the normal approximation is sound;
- whether the candidate's 5..95% quantiles lie within the reference's quantiles at ``q -/+ delta``,
  ``delta`` being the sum of the two samples' Dvoretzky-Kiefer-Wolfowitz bounds at the given
  confidence.

``judge`` decides a family of comparisons: Holm's step-down correction over every p-value of the
family at the family-wise level ``alpha``, and the DKW bound at ``alpha`` shared by all comparisons
(Bonferroni).  The same-law sampler must pass; a negative control, a sampler with one known fault,
must fail, which is what shows the statistics have the power to see such a fault.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from scipy import stats

QUANTILES = np.round(np.arange(0.05, 0.951, 0.05), 2)
CLIP = (0.01, 0.99)


@dataclass(frozen=True)
class Comparison:
    """One quantity compared: its p-values and its quantile check."""

    name: str
    ks_p: float
    mean_p: float
    std_p: float
    quantile_misses: tuple[float, ...]  # the quantile levels outside the DKW bound
    n: tuple[int, int]

    @property
    def pvalues(self) -> dict[str, float]:
        return {"ks": self.ks_p, "mean": self.mean_p, "std": self.std_p}


@dataclass
class Judgement:
    """A family's verdict: which hypotheses Holm rejects and which quantile checks fail."""

    alpha: float
    comparisons: list[Comparison]
    rejected: list[tuple[str, str, float]] = field(default_factory=list)  # (quantity, statistic, p)
    quantile_failures: list[tuple[str, tuple[float, ...]]] = field(default_factory=list)

    @property
    def same_law(self) -> bool:
        return not self.rejected and not self.quantile_failures

    def rejects(self, prefix: str) -> bool:
        """Whether some statistic of the quantities named ``prefix...`` is rejected."""
        return any(name.startswith(prefix) for name, _, _ in self.rejected) or \
            any(name.startswith(prefix) for name, _ in self.quantile_failures)

    def smallest_p(self, prefix: str) -> float:
        return min(p for c in self.comparisons if c.name.startswith(prefix) for p in c.pvalues.values())

    @property
    def first_threshold(self) -> float:
        """Holm's threshold for the smallest p-value: ``alpha`` over the number of p-values."""
        return self.alpha / (3 * len(self.comparisons))

    def summary(self) -> str:
        lines = [f"{len(self.comparisons)} quantities, {3 * len(self.comparisons)} p-values, alpha {self.alpha:g} "
                 f"(Holm; first threshold {self.first_threshold:.3g})"]
        lines += [f"  rejected {name} {statistic} p={p:.3g}" for name, statistic, p in self.rejected[:12]]
        lines += [f"  quantiles outside the DKW bound: {name} at {list(levels)}"
                  for name, levels in self.quantile_failures[:12]]
        return "\n".join(lines)


def dkw_epsilon(n: int, alpha: float) -> float:
    """The DKW bound: ``sup |F_n - F| <= epsilon`` with probability at least ``1 - alpha``."""
    return math.sqrt(math.log(2 / alpha) / (2 * n))


def _z_p(z: float) -> float:
    return float(2 * stats.norm.sf(abs(z)))


def compare(name: str, reference: np.ndarray, candidate: np.ndarray, dkw_alpha: float) -> Comparison:
    """Compare two one-dimensional samples; ``dkw_alpha`` is the quantile check's error rate for this pair."""
    a, b = np.asarray(reference, dtype=np.float64), np.asarray(candidate, dtype=np.float64)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise AssertionError(f"{name}: samples are not all finite")
    ks_p = float(stats.ks_2samp(a, b, method="asymp").pvalue)
    low, high = np.quantile(np.concatenate([a, b]), CLIP)
    ca, cb = np.clip(a, low, high), np.clip(b, low, high)
    mean_p = _z_p((ca.mean() - cb.mean()) / math.sqrt(ca.var() / len(ca) + cb.var() / len(cb) + 1e-300))
    std_p = _z_p((ca.var() - cb.var()) / math.sqrt(_variance_of_variance(ca) + _variance_of_variance(cb) + 1e-300))
    delta = dkw_epsilon(len(a), dkw_alpha / 2) + dkw_epsilon(len(b), dkw_alpha / 2) + 1 / len(a)
    found = np.quantile(b, QUANTILES)
    lower = np.quantile(a, np.clip(QUANTILES - delta, 0, 1))
    upper = np.quantile(a, np.clip(QUANTILES + delta, 0, 1))
    misses = tuple(float(q) for q, x, lo, hi in zip(QUANTILES, found, lower, upper) if not lo <= x <= hi)
    return Comparison(name, ks_p, mean_p, std_p, misses, (len(a), len(b)))


def _variance_of_variance(x: np.ndarray) -> float:
    """The large-sample variance of the sample variance: ``(m4 - m2**2) / n``."""
    centred = x - x.mean()
    m2, m4 = (centred ** 2).mean(), (centred ** 4).mean()
    return float((m4 - m2 ** 2) / len(x))


def holm(pvalues: list[float], alpha: float) -> list[bool]:
    """Holm's step-down procedure: which hypotheses are rejected at family-wise level ``alpha``."""
    order = sorted(range(len(pvalues)), key=pvalues.__getitem__)
    rejected = [False] * len(pvalues)
    for rank, index in enumerate(order):
        if pvalues[index] > alpha / (len(pvalues) - rank):
            break
        rejected[index] = True
    return rejected


def judge(comparisons: list[Comparison], alpha: float) -> Judgement:
    """Holm over every p-value of ``comparisons``; their quantile checks were made at ``alpha / len``."""
    flat = [(c.name, statistic, p) for c in comparisons for statistic, p in c.pvalues.items()]
    verdict = Judgement(alpha, comparisons)
    verdict.rejected = [item for item, out in zip(flat, holm([p for _, _, p in flat], alpha)) if out]
    verdict.quantile_failures = [(c.name, c.quantile_misses) for c in comparisons if c.quantile_misses]
    return verdict


def paired_quantities(reference: np.ndarray, candidate: np.ndarray, prefix: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """What is compared of two forecasts' samples, each ``(variates, steps, samples)``: name -> the two samples.

    Each variate at each step (the marginals).  Where there are several steps or variates, also how the
    values of one sample path go together (a chain decodes from its own draws): a variate's mean over the
    steps, and for pairs of values (each variate's first step with each later step, and the first variate's
    last step with each other variate's) the product of their centred ranks in the pooled samples.  The
    product's mean is a rank correlation over twelve; the ranks are pooled, so the pair of samples is
    still exchangeable where the laws are the same.
    """
    variates, steps, _ = reference.shape
    out = {f"{prefix}/v{v}/t{t}": (reference[v, t], candidate[v, t]) for v in range(variates) for t in range(steps)}
    if steps > 1:
        out |= {f"{prefix}/v{v}/path-mean": (reference[v].mean(0), candidate[v].mean(0)) for v in range(variates)}
    pairs = [((v, 0), (v, t)) for v in range(variates) for t in range(1, steps)]
    pairs += [((0, steps - 1), (v, steps - 1)) for v in range(1, variates)]
    for (v, t), (w, u) in pairs:
        first, second = _centred_ranks(reference[v, t], candidate[v, t]), _centred_ranks(reference[w, u], candidate[w, u])
        out[f"{prefix}/rank-product/v{v}t{t}-v{w}t{u}"] = (first[0] * second[0], first[1] * second[1])
    return out


def _centred_ranks(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ranks of ``a`` and ``b`` in their pooled sample, scaled to (0, 1) and centred."""
    ranks = (stats.rankdata(np.concatenate([a, b])) - 0.5) / (len(a) + len(b)) - 0.5
    return ranks[:len(a)], ranks[len(a):]


# ---------------------------------------------------------------- negative controls


def shifted(law: Any) -> Any:
    """The kept law with its location moved by a tenth of its interquartile range, at each kept step.

    (A robust scale: with 2 < df, a Student-T's standard deviation may be dominated by its tails.)
    """
    import torch

    levels = torch.tensor([0.25, 0.75], dtype=torch.float64, device=law.loc.device)
    quartiles = torch.quantile(law.sample(8192).double(), levels, dim=0)
    law.loc = law.loc + 0.1 * (quartiles[1] - quartiles[0]).to(law.loc.dtype)
    return law


def permuted(law: Any) -> Any:
    """The kept law with its mixture weights given to the next component (a roll over the components)."""
    law.probs = law.probs.roll(1, dims=-1)
    return law


WRONG_PATCH = "wrong-patch"  # the law of the patch before the kept one; made by ``controlled``


def controlled(law_class: Any, control: str) -> Callable[..., Any]:
    """A replacement for ``law_class.of`` that returns the kept law with the fault ``control``."""
    original = law_class.of.__func__

    def of(cls: Any, distr: Any, keep: int, own: bool = False) -> Any:
        if control != WRONG_PATCH:
            law = original(cls, distr, keep, own)
            return None if law is None else {"shifted": shifted, "permuted": permuted}[control](law)
        law = original(cls, distr, 2 * keep, own)
        if law is not None:
            first = (slice(None), slice(None), slice(0, keep))
            law.probs, law.loc, law.scale = law.probs[first], law.loc[first], law.scale[first]
            law.components = tuple(c[first] for c in law.components)
        return law

    return classmethod(of)


CONTROLS = ("shifted", "permuted", WRONG_PATCH)

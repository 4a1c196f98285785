"""Robust statistics for timing samples, and the plan and verdict of an A/B timing comparison.

Timings are skewed to the right (a descheduled thread, a page fault, a GC pause), so the
summaries are medians and interquartile ranges, and a difference between two variants comes
with a bootstrap confidence interval rather than a bare ratio. Nothing here measures anything.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from scipy import stats as scipy_stats

Number = Union[int, float]


def _as_samples(samples: Sequence[Number], name: str = "samples") -> np.ndarray:
    arr = np.asarray(samples, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name}: expected a non-empty 1-D sequence of numbers, got shape "
                         f"{arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: expected finite numbers, got {arr[~np.isfinite(arr)][:3]}")
    return arr


def median(samples: Sequence[Number]) -> float:
    """The median of a non-empty sequence of numbers."""
    return float(np.median(_as_samples(samples)))


def iqr(samples: Sequence[Number]) -> float:
    """The interquartile range: the 75th minus the 25th percentile, each by linear interpolation
    between order statistics (numpy.percentile's default, R's quantile type 7). For 1..8 it is
    6.25 - 2.75 = 3.5 (statistics.quantiles' default "exclusive" method would give 4.5).

    The one IQR of the project: reports, studies and benchmarks all call this."""
    q25, q75 = np.percentile(_as_samples(samples), [25, 75])
    return float(q75 - q25)


def summarize(samples: Sequence[Number]) -> Dict[str, Number]:
    """Summary of timing samples given in milliseconds.

    Returns {"median_ms", "iqr_ms", "min_ms", "max_ms", "n"}.
    """
    arr = _as_samples(samples)
    return {"median_ms": median(arr), "iqr_ms": iqr(arr), "min_ms": float(arr.min()),
            "max_ms": float(arr.max()), "n": int(arr.size)}


def interleaved_order(variants: Sequence[str], rounds: int) -> List[List[str]]:
    """The order in which to run variants: one list per round, every variant once per round.

    Round r starts at variant r % k and goes round in the given order (ABC, BCA, CAB, ...), so
    slow drift (thermal throttling, a background job) and the cost of going first or following a
    given variant hit every variant alike instead of biasing one.
    """
    variants = _order_arguments("interleaved_order", variants, rounds)
    k = len(variants)
    return [[variants[(r + i) % k] for i in range(k)] for r in range(rounds)]


def _order_arguments(name: str, variants: Sequence[str], rounds: int) -> List[str]:
    """An order's variants as a list, after checking them and ``rounds`` (ValueError)."""
    variants = list(variants)
    if not variants:
        raise ValueError(f"{name}: variants is empty; expected at least one name")
    if len(set(variants)) != len(variants):
        raise ValueError(f"{name}: variants {variants} repeat a name; expected distinct names")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ValueError(f"{name}: rounds must be an int >= 0, got {rounds!r}")
    return variants


def balanced_period(k: int) -> int:
    """How many rounds balanced_order takes to balance ``k`` variants: k for an even k, 2k for
    an odd one (a Williams square of odd order balances carry-over only with its rows
    reversed), 1 for k = 1."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"balanced_period: k must be an int >= 1, got {k!r}")
    return 1 if k == 1 else k if k % 2 == 0 else 2 * k


def balanced_order(variants: Sequence[str], rounds: int) -> List[List[str]]:
    """The order in which to run variants: one list per round, every variant once per round,
    the rows of a Williams design (a balanced Latin square) cycling over the rounds.

    interleaved_order's rotation balances positions but not neighbours: B always follows A. A
    variant leaves state for the next one (a framework's OpenMP threads still spinning, caches
    and allocator pools it filled), so its cost lands on whichever follows it. Over each
    balanced_period(k) rounds here, every variant takes every position equally often and
    immediately follows every other variant equally often, so first-order carry-over hits
    every variant alike. Rows: 0, 1, k-1, 2, k-2, ... shifted by the row's number (mod k);
    for an odd k, those k rows and then each of them reversed.
    """
    variants = _order_arguments("balanced_order", variants, rounds)
    k = len(variants)
    first = [0] + [(j + 1) // 2 if j % 2 else k - j // 2 for j in range(1, k)]
    rows = [[(i + shift) % k for i in first] for shift in range(k)]
    if k % 2 and k > 1:
        rows += [row[::-1] for row in rows]
    return [[variants[i] for i in rows[r % len(rows)]] for r in range(rounds)]


def overhead_schedule(instrumented: int, plain: int) -> List[bool]:
    """The order of instrumented (True) and uninstrumented (False) steps for timing the
    instrumentation's overhead: adjacent pairs, instrumented first in even pairs and second in
    odd ones (IP PI IP ...), then what one kind has left over.

    A step here varies by 10-20% from the next under a shared machine's load; pairs of
    neighbouring steps share their moment's load, which the paired bootstrap
    (bootstrap_diff_ci) then cancels, and alternating who goes first keeps a cost of following
    the other kind (a cold cache after installing or removing hooks) from biasing one side.
    """
    for name, value in (("instrumented", instrumented), ("plain", plain)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"overhead_schedule: {name}: expected an int >= 0, got {value!r}")
    pairs = min(instrumented, plain)
    order: List[bool] = []
    for k in range(pairs):
        order += [True, False] if k % 2 == 0 else [False, True]
    return order + [True] * (instrumented - pairs) + [False] * (plain - pairs)


# Statistics with a numpy twin that reduces along an axis, so the bootstrap can evaluate all
# resamples at once instead of calling back into Python thousands of times.
_VECTORIZED: Dict[Callable, Callable] = {median: np.median, np.median: np.median,
                                         np.mean: np.mean}


def _takes_axis(statistic: Callable) -> bool:
    try:
        return "axis" in inspect.signature(statistic).parameters
    except (TypeError, ValueError):   # builtins and ufuncs without an inspectable signature
        return False


def bootstrap_diff_ci(a: Sequence[Number], b: Sequence[Number], *,
                      statistic: Callable = median, confidence: float = 0.95,
                      n_resamples: int = 9999, seed: int = 0,
                      paired: Optional[bool] = None) -> Tuple[float, float, float]:
    """Relative difference of b over a, in percent, with a bootstrap confidence interval.

    The estimate is (statistic(b) / statistic(a) - 1) * 100; returns (estimate_pct, low_pct,
    high_pct). Paired samples (a[i] and b[i] measured in the same interleaved round) have
    their round indices resampled jointly, which cancels drift between rounds; unpaired ones
    (two separate runs, whose i-th steps share nothing) are resampled independently.
    ``paired``: None (the default) takes samples of equal length to be paired; False
    resamples them independently whatever their lengths; True requires equal lengths.

    Uses scipy.stats.bootstrap with the percentile method: BCa's acceleration comes from a
    jackknife, and the jackknife is not a consistent estimator for the median (our default
    statistic), so BCa's correction would be noise there; BCa also returns NaN on degenerate
    data. If every resample gives the same value (e.g. both samples constant) the interval is
    the point estimate with zero width.
    """
    a_arr = _as_samples(a, "a")
    b_arr = _as_samples(b, "b")
    if a_arr.size < 2 or b_arr.size < 2:
        raise ValueError(f"bootstrap_diff_ci: a and b need >= 2 samples each, got {a_arr.size} "
                         f"and {b_arr.size}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"bootstrap_diff_ci: confidence must lie in (0, 1), got {confidence}")
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 1:
        raise ValueError(f"bootstrap_diff_ci: n_resamples must be an int >= 1, got "
                         f"{n_resamples!r}")
    if paired is None:
        paired = a_arr.size == b_arr.size
    elif paired and a_arr.size != b_arr.size:
        raise ValueError(f"bootstrap_diff_ci: paired=True needs as many samples in a as in b, "
                         f"got {a_arr.size} and {b_arr.size}")

    base = float(statistic(a_arr))
    if base == 0.0 or not math.isfinite(base):
        raise ValueError(f"bootstrap_diff_ci: statistic(a) is {base}; a relative difference "
                         f"needs a finite, non-zero baseline")
    estimate = (float(statistic(b_arr)) / base - 1.0) * 100.0

    # Constant samples have only one possible resample value; skip the bootstrap, whose
    # interval would be degenerate (and, for other methods, NaN with a warning).
    if np.ptp(a_arr) == 0.0 and np.ptp(b_arr) == 0.0:
        return estimate, estimate, estimate

    reduce = _VECTORIZED.get(statistic)
    if reduce is None and _takes_axis(statistic):
        reduce = statistic
    if reduce is not None:
        def rel_diff(x, y, axis=-1):
            return (reduce(y, axis=axis) / reduce(x, axis=axis) - 1.0) * 100.0
        vectorized = True
    else:
        def rel_diff(x, y):
            return (statistic(y) / statistic(x) - 1.0) * 100.0
        vectorized = False

    result = scipy_stats.bootstrap(
        (a_arr, b_arr), rel_diff, n_resamples=n_resamples, vectorized=vectorized,
        paired=bool(paired), confidence_level=confidence, method="percentile",
        random_state=np.random.default_rng(seed))
    low = float(result.confidence_interval.low)
    high = float(result.confidence_interval.high)
    if not (math.isfinite(low) and math.isfinite(high)):
        # A resample whose baseline statistic is 0 (e.g. mostly-zero samples) divides by zero.
        raise ValueError(f"bootstrap_diff_ci: the interval is not finite ({low}, {high}); the "
                         f"baseline statistic is 0 in some resamples of a")
    # Not widened to contain the estimate: a percentile interval that misses its own estimate
    # says the bootstrap is unreliable here (too few or too coarse samples), which a reader
    # should see.
    return estimate, low, high


def _fmt_pct(x: float) -> str:
    # Adding 0.0 turns a rounded -0.0 into 0.0, so a tiny negative reads "+0.0", not "-0.0".
    return f"{round(x, 1) + 0.0:+.1f}"


def describe_diff(label: str, variant: str, baseline: str, est: float, lo: float,
                  hi: float) -> str:
    """One line describing a timing difference of variant against baseline, in percent.

    est, lo, hi are as returned by bootstrap_diff_ci(baseline_samples, variant_samples): the
    samples are times, so a negative difference means the variant is faster. The verdict is
    "faster" or "slower" when the interval excludes 0, else "no clear difference". Example:
    "loss backward, explicit vs autograd: -3.1% [-4.0, -2.2] faster".
    """
    if lo > hi:
        raise ValueError(f"describe_diff: lo ({lo}) is above hi ({hi})")
    if hi < 0.0:
        verdict = "faster"
    elif lo > 0.0:
        verdict = "slower"
    else:
        verdict = "no clear difference"
    return (f"{label}, {variant} vs {baseline}: {_fmt_pct(est)}% "
            f"[{_fmt_pct(lo)}, {_fmt_pct(hi)}] {verdict}")


def _slope(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least-squares slope of y over x along y's last axis (y may stack many series)."""
    xc = x - x.mean()
    return (y - y.mean(axis=-1, keepdims=True)) @ xc / float(xc @ xc)


def bootstrap_slope_ci(x: Sequence[Number], y_rounds: Sequence[Sequence[Number]], *,
                       baseline_rounds: Sequence[Sequence[Number]] = None,
                       confidence: float = 0.95, n_resamples: int = 9999,
                       seed: int = 0) -> Tuple[float, float, float]:
    """Slope of y over x, with a bootstrap confidence interval over rounds.

    ``y_rounds[r][i]`` is y at ``x[i]`` measured in round r (every x once per round, as
    interleaved rounds measure them). The slope is the least-squares slope through the
    per-x medians over rounds; the interval resamples whole rounds (the x values of one round
    stay together, so drift between rounds cancels as in bootstrap_diff_ci) and takes the
    percentile interval. Returns (slope, low, high) in y units per x unit.

    With ``baseline_rounds`` (the same shape, measured in the same rounds) returns instead the
    relative difference of the slope over the baseline's slope in percent, resampling the
    rounds of both jointly (paired): (slope / baseline_slope - 1) * 100.
    """
    x_arr = np.asarray(x, dtype=np.float64)
    if x_arr.ndim != 1 or x_arr.size < 2 or np.ptp(x_arr) == 0.0 or not np.all(
            np.isfinite(x_arr)):
        raise ValueError(f"bootstrap_slope_ci: x: expected >= 2 finite values, not all equal, "
                         f"got {list(x_arr)}")

    def as_rounds(name, rounds) -> np.ndarray:
        arr = np.asarray(rounds, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[1] != x_arr.size or arr.shape[0] < 2:
            raise ValueError(f"bootstrap_slope_ci: {name}: expected >= 2 rounds of "
                             f"{x_arr.size} values (one per x), got shape {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"bootstrap_slope_ci: {name}: expected finite numbers")
        return arr

    y = as_rounds("y_rounds", y_rounds)
    base = None if baseline_rounds is None else as_rounds("baseline_rounds", baseline_rounds)
    if base is not None and base.shape != y.shape:
        raise ValueError(f"bootstrap_slope_ci: baseline_rounds: expected the shape of y_rounds "
                         f"{y.shape}, got {base.shape}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"bootstrap_slope_ci: confidence must lie in (0, 1), got {confidence}")
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 1:
        raise ValueError(f"bootstrap_slope_ci: n_resamples must be an int >= 1, got "
                         f"{n_resamples!r}")

    def effect(picks: np.ndarray) -> np.ndarray:
        # picks: (resamples, rounds) round indices; medians over the picked rounds per x.
        slope = _slope(x_arr, np.median(y[picks], axis=1))
        if base is None:
            return slope
        base_slope = _slope(x_arr, np.median(base[picks], axis=1))
        return (slope / base_slope - 1.0) * 100.0

    rounds = y.shape[0]
    estimate = float(effect(np.arange(rounds)[None, :])[0])
    if not math.isfinite(estimate):
        raise ValueError("bootstrap_slope_ci: the baseline's slope is 0; a relative difference "
                         "needs a non-zero baseline slope")
    rng = np.random.default_rng(seed)
    values = effect(rng.integers(0, rounds, size=(n_resamples, rounds)))
    if not np.all(np.isfinite(values)):
        raise ValueError("bootstrap_slope_ci: the baseline's slope is 0 in some resamples; "
                         "the relative interval is not finite")
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return estimate, float(low), float(high)


def paired_ratio_ci(a: Sequence[Number], b: Sequence[Number], *, confidence: float = 0.95,
                    n_resamples: int = 9999, seed: int = 0) -> Tuple[float, float, float]:
    """The median of the pairs' ratios b[i] / a[i], as a difference in percent, with a bootstrap
    percentile interval over pairs: (estimate_pct, low_pct, high_pct).

    For pairs measured side by side (overhead_schedule's neighbouring steps): each ratio cancels
    the load its two steps shared, which a ratio of the two medians keeps (the medians of two
    samples that drift together can still fall on different moments). On the same 100 pairs
    of PyTorch ResNet-20 steps here, the overhead's interval was [+2.3, +14.8] as a ratio of
    medians and [+3.5, +6.0] as a median of ratios.
    """
    a_arr, b_arr = _as_samples(a, "a"), _as_samples(b, "b")
    if a_arr.size != b_arr.size or a_arr.size < 2:
        raise ValueError(f"paired_ratio_ci: a and b need the same number (>= 2) of samples, "
                         f"got {a_arr.size} and {b_arr.size}")
    if np.any(a_arr <= 0) or np.any(b_arr <= 0):
        raise ValueError("paired_ratio_ci: ratios need positive samples (times)")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"paired_ratio_ci: confidence must lie in (0, 1), got {confidence}")
    log_ratios = np.log(b_arr / a_arr)
    estimate = float(np.expm1(np.median(log_ratios)) * 100.0)
    picks = np.random.default_rng(seed).integers(0, log_ratios.size,
                                                 size=(n_resamples, log_ratios.size))
    medians = np.median(log_ratios[picks], axis=1)
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.expm1(np.percentile(medians, [tail, 100.0 - tail])) * 100.0
    return estimate, float(low), float(high)


# The instrumentation's overhead budget, in percent of the uninstrumented step.
OVERHEAD_GOAL_PCT = {"cpu": 5.0, "cuda": 3.0}


def overhead_summary(instrumented_ms: Sequence[Number], plain_ms: Sequence[Number], *,
                     goal_pct: float) -> Dict[str, object]:
    """The instrumentation's overhead in percent with a bootstrap 95% interval: with as many
    steps of each kind (the engine times them in neighbouring pairs, overhead_schedule), the
    median of the pairs' ratios (paired_ratio_ci); otherwise the instrumented steps' median over
    the uninstrumented ones' (bootstrap_diff_ci, unpaired). And a verdict against
    ``goal_pct``: "within the goal" (the interval lies below it), "over the
    goal" (above it), else "not measurable" (the interval straddles the goal and is wider
    than it: the steps vary more than the overhead to be measured) or "inconclusive" (it
    straddles the goal, narrower than it).

    Returns {"overhead_pct", "overhead_ci_pct": [low, high] or None, "overhead_goal_pct",
    "overhead_verdict"}; with fewer than two steps of either kind, no interval and the
    verdict "not measured"."""
    out: Dict[str, object] = {"overhead_pct": None, "overhead_ci_pct": None,
                              "overhead_goal_pct": goal_pct, "overhead_verdict": "not measured"}
    if not instrumented_ms or not plain_ms:
        return out
    out["overhead_pct"] = (median(instrumented_ms) / median(plain_ms) - 1) * 100
    if len(instrumented_ms) < 2 or len(plain_ms) < 2:
        return out
    if len(instrumented_ms) == len(plain_ms):
        est, low, high = paired_ratio_ci(plain_ms, instrumented_ms)
    else:
        est, low, high = bootstrap_diff_ci(plain_ms, instrumented_ms)
    out["overhead_pct"] = est
    out["overhead_ci_pct"] = [low, high]
    if low > goal_pct:
        out["overhead_verdict"] = "over the goal"
    elif high <= goal_pct:
        out["overhead_verdict"] = "within the goal"
    elif high - low > goal_pct:
        out["overhead_verdict"] = "not measurable"
    else:
        out["overhead_verdict"] = "inconclusive"
    return out


def describe_overhead(summary: Dict[str, object]) -> str:
    """One line for a table: "instrumentation overhead: +2.1% [-0.4, +4.0] of the step (goal
    5%): within the goal"."""
    est, ci = summary.get("overhead_pct"), summary.get("overhead_ci_pct")
    if est is None:
        return "instrumentation overhead: not measured (no uninstrumented steps)"
    interval = f" [{_fmt_pct(ci[0])}, {_fmt_pct(ci[1])}]" if ci else ""
    return (f"instrumentation overhead: {_fmt_pct(est)}%{interval} of the step (goal "
            f"{summary['overhead_goal_pct']:g}%): {summary['overhead_verdict']}")


# --------------------------------------------------------------------------- exact intervals

@dataclass(frozen=True)
class MedianInterval:
    """A median with its distribution-free interval: ``low`` and ``high`` are order statistics
    of the n values, and ``confidence`` is the interval's exact coverage of the population
    median for n independent values from any continuous distribution (not the nominal level
    asked for: at n = 10 a "95%" interval is [x(2), x(9)], whose coverage is 97.9%)."""
    estimate: float
    low: float
    high: float
    confidence: float
    n: int


def median_interval_rank(n: int, confidence: float = 0.95) -> Tuple[int, float]:
    """(k, coverage): the largest k such that [x(k), x(n+1-k)] (1-based order statistics)
    covers the median with probability >= ``confidence``, and that probability,
    1 - 2 P(Binomial(n, 1/2) <= k - 1). k is 0 where even the range [x(1), x(n)] falls short
    (n <= 5 at 95%: the range of 5 values covers 93.75%)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"median_interval_rank: n: expected an int >= 1, got {n!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"median_interval_rank: confidence: expected a number in (0, 1), got "
                         f"{confidence!r}")
    best = (0, 0.0)
    for k in range(1, (n + 1) // 2 + 1):
        coverage = 1.0 - 2.0 * float(scipy_stats.binom.cdf(k - 1, n, 0.5))
        if coverage < confidence:
            break
        best = (k, coverage)
    return best


def median_ci(values: Sequence[Number], confidence: float = 0.95) -> MedianInterval:
    """The median of ``values`` with its exact distribution-free interval (order statistics,
    median_interval_rank). Raises ValueError where n is too small for ``confidence`` (fewer
    than 6 values at 95%): a bracket of so few values is their range, not an interval."""
    arr = np.sort(_as_samples(values, "values"))
    k, coverage = median_interval_rank(int(arr.size), confidence)
    if k == 0:
        raise ValueError(f"median_ci: values: {arr.size} value(s) cannot give a "
                         f"{confidence:.0%} interval of the median (even their range covers "
                         f"it with probability {1 - 2 * 0.5 ** arr.size:.1%}); expected more")
    return MedianInterval(float(np.median(arr)), float(arr[k - 1]), float(arr[arr.size - k]),
                          coverage, int(arr.size))


def paired_ratio_interval(a: Sequence[Number], b: Sequence[Number], *,
                          confidence: float = 0.95) -> MedianInterval:
    """The effect of b over a measured in paired rounds, in percent: per round the ratio
    b[r] / a[r] (the round's drift cancels), then the median of the rounds' ratios with its
    exact interval (median_ci over the log ratios, mapped back: (ratio - 1) * 100).

    The estimate is the statistic the interval is for (the median of paired ratios), and the
    interval is never widened; its ``confidence`` is its exact coverage at this n."""
    a_arr, b_arr = _as_samples(a, "a"), _as_samples(b, "b")
    if a_arr.size != b_arr.size:
        raise ValueError(f"paired_ratio_interval: a and b: expected one value per round each "
                         f"(the same count), got {a_arr.size} and {b_arr.size}")
    if np.any(a_arr <= 0) or np.any(b_arr <= 0):
        raise ValueError("paired_ratio_interval: a and b: expected positive values (times), "
                         f"got min {min(a_arr.min(), b_arr.min())}")
    logs = median_ci(np.log(b_arr / a_arr), confidence)
    pct = lambda x: float(np.expm1(x) * 100.0)   # noqa: E731
    return MedianInterval(pct(logs.estimate), pct(logs.low), pct(logs.high), logs.confidence,
                          logs.n)

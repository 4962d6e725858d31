"""The statistics detectors share, as pure functions of numpy arrays. No torch, no plotting.

Every function is O(n) or O(n log w) in the series length n (w a fixed window), so analysis of
a million steps takes seconds; change-point search runs on a series decimated to a few thousand
block medians, never the per-step series itself.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import bottleneck
import numpy as np
import pandas as pd

from vaediag.columns import QUALITY_METRICS

MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution times this is its standard deviation


def to_log(x: np.ndarray) -> tuple[np.ndarray, bool]:
    """log(x) when every finite value is positive (multiplicative changes become additive),
    else x unchanged. Returns (series, whether the log was taken)."""
    finite = x[np.isfinite(x)]
    if finite.size and (finite > 0).all():
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.log(x), True
    return x.astype(np.float64), False


def rolling_median(x: np.ndarray, window: int, min_periods: int) -> np.ndarray:
    """The median of the ``window`` values up to and including each one, NaN with fewer than
    ``min_periods`` finite values among them (NaN are skipped): pandas'
    ``rolling(window, min_periods).median()``, four times faster (bottleneck's double heap)."""
    return bottleneck.move_median(np.asarray(x, dtype=np.float64), window,
                                  min_count=min(min_periods, window))


def shift(x: np.ndarray, by: int = 1) -> np.ndarray:
    """``x`` moved ``by`` places later, NaN in front (pandas' ``shift``)."""
    out = np.full(len(x), np.nan)
    if by < len(x):
        out[by:] = x[:len(x) - by]
    return out


@dataclass
class RobustZ:
    z: np.ndarray  # (x - median) / scale against the trailing window, NaN where undefined
    median: np.ndarray  # the trailing window's median at each point
    scale: np.ndarray  # the trailing window's robust standard deviation (1.4826 MAD)


def trailing_robust_z(x: np.ndarray, window: int, min_scale: float = 1e-12) -> RobustZ:
    """z-score of each value against the median and MAD of the ``window`` values before it.

    The window excludes the current value, so a spike is measured against what came before it.
    The MAD is the rolling median of absolute deviations from the rolling median, a standard
    O(n log w) approximation of the windowed MAD.
    """
    x = np.asarray(x, dtype=np.float64)
    past = shift(x)
    minimum = max(5, window // 2)
    median = rolling_median(past, window, minimum)
    mad = rolling_median(np.abs(past - median), window, minimum)
    scale = np.maximum(MAD_TO_SIGMA * mad, min_scale)  # NaN stays NaN
    z = (x - median) / scale
    return RobustZ(z, median, scale)


def ewm_z(x: np.ndarray, alpha: float = 0.03, cap: float = 4.0, warmup: int = 30) -> np.ndarray:
    """z-score against an exponential moving mean and variance, as ZClip does.

    Outliers enter the moving statistics capped at ``cap`` standard deviations (ZClip feeds its
    EMA the clipped value), so one spike does not hide the next. Vectorised with pandas: the
    cap uses a first uncapped pass. The first ``warmup`` values give NaN.
    """
    s = pd.Series(x, dtype="float64")
    mean = s.ewm(alpha=alpha, adjust=False).mean().shift(1)
    std = s.ewm(alpha=alpha, adjust=False).std().shift(1)
    capped = np.minimum(s, mean + cap * std).fillna(s)
    mean = capped.ewm(alpha=alpha, adjust=False).mean().shift(1)
    std = capped.ewm(alpha=alpha, adjust=False).std().shift(1)
    z = ((s - mean) / std.clip(lower=1e-12)).to_numpy(copy=True)
    z[:warmup] = np.nan
    return z


def trailing_median_at(x: np.ndarray, indices: np.ndarray, window: int,
                       min_periods: int = 5) -> np.ndarray:
    """The median of the ``window`` values before each of ``indices`` (NaN with fewer than
    ``min_periods``): a rolling median evaluated only where it is needed."""
    out = np.full(len(indices), np.nan)
    for k, i in enumerate(indices):
        past = x[max(0, i - window):i]
        past = past[np.isfinite(past)]
        if past.size >= min_periods:
            out[k] = np.median(past)
    return out


def robust_z_at(x: np.ndarray, indices: np.ndarray, window: int,
                min_periods: int = 10, min_scale: float = 1e-12) -> np.ndarray:
    """Robust z of x[i] against the exact median and MAD of the ``window`` values before it,
    for each i in ``indices`` only (for sparse candidates; NaN with too little history)."""
    out = np.full(len(indices), np.nan)
    for k, i in enumerate(indices):
        past = x[max(0, i - window):i]
        past = past[np.isfinite(past)]
        if past.size >= min_periods:
            median = np.median(past)
            scale = max(MAD_TO_SIGMA * np.median(np.abs(past - median)), min_scale)
            out[k] = (x[i] - median) / scale
    return out


def trailing_median_where(x: np.ndarray, window: int, factor: float,
                          min_periods: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Indices where x >= factor * (median of the ``window`` values before), and those medians.

    The rolling minimum (O(n)) bounds the median from below, so only values >= factor * that
    minimum can qualify; the exact median is computed at those candidates alone.
    """
    s = pd.Series(x, dtype="float64")
    floor = s.rolling(window, min_periods=min_periods).min().shift(1).to_numpy()
    with np.errstate(invalid="ignore"):
        candidates = np.flatnonzero(x >= factor * floor)
    if candidates.size > max(1000, len(x) // 20):  # dense: one full rolling median is cheaper
        median = shift(rolling_median(x, window, min_periods))[candidates]
    else:
        median = trailing_median_at(x, candidates, window, min_periods)
    with np.errstate(invalid="ignore"):
        keep = x[candidates] >= factor * median
    return candidates[keep], median[keep]


def share_at_least(x: np.ndarray, threshold: float, window: int) -> np.ndarray:
    """Fraction of the last ``window`` values (inclusive) that are >= threshold, NaN until the
    window is full. At least one half is the running median being >= threshold. O(n)."""
    hits = np.concatenate([[0], np.cumsum(x >= threshold)])
    out = np.full(len(x), np.nan)
    if len(x) >= window:
        out[window - 1:] = (hits[window:] - hits[:-window]) / window
    return out


def episodes(mask: np.ndarray, merge_gap: int = 3) -> list[tuple[int, int]]:
    """Runs of True in ``mask`` as (first index, last index), merging runs ``merge_gap`` apart."""
    idx = np.flatnonzero(mask)
    if idx.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(idx) > merge_gap + 1)
    starts = np.concatenate([[idx[0]], idx[breaks + 1]])
    ends = np.concatenate([idx[breaks], [idx[-1]]])
    return list(zip(starts.tolist(), ends.tolist(), strict=True))


#: a series whose step-to-step changes are exactly zero this often is quantised (a metric that
#: moves in steps), and the MAD of its changes says nothing about how far it moves
TIED_SHARE = 0.25
MEAN_ABS_TO_SIGMA = math.sqrt(math.pi / 2)  # mean |x| of a centred normal times this is sigma


def noise_scale(x: np.ndarray) -> float:
    """Robust scale of a series' step-to-step changes: 1.4826 * MAD of its first differences.

    For a quantised series (a quarter or more of its changes exactly zero) the MAD collapses
    toward 0 and any step would look like many standard deviations: there the scale is at
    least the one implied by the mean absolute change (``sqrt(pi/2) * mean |d|``)."""
    d = np.diff(x[np.isfinite(x)])
    if d.size == 0:
        return math.nan
    sigma = float(MAD_TO_SIGMA * np.median(np.abs(d - np.median(d))))
    if np.mean(d == 0) >= TIED_SHARE:
        sigma = max(sigma, float(MEAN_ABS_TO_SIGMA * np.mean(np.abs(d))))
    return sigma


def expanding_noise_scale(x: np.ndarray, min_count: int = 6,
                          max_points: int = 200) -> np.ndarray:
    """:func:`noise_scale` of ``x[:k + 1]`` for every k: causal, so the value at k never
    depends on what came after it (NaN until ``min_count`` finite values). Computed at most
    ``max_points`` times and held in between (each from the values up to its own index)."""
    n = len(x)
    out = np.full(n, np.nan)
    finite = np.cumsum(np.isfinite(x))
    stride = max(1, math.ceil(n / max_points))
    last = math.nan
    for k in range(n):
        if finite[k] >= min_count and (k % stride == 0 or math.isnan(last)):
            last = noise_scale(x[:k + 1])
        out[k] = last
    return out


def decimate(x: np.ndarray, max_points: int) -> tuple[np.ndarray, int]:
    """Block medians so at most ``max_points`` remain; (values, block size)."""
    block = max(1, math.ceil(len(x) / max_points))
    if block == 1:
        return x.astype(np.float64), 1
    n = len(x) // block * block
    values = np.nanmedian(x[:n].reshape(-1, block), axis=1)
    return values, block


@dataclass
class Segment:
    start: int  # index into the original series (inclusive)
    end: int  # exclusive
    mean: float
    slope: float  # per original index


def pelt(y: np.ndarray, penalty: float, min_size: int = 3) -> list[int]:
    """Optimal piecewise-constant segmentation of ``y`` under the l2 cost (the sum of squared
    deviations from each segment's mean) plus ``penalty`` per segment, segments at least
    ``min_size`` long: PELT (Killick et al. 2012), exact, with each step's candidates scored
    at once. Returns the segment ends, the last being len(y) (as ruptures gives them).
    """
    n = len(y)
    if n < 2 * min_size:
        return [n]
    s1 = np.concatenate([[0.0], np.cumsum(y, dtype=np.float64)])
    s2 = np.concatenate([[0.0], np.cumsum(np.square(y, dtype=np.float64))])
    best = np.full(n + 1, np.inf)
    best[0] = -penalty
    previous = np.zeros(n + 1, dtype=np.int64)
    candidates = np.array([0], dtype=np.int64)
    for t in range(min_size, n + 1):
        opened = t - min_size  # a segment may now start where one of min_size could end
        if opened >= min_size and np.isfinite(best[opened]):
            candidates = np.append(candidates, opened)
        length = t - candidates
        cost = (s2[t] - s2[candidates]) - (s1[t] - s1[candidates]) ** 2 / length
        total = best[candidates] + cost
        k = int(np.argmin(total))
        best[t] = total[k] + penalty
        previous[t] = candidates[k]
        candidates = candidates[total <= best[t]]  # never optimal again
    ends, t = [], n
    while t > 0:
        ends.append(t)
        t = int(previous[t])
    return ends[::-1]


def change_points(x: np.ndarray, max_points: int = 2000, penalty: float = 3.0) -> list[Segment]:
    """Piecewise-constant segmentation (PELT, l2 cost) of a decimated series.

    The penalty is ``penalty * sigma^2 * log(n)`` (a BIC-like choice) with sigma the series'
    step-to-step noise, so it adapts to the data's own scale. Each change point found on the
    block medians is then placed exactly: the best single split of the full-resolution series
    within two blocks of it (O(block) with cumulative sums).
    """
    finite = np.isfinite(x)
    if finite.sum() < 20:
        return []
    filled = pd.Series(x).ffill().bfill().to_numpy(dtype=np.float64)
    values, block = decimate(filled, max_points)
    sigma = noise_scale(values) / math.sqrt(2)  # diff of two noisy points has sqrt(2) sigma
    sigma = sigma if sigma > 0 else float(np.std(values)) or 1.0
    bkps = pelt(values, penalty * sigma**2 * math.log(len(values)), min_size=3)
    bounds = [0] + [min(b * block, len(x)) for b in bkps[:-1]] + [len(x)]
    if block > 1:
        for k in range(1, len(bounds) - 1):
            bounds[k] = best_split(filled, bounds[k - 1], bounds[k + 1],
                                    bounds[k] - 2 * block, bounds[k] + 2 * block)
    segments = []
    for start, end in itertools.pairwise(bounds):
        part = filled[start:end]
        t = np.arange(len(part))
        slope = float(np.polyfit(t, part, 1)[0]) if len(part) > 2 else 0.0
        segments.append(Segment(start, end, float(part.mean()), slope))
    return segments


def best_split(x: np.ndarray, left: int, right: int, lo: int, hi: int) -> int:
    """The split point in [lo, hi] of x[left:right] into two constant parts with the least
    squared error."""
    lo, hi = max(lo, left + 1), min(hi, right - 1)
    if hi <= lo:
        return max(left + 1, min(lo, right - 1))
    part = x[left:right]
    c1, c2 = np.cumsum(part), np.cumsum(part * part)
    cut = np.arange(lo, hi + 1) - left  # sizes of the left piece
    n = len(part)
    sum_l, sq_l = c1[cut - 1], c2[cut - 1]
    sum_r, sq_r = c1[-1] - sum_l, c2[-1] - sq_l
    cost = (sq_l - sum_l**2 / cut) + (sq_r - sum_r**2 / (n - cut))
    return int(lo + np.argmin(cost))


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 4 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return math.nan
    return float(np.corrcoef(_ranks(x[ok]), _ranks(y[ok]))[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks (1-based, ties averaged) along the last axis of a 1-D or 2-D array of finite
    values, as scipy.stats.rankdata gives them (pandas' rank, without importing scipy.stats,
    which costs most of a second)."""
    if x.ndim == 1:
        return pd.Series(x).rank().to_numpy(dtype=np.float64, copy=True)
    return pd.DataFrame(x).rank(axis=1).to_numpy(dtype=np.float64, copy=True)


def rolling_spearman(a: np.ndarray, b: np.ndarray, window: int) -> np.ndarray:
    """Spearman rank correlation of a and b over a trailing window (NaN until it is full).
    Windows without missing values are ranked all at once; the others one by one."""
    out = np.full(len(a), np.nan)
    if len(a) < window:
        return out
    wa = np.lib.stride_tricks.sliding_window_view(np.asarray(a, np.float64), window)
    wb = np.lib.stride_tricks.sliding_window_view(np.asarray(b, np.float64), window)
    complete = np.isfinite(wa).all(1) & np.isfinite(wb).all(1)
    ra, rb = _ranks(wa[complete]), _ranks(wb[complete])
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    denominator = np.sqrt((ra * ra).sum(1) * (rb * rb).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.where(denominator > 0, (ra * rb).sum(1) / denominator, np.nan)
    out[window - 1:][complete] = rho
    for k in np.flatnonzero(~complete):
        out[window - 1 + k] = _spearman(wa[k], wb[k])
    return out


def bce_floor(images: np.ndarray) -> float:
    """Mean over images of the summed Bernoulli entropy of their pixels: the smallest value a
    summed BCE reconstruction loss can take on them (reached by a perfect reconstruction)."""
    y = images.astype(np.float64) / 255.0
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(np.where(y > 0, y * np.log(y), 0.0) + np.where(y < 1, (1 - y) * np.log(1 - y), 0.0))
    return float(h.reshape(len(images), -1).sum(1).mean())


def badness(metric: str, values: np.ndarray) -> np.ndarray:
    """A quality metric turned into a badness, higher is worse: 1 - SSIM, |log saturation
    ratio| (half the saturation is as bad as twice it, and halving it again is as much worse
    again), LPIPS as it is, ..."""
    facts = QUALITY_METRICS[metric]
    if facts.unit_interval:
        return 1.0 - values
    if facts.direction == 0:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.abs(np.log(np.where(values > 0, values, np.nan)))
    return values if facts.direction < 0 else -values

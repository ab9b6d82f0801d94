"""Confidence users can trust: calibrated "within X km" probabilities and per-level confidences.

Raw confidences come from the candidate pool:
- "within X km" of a chosen answer: the probability of the pool's distinct prefixes, at the level whose
  cells are about X km across, whose candidates lie within X km of it (a lower bound: the pool does not
  hold every prefix);
- per level: the probability of the chosen path's prefix up to that level (continent, country, city...).

Each is calibrated with one temperature fitted on the validation split by minimising the binary
log-loss: p' = sigmoid(logit(p) / temperature). One parameter per event keeps the ranking of confidences
intact and cannot overfit a small validation set. Expected calibration error (ECE, equal-width bins)
and reliability plots (PNG) are what `geotoken evaluate` reports.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np

from geotoken.errors import GeoTokenError
from geotoken.geo import haversine_km
from geotoken.io import atomic_path, read_json, write_json
from geotoken.search.candidates import duplicate_mask
from geotoken.search.options import unused_options

RADII_KM = (25.0, 200.0, 750.0)
# the search options that shape the pool and its choice, hence the raw confidences a temperature is fitted to
POOL_OPTIONS = ("strategy", "beam_width", "num_samples", "temperature", "sample_top_k", "top_p", "retrieved",
                "constrain", "select")  # fmt: skip
_EPS = 1e-9


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def apply_temperature(conf: np.ndarray, temperature: float) -> np.ndarray:
    """sigmoid(logit(conf) / temperature), elementwise; temperature 1 is the identity (up to clipping)."""
    z = _logit(conf) / temperature
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # the logistic function without overflow for large |z|


def _nll(z: np.ndarray, y: np.ndarray, temps: np.ndarray) -> np.ndarray:
    """Mean binary log-loss of sigmoid(z / T) for each T: z, y (n,), temps (m,) -> (m,)."""
    s = z[None, :] / temps[:, None]  # (m, n)
    # -[y log sigmoid(s) + (1 - y) log sigmoid(-s)] = softplus(s) - y * s
    return (np.logaddexp(0.0, s) - y[None, :] * s).mean(1)


def fit_temperature(conf: np.ndarray, outcome: np.ndarray) -> float:
    """The temperature minimising the log-loss of `outcome` (0/1) given `conf` (probabilities), in [0.02, 50].

    A log-spaced grid, then two rounds of refinement around the best point (the loss is smooth in log T).
    """
    conf, y = np.asarray(conf, dtype=np.float64).ravel(), np.asarray(outcome, dtype=np.float64).ravel()
    if conf.shape != y.shape or conf.size == 0:
        raise GeoTokenError(
            f"fit_temperature: conf {conf.shape} and outcome {y.shape} must be equal, non-empty"
        )
    z = _logit(conf)
    lo, hi = np.log(0.02), np.log(50.0)
    for _ in range(3):
        grid = np.linspace(lo, hi, 81)
        best = int(np.argmin(_nll(z, y, np.exp(grid))))
        step = grid[1] - grid[0]
        lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, 80)]
        if step < 1e-4:
            break
    return float(np.exp(grid[best]))


def reliability_curve(conf: np.ndarray, outcome: np.ndarray, n_bins: int = 10) -> dict:
    """Equal-width bins over [0, 1]: per bin the count, mean confidence and observed frequency (NaN if empty)."""
    conf, y = np.asarray(conf, dtype=np.float64).ravel(), np.asarray(outcome, dtype=np.float64).ravel()
    b = np.clip((conf * n_bins).astype(np.int64), 0, n_bins - 1)
    count = np.bincount(b, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(b, weights=conf, minlength=n_bins) / count
        freq = np.bincount(b, weights=y, minlength=n_bins) / count
    return {
        "count": count,
        "confidence": mean_conf,
        "frequency": freq,
        "edges": np.linspace(0, 1, n_bins + 1),
    }


def expected_calibration_error(conf: np.ndarray, outcome: np.ndarray, n_bins: int = 10) -> float:
    """sum over bins of (share of samples) x |observed frequency - mean confidence|."""
    c = reliability_curve(conf, outcome, n_bins)
    used = c["count"] > 0
    return float(
        (c["count"][used] * np.abs(c["frequency"][used] - c["confidence"][used])).sum() / c["count"].sum()
    )


def reliability_plot(
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
    path: str | os.PathLike,
    title: str = "",
    n_bins: int = 10,
) -> None:
    """One PNG: observed frequency vs confidence for each named (conf, outcome) pair, with its ECE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5), dpi=120)
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="perfect calibration")
    for name, (conf, outcome) in curves.items():
        c = reliability_curve(conf, outcome, n_bins)
        used = c["count"] > 0
        ece = expected_calibration_error(conf, outcome, n_bins)
        ax.plot(c["confidence"][used], c["frequency"][used], marker="o", label=f"{name} (ECE {ece:.3f})")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="predicted probability", ylabel="observed frequency", title=title)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


# ----------------------------------------------------------------------------- confidences from a pool
def token_position(radius_km: float, group: int, n_tokens: int) -> int:
    """The token whose cells are about `radius_km` across: S2 level l has cells ~10,000 km / 2^l wide."""
    level = int(np.clip(round(math.log2(10000.0 / radius_km)), 0, 30))
    return int(min(n_tokens - 1, math.ceil(level / group)))


def within_confidence(pool, lat: np.ndarray, lon: np.ndarray, radius_km: float, group: int = 2) -> np.ndarray:
    """(B,) raw P(true location within radius_km of (lat, lon) (B,)), from the pool.

    Sequence probabilities of whole level-20 cells are tiny and say little about a 200 km event; the
    probability of a candidate's prefix down to the cells of about that size does. So: the summed
    probabilities of the pool's distinct prefixes at that level whose candidates lie within the radius
    (a lower bound: the pool holds only some of the prefixes).
    """
    t = token_position(radius_km, group, pool.tokens.shape[-1])
    prefix_p = np.prod(pool.level_probs[..., : t + 1], axis=-1)  # (B, N)
    weights = np.where(duplicate_mask(pool.tokens[..., : t + 1]), 0.0, prefix_p)
    d = haversine_km(np.asarray(lat)[:, None], np.asarray(lon)[:, None], pool.lat, pool.lon)  # (B, N)
    return np.clip(((d <= radius_km) * weights).sum(1), 0.0, 1.0)


def prefix_confidence(level_probs: np.ndarray) -> np.ndarray:
    """(..., T) per-level conditional probabilities -> (..., T) probability of each prefix (cumulative product)."""
    return np.cumprod(level_probs, axis=-1)


def prefix_correct(tokens: np.ndarray, true_tokens: np.ndarray) -> np.ndarray:
    """(B, T) chosen tokens vs (B, T) true tokens -> (B, T) bool: is the prefix up to each level right?"""
    return np.cumprod(tokens == true_tokens, axis=-1).astype(bool)


@dataclass
class Calibration:
    """Temperatures per "within X km" event and per token level (1.0 = uncalibrated)."""

    radii_km: list[float] = field(default_factory=lambda: list(RADII_KM))
    within: list[float] = field(default_factory=lambda: [1.0] * len(RADII_KM))  # one per radius
    levels: list[float] = field(default_factory=list)  # one per token position; empty = identity
    search: dict = field(default_factory=dict)  # the POOL_OPTIONS it was fitted under; empty: not recorded

    def other_search(self, options) -> dict:
        """{option: (fitted, now)} where `options` (a SearchOptions) pools or chooses otherwise than the search
        the temperatures were fitted under: there they do not calibrate (a pool of 5 beams holds less mass
        than one of 10 samples and neighbours' cells)."""
        if not self.search:  # (a calibration from before it recorded its search: nothing to compare)
            return {}
        now = _pool_options(options)  # options only one of the two searches reads: the strategy says it
        return {k: (self.search[k], v) for k, v in now.items() if k in self.search and self.search[k] != v}

    def within_probs(self, pool, lat, lon, group: int = 2) -> dict[str, np.ndarray]:
        """{"25km": (B,), ...} calibrated P(within radius) of answers (lat, lon) (B,)."""
        return {
            f"{r:g}km": apply_temperature(within_confidence(pool, lat, lon, r, group), t)
            for r, t in zip(self.radii_km, self.within)
        }

    def level_probs(self, level_probs: np.ndarray) -> np.ndarray:
        """(..., T) per-level probabilities of a path -> calibrated prefix confidences (..., T)."""
        return self.prefix_probs(prefix_confidence(level_probs))

    def prefix_probs(self, conf: np.ndarray) -> np.ndarray:
        """(..., T) raw prefix confidences -> calibrated ones."""
        if not self.levels:
            return conf
        out = np.stack([apply_temperature(conf[..., t], temp) for t, temp in enumerate(self.levels)], axis=-1)
        return np.minimum.accumulate(out, axis=-1)  # a longer prefix is never more certain

    def save(self, path: str | os.PathLike) -> None:
        write_json(
            path,
            {"radii_km": self.radii_km, "within": self.within, "levels": self.levels, "search": self.search},
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> Calibration:
        try:
            d = read_json(path)
            cal = cls(
                radii_km=[float(r) for r in d["radii_km"]],
                within=[float(t) for t in d["within"]],
                levels=[float(t) for t in d.get("levels", [])],
                search=dict(d.get("search", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise GeoTokenError(f"{path}: not a calibration file ({exc})") from None
        if len(cal.radii_km) != len(cal.within) or min(cal.within + cal.levels + [1.0]) <= 0:
            raise GeoTokenError(f"{path}: radii_km and within must have equal length and temperatures be > 0")
        return cal


def check_radii(radii_km) -> list[float]:
    """The radii as floats, or a clear error: each must be a finite number of km > 0 (0 divides by zero
    in `token_position`, a negative one has no logarithm)."""
    radii = [float(r) for r in radii_km]
    if not radii or not all(math.isfinite(r) and r > 0 for r in radii):
        raise GeoTokenError(f"calibration: radii_km must be finite numbers of km > 0, got {radii}")
    return radii


def calibration_data(
    pool, selection, true_lat, true_lon, true_tokens, radii_km=RADII_KM, group: int = 2
) -> dict:
    """Raw confidences and outcomes of a validation/test set: what fitting and reporting need.

    Returns {"within": {radius: (conf (B,), outcome (B,))}, "levels": (conf (B, T), outcome (B, T))}.
    """
    radii_km = check_radii(radii_km)
    err = haversine_km(selection.lat, selection.lon, np.asarray(true_lat), np.asarray(true_lon))
    within = {
        float(r): (within_confidence(pool, selection.lat, selection.lon, r, group), err <= r)
        for r in radii_km
    }
    rows = np.arange(len(selection.index))
    chosen = np.maximum(selection.index, 0)  # free MLLM answers (-1) have no path: use the top candidate's
    levels = (
        prefix_confidence(pool.level_probs[rows, chosen]),
        prefix_correct(pool.tokens[rows, chosen], true_tokens),
    )
    return {"within": within, "levels": levels}


def fit_calibration(data: dict, search=None) -> Calibration:
    """Temperatures from `calibration_data(...)` of the validation split; `search`: the SearchOptions its pools
    came from (recorded, so that a prediction under another search can say its probabilities are not calibrated)."""
    radii = sorted(data["within"])
    conf, correct = data["levels"]
    return Calibration(
        radii_km=radii,
        within=[fit_temperature(*data["within"][r]) for r in radii],
        levels=[fit_temperature(conf[:, t], correct[:, t]) for t in range(conf.shape[1])],
        search={} if search is None else _pool_options(search),
    )


def _pool_options(search) -> dict:
    """The POOL_OPTIONS of a SearchOptions that its strategy reads (num_samples is no part of a beam's pool;
    greedy's pool of one leaves its selector no choice)."""
    unused = set(unused_options(search.strategy, POOL_OPTIONS)) | (
        {"select"} if search.strategy == "greedy" else set()
    )
    return {k: getattr(search, k) for k in POOL_OPTIONS if k not in unused}


def calibration_report(
    data: dict, calibration: Calibration | None = None, plot: str | None = None, n_bins: int = 10
) -> dict:
    """ECE of each event before and (with `calibration`) after; optionally a reliability PNG at `plot`.

    Returns {"within_25km": {"ece_raw": .., "ece": .., "n": ..}, ..., "levels": [{"ece_raw", "ece"}, ...]}.
    """
    cal = calibration or Calibration(radii_km=sorted(data["within"]), within=[1.0] * len(data["within"]))
    temps = dict(zip(cal.radii_km, cal.within))
    report, curves = {}, {}
    for r, (conf, outcome) in sorted(data["within"].items()):
        calibrated = apply_temperature(conf, temps.get(r, 1.0))
        report[f"within_{r:g}km"] = {
            "n": int(len(conf)),
            "accuracy": float(np.mean(outcome)),
            "mean_confidence": float(np.mean(calibrated)),
            "ece_raw": expected_calibration_error(conf, outcome, n_bins),
            "ece": expected_calibration_error(calibrated, outcome, n_bins),
            "temperature": float(temps.get(r, 1.0)),
        }
        curves[f"within {r:g} km"] = (calibrated, outcome)
    conf, correct = data["levels"]
    calibrated = cal.prefix_probs(conf)
    report["levels"] = [
        {
            "ece_raw": expected_calibration_error(conf[:, t], correct[:, t], n_bins),
            "ece": expected_calibration_error(calibrated[:, t], correct[:, t], n_bins),
        }
        for t in range(conf.shape[1])
    ]
    if plot is not None:
        reliability_plot(curves, plot, title="reliability of the top answer", n_bins=n_bins)
    return report

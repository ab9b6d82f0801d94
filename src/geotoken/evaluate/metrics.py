"""Accuracy tables with 95% confidence intervals, and paired comparisons of two methods.

An accuracy table on 3,000 images moves by a point or two from one random draw of images to the
next, so a table without intervals cannot say whether one method beats another. An accuracy is a share of
hits, so its interval is Wilson's score interval, and a paired difference of two shares on the same images
is Newcombe's hybrid score interval (his method 10): both keep their coverage at 0 % and 100 %, where a
percentile bootstrap collapses to [0, 0] on any number of images. The median and mean error have no such
formula: the bootstrap resamples the images with replacement (fixed seed, vectorized: one (replicates, N)
index matrix per chunk) and reads the 2.5% / 97.5% quantiles; the paired comparison applies the same
resampled images to both methods, which removes the per-image difficulty from the difference.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
from rich.console import Console
from rich.table import Table

from geotoken.errors import GeoTokenError
from geotoken.geo import THRESHOLDS_KM

INTERVALS = (
    "accuracy: Wilson score interval (paired differences: Newcombe's hybrid score interval); "
    "median and mean error: percentile bootstrap"
)  # what metrics.json's intervals are, written beside them
_CHUNK_ELEMENTS = 4_000_000  # index-matrix elements per chunk: bounds memory to ~32 MB of int64


def _name(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _field(d, key: str, where: str = "", kind: str = "any"):
    """d[key] as read from metrics.json, checked to be `kind` ("number", "object" or "any"); otherwise a
    GeoTokenError naming the field by its path in the file (`where.key`, e.g. 'methods.knn.median_km')."""
    if not isinstance(d, Mapping):
        raise GeoTokenError(f"field {where or 'metrics'!r} should be an object, got {d!r:.80}")
    name = _name(where, key)
    if key not in d:
        raise GeoTokenError(f"missing field {name!r}")
    value = d[key]
    if kind == "number" and (not isinstance(value, (int, float)) or isinstance(value, bool)):
        raise GeoTokenError(f"field {name!r} should be a number, got {value!r:.80}")
    if kind == "object" and not isinstance(value, Mapping):
        raise GeoTokenError(f"field {name!r} should be an object, got {value!r:.80}")
    return value


def _estimates(d, key: str, where: str = "") -> dict[float, Estimate]:
    """{threshold km: Estimate} from an object keyed by threshold ('25', '0.5')."""
    obj, name = _field(d, key, where, "object"), _name(where, key)
    out = {}
    for t, e in obj.items():
        try:
            km = float(t)
        except ValueError:
            raise GeoTokenError(f"field {name!r}: key {t!r} is not a distance in km") from None
        out[km] = Estimate.from_dict(e, f"{name}.{t}")
    return out


@dataclass(frozen=True)
class Estimate:
    """A statistic with its bootstrap confidence interval [lo, hi]."""

    value: float
    lo: float
    hi: float

    def to_dict(self) -> dict:
        return {"value": self.value, "lo": self.lo, "hi": self.hi}

    @classmethod
    def from_dict(cls, d: Mapping, where: str = "") -> Estimate:
        """The inverse of `to_dict`; a malformed entry is a GeoTokenError naming the field (`where`)."""
        return cls(*(float(_field(d, key, where, "number")) for key in ("value", "lo", "hi")))


@dataclass(frozen=True)
class MethodMetrics:
    """Accuracy (share in 0..1) within each threshold, median and mean error in km, all with CIs."""

    n: int
    accuracy: dict[float, Estimate]
    median_km: Estimate
    mean_km: Estimate
    level: float = 0.95
    n_boot: int = 1000

    def to_dict(self) -> dict:
        return {
            "n": self.n,
            "accuracy": {_key(t): e.to_dict() for t, e in self.accuracy.items()},
            "median_km": self.median_km.to_dict(),
            "mean_km": self.mean_km.to_dict(),
            "level": self.level,
            "n_boot": self.n_boot,
        }

    @classmethod
    def from_dict(cls, d: Mapping, where: str = "") -> MethodMetrics:
        """The inverse of `to_dict` (one method entry of metrics.json; other keys are ignored). A malformed
        entry is a GeoTokenError naming the field, prefixed by `where` (e.g. 'methods.knn')."""
        return cls(
            n=int(_field(d, "n", where, "number")),
            accuracy=_estimates(d, "accuracy", where),
            median_km=Estimate.from_dict(_field(d, "median_km", where), _name(where, "median_km")),
            mean_km=Estimate.from_dict(_field(d, "mean_km", where), _name(where, "mean_km")),
            level=float(d.get("level", 0.95)),
            n_boot=int(d.get("n_boot", 1000)),
        )


@dataclass(frozen=True)
class PairedComparison:
    """Method a minus method b on the same images: accuracy differences (share) and error differences (km)."""

    a: str
    b: str
    n: int
    accuracy: dict[float, Estimate]
    median_km: Estimate
    mean_km: Estimate

    def to_dict(self) -> dict:
        return {
            "a": self.a,
            "b": self.b,
            "n": self.n,
            "accuracy_diff": {_key(t): e.to_dict() for t, e in self.accuracy.items()},
            "median_km_diff": self.median_km.to_dict(),
            "mean_km_diff": self.mean_km.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Mapping, where: str = "") -> PairedComparison:
        """The inverse of `to_dict` (one entry of metrics.json's `paired`); errors name the field (`where`)."""
        return cls(
            a=str(_field(d, "a", where)),
            b=str(_field(d, "b", where)),
            n=int(_field(d, "n", where, "number")),
            accuracy=_estimates(d, "accuracy_diff", where),
            median_km=Estimate.from_dict(_field(d, "median_km_diff", where), _name(where, "median_km_diff")),
            mean_km=Estimate.from_dict(_field(d, "mean_km_diff", where), _name(where, "mean_km_diff")),
        )


def _key(t: float) -> str:
    """JSON key of a threshold: '25' rather than '25.0'."""
    return f"{t:g}"


def _check_errors(errors_km: np.ndarray, name: str = "errors_km") -> np.ndarray:
    e = np.asarray(errors_km, dtype=np.float64).ravel()
    if e.size == 0:
        raise GeoTokenError(f"{name}: no errors to evaluate (0 images)")
    bad = np.flatnonzero(~np.isfinite(e) | (e < 0))
    if bad.size:
        raise GeoTokenError(
            f"{name}: row {bad[0]} has invalid error {e[bad[0]]!r} km (must be finite and >= 0)"
        )
    return e


def bootstrap_indices(n: int, n_boot: int, seed: int = 0) -> Iterator[np.ndarray]:
    """Yield int64 index matrices (chunk, n) whose rows are bootstrap resamples; n_boot rows in total."""
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_ELEMENTS // max(n, 1))
    for start in range(0, n_boot, chunk):
        yield rng.integers(0, n, size=(min(chunk, n_boot - start), n))


def _median_rows(x: np.ndarray) -> np.ndarray:
    """Median of each row of (R, n), by partition (faster than a full sort)."""
    n = x.shape[1]
    hi = n // 2
    if n % 2:
        return np.partition(x, hi, axis=1)[:, hi]
    part = np.partition(x, (hi - 1, hi), axis=1)
    return 0.5 * (part[:, hi - 1] + part[:, hi])


def _z(level: float) -> float:
    """The standard normal quantile of a two-sided `level` interval (1.96 at 0.95)."""
    if not 0 < level < 1:
        raise GeoTokenError(f"confidence level must be in (0, 1), got {level!r}")
    return NormalDist().inv_cdf((1 + level) / 2)


def wilson_interval(hits: np.ndarray, n: int, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Wilson's score interval of a share hits / n (elementwise over `hits`): within [0, 1], and not of
    zero width at 0 or n hits (0 of 30 gives [0, 0.114])."""
    z = _z(level)
    p = np.asarray(hits, dtype=np.float64) / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return np.where(p > 0, np.clip(centre - half, 0, 1), 0.0), np.where(
        p < 1, np.clip(centre + half, 0, 1), 1.0
    )


def paired_share_interval(
    hits_a: np.ndarray, hits_b: np.ndarray, level: float = 0.95
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Difference of two shares of hits on the same images, (n, T) booleans each -> (T,) difference, lo, hi:
    Newcombe's hybrid score interval (method 10, without continuity correction; Stat. Med. 1998), built
    from each share's Wilson interval and the correlation of the two methods' hits."""
    a, b = np.asarray(hits_a, dtype=bool), np.asarray(hits_b, dtype=bool)
    n = a.shape[0]
    # (T,) counts of the 2 x 2 table, as floats: their products reach n^4 / 16, past int64 from n ~ 55,000
    both, only_a = (a & b).sum(0).astype(np.float64), (a & ~b).sum(0).astype(np.float64)
    only_b, neither = (~a & b).sum(0).astype(np.float64), (~a & ~b).sum(0).astype(np.float64)
    p1, p2 = a.mean(0), b.mean(0)
    l1, u1 = wilson_interval(a.sum(0), n, level)
    l2, u2 = wilson_interval(b.sum(0), n, level)
    margins = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    with np.errstate(invalid="ignore", divide="ignore"):  # a zero margin: no correlation to correct for
        phi = np.where(margins > 0, (both * neither - only_a * only_b) / np.sqrt(margins), 0.0)
    d = p1 - p2
    below = (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2
    above = (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2
    return (
        d,
        np.maximum(d - np.sqrt(np.maximum(below, 0)), -1),
        np.minimum(d + np.sqrt(np.maximum(above, 0)), 1),
    )


def _check_replicates(n_boot: int) -> None:
    if not (isinstance(n_boot, (int, np.integer)) and n_boot >= 1):
        raise GeoTokenError(f"n_boot (bootstrap resamples) must be a whole number >= 1, got {n_boot!r}")


def _interval(reps: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def bootstrap_metrics(
    errors_km: np.ndarray,
    thresholds: Sequence[float] = THRESHOLDS_KM,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> MethodMetrics:
    """Accuracy within each threshold with its Wilson score CI; median and mean error with a percentile
    bootstrap CI."""
    e = _check_errors(errors_km)
    _check_replicates(n_boot)
    if not all(math.isfinite(t) and t > 0 for t in thresholds):
        raise GeoTokenError(f"thresholds must be finite numbers of km > 0, got {list(thresholds)}")
    n = e.size
    s = np.sort(e)
    hits = np.searchsorted(s, np.asarray(thresholds, dtype=np.float64), side="right")  # (T,) count <= t
    lo, hi = wilson_interval(hits, n, level)
    med_reps, mean_reps = [], []
    for idx in bootstrap_indices(n, n_boot, seed):  # idx (R, n)
        sampled = s[idx]  # (R, n)
        med_reps.append(_median_rows(sampled))
        mean_reps.append(sampled.mean(axis=1))
    med, mean = np.concatenate(med_reps), np.concatenate(mean_reps)
    return MethodMetrics(
        n=n,
        accuracy={
            float(t): Estimate(float(h / n), float(lo[i]), float(hi[i]))
            for i, (t, h) in enumerate(zip(thresholds, hits))
        },
        median_km=Estimate(float(np.median(e)), *_interval(med, level)),
        mean_km=Estimate(float(e.mean()), *_interval(mean, level)),
        level=level,
        n_boot=n_boot,
    )


def paired_comparison(
    errors_a: np.ndarray,
    errors_b: np.ndarray,
    names: tuple[str, str] = ("a", "b"),
    thresholds: Sequence[float] = THRESHOLDS_KM,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> PairedComparison:
    """a minus b on the same images: accuracy share (Newcombe's paired score CI), median and mean error (CIs
    from shared bootstrap resamples).

    A positive accuracy difference (or a negative error difference) whose interval excludes 0 means a
    is better than b beyond what the choice of images explains.
    """
    a, b = _check_errors(errors_a, names[0]), _check_errors(errors_b, names[1])
    if a.size != b.size:
        raise GeoTokenError(
            f"paired comparison needs the same images: {names[0]} has {a.size}, {names[1]} has {b.size}"
        )
    _check_replicates(n_boot)
    n = a.size
    t = np.asarray(thresholds, dtype=np.float64)
    diff, lo, hi = paired_share_interval(a[:, None] <= t, b[:, None] <= t, level)  # (T,) each
    med_reps, mean_reps = [], []
    for idx in bootstrap_indices(n, n_boot, seed):  # idx (R, n)
        sa, sb = a[idx], b[idx]
        med_reps.append(_median_rows(sa) - _median_rows(sb))
        mean_reps.append(sa.mean(axis=1) - sb.mean(axis=1))
    med, mean = np.concatenate(med_reps), np.concatenate(mean_reps)
    return PairedComparison(
        a=names[0],
        b=names[1],
        n=n,
        accuracy={float(th): Estimate(float(diff[i]), float(lo[i]), float(hi[i])) for i, th in enumerate(t)},
        median_km=Estimate(float(np.median(a) - np.median(b)), *_interval(med, level)),
        mean_km=Estimate(float(a.mean() - b.mean()), *_interval(mean, level)),
    )


# ---------------------------------------------------------------------------------------------- tables


def _pct(e: Estimate) -> str:
    return f"{100 * e.value:.1f} [{100 * e.lo:.1f}, {100 * e.hi:.1f}]"


def _km(e: Estimate) -> str:
    return f"{e.value:,.0f} [{e.lo:,.0f}, {e.hi:,.0f}]"


def table_rows(results: Mapping[str, MethodMetrics]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the side-by-side table: accuracy % within each threshold [CI], median, mean km."""
    if not results:
        raise GeoTokenError("no methods to tabulate")
    thresholds = list(next(iter(results.values())).accuracy)
    header = ["method", "n"] + [f"{t:g} km %" for t in thresholds] + ["median km", "mean km"]
    rows = [
        [name, str(m.n)] + [_pct(m.accuracy[t]) for t in thresholds] + [_km(m.median_km), _km(m.mean_km)]
        for name, m in results.items()
    ]
    return header, rows


def paired_rows(pairs: Sequence[PairedComparison]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the paired-difference table (percentage points, km)."""
    if not pairs:
        return [], []
    thresholds = list(pairs[0].accuracy)
    header = ["a - b", "n"] + [f"{t:g} km pp" for t in thresholds] + ["median km", "mean km"]
    sign = lambda e, f: f"{'+' if e.value > 0 else ''}{f(e)}"  # noqa: E731
    rows = [
        [f"{p.a} - {p.b}", str(p.n)]
        + [sign(p.accuracy[t], _pct) for t in thresholds]
        + [sign(p.median_km, _km), sign(p.mean_km, _km)]
        for p in pairs
    ]
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def metrics_markdown(results: Mapping[str, MethodMetrics], pairs: Sequence[PairedComparison] = ()) -> str:
    """The Markdown report: the accuracy table and, when given, the paired differences."""
    level = next(iter(results.values())).level
    out = [
        f"Accuracy within each distance (%), with {100 * level:.0f}% confidence intervals ({INTERVALS}).\n"
    ]
    out.append(markdown_table(*table_rows(results)))
    if pairs:
        out.append(
            "\nPaired differences on the same images (a - b; accuracy in percentage points, errors in km).\n"
        )
        out.append(markdown_table(*paired_rows(pairs)))
    return "\n".join(out)


def print_tables(
    results: Mapping[str, MethodMetrics], pairs: Sequence[PairedComparison] = (), console=None
) -> None:
    """Print the tables with rich."""
    level = next(iter(results.values())).level if results else 0.95
    tables = [
        (f"accuracy (%) [{100 * level:g}% CI]", table_rows(results)),
        ("paired a - b", paired_rows(pairs)),
    ]
    for title, (header, rows) in tables:
        if not rows:
            continue
        # one line per method: as wide as the widest cell of each column needs (rich would wrap cells)
        width = sum(max(len(c) for c in col) + 3 for col in zip(header, *rows)) + 1
        out = console or Console()
        if out.width < width:  # too narrow: rich would shrink short columns (n) to nothing, not wrap lines
            out = Console(
                file=out.file, width=width, color_system=out.color_system, force_terminal=out.is_terminal
            )
        table = Table(title=title)
        for i, h in enumerate(header):
            table.add_column(h, justify="left" if i == 0 else "right", no_wrap=True)
        for r in rows:
            table.add_row(*r)
        out.print(table)

"""Distances on the Earth and the accuracy-at-threshold metrics of image geolocalization.

The paper (like GeoCLIP, PIGEON and G3) scores with the great-circle distance on a sphere of radius
6371 km, so `haversine_km` is the metric every table uses. `geodesic_km` gives the WGS84 ellipsoidal
distance (differences up to ~0.5%) for users who want it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from geotoken.errors import GeoTokenError

EARTH_RADIUS_KM = 6371.0
THRESHOLDS_KM = (1, 25, 200, 750, 2500)  # street, city, region, country, continent

_WGS84_A_KM = 6378.137
_WGS84_F = 1 / 298.257223563


def _coordinates(lat1, lon1, lat2, lon2) -> tuple[np.ndarray, ...]:
    """float64 arrays broadcast together; latitudes in [-90, 90], everything finite."""
    arrays = []
    for name, values in (("lat1", lat1), ("lon1", lon1), ("lat2", lat2), ("lon2", lon2)):
        try:
            values = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise GeoTokenError(f"{name} must be numbers: {exc}") from None
        limit = 90 if name.startswith("lat") else np.inf
        bad = ~(np.abs(values) <= limit)  # NaN and inf too
        if bad.any():
            k = int(np.flatnonzero(bad.ravel())[0])
            where = k if values.ndim <= 1 else tuple(int(i) for i in np.unravel_index(k, values.shape))
            value = float(values.ravel()[k])
            why = "is outside [-90, 90]" if np.isfinite(value) else "is not a finite number"
            raise GeoTokenError(f"{name}[{where}] = {value!r} {why}")
        arrays.append(values)
    try:
        return tuple(np.broadcast_arrays(*arrays))
    except ValueError:
        shapes = ", ".join(str(a.shape) for a in arrays)
        raise GeoTokenError(f"lat1, lon1, lat2, lon2 have shapes {shapes} that do not broadcast") from None


def haversine_km(lat1, lon1, lat2, lon2) -> np.ndarray:
    """Great-circle distance in km on a sphere of radius 6371 km (degrees in, broadcasting)."""
    lat1, lon1, lat2, lon2 = (np.radians(a) for a in _coordinates(lat1, lon1, lat2, lon2))
    a = np.sin((lat2 - lat1) / 2) ** 2 + np.cos(lat1) * np.cos(lat2) * np.sin((lon2 - lon1) / 2) ** 2
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))


def geodesic_km(lat1, lon1, lat2, lon2, tolerance: float = 1e-12, max_iter: int = 100) -> np.ndarray:
    """Shortest distance in km on the WGS84 ellipsoid (degrees in, broadcasting).

    Vincenty's inverse formula runs on all pairs at once (accurate to ~0.1 mm); the few nearly antipodal
    pairs where its iteration does not converge are handed to geographiclib (Karney's algorithm).
    """
    lat1, lon1, lat2, lon2 = _coordinates(lat1, lon1, lat2, lon2)
    shape = lat1.shape
    lat1, lon1, lat2, lon2 = (a.ravel() for a in (lat1, lon1, lat2, lon2))
    f, a = _WGS84_F, _WGS84_A_KM
    b = (1 - f) * a
    u1 = np.arctan((1 - f) * np.tan(np.radians(lat1)))  # reduced latitudes
    u2 = np.arctan((1 - f) * np.tan(np.radians(lat2)))
    sin_u1, cos_u1, sin_u2, cos_u2 = np.sin(u1), np.cos(u1), np.sin(u2), np.cos(u2)
    big_l = np.radians(np.remainder(lon2 - lon1 + 180, 360) - 180)  # longitude difference in [-pi, pi)
    lam = big_l.copy()
    converged = np.zeros(lat1.shape, dtype=bool)
    for _ in range(max_iter):
        sin_lam, cos_lam = np.sin(lam), np.cos(lam)
        sin_sigma = np.hypot(cos_u2 * sin_lam, cos_u1 * sin_u2 - sin_u1 * cos_u2 * cos_lam)
        cos_sigma = sin_u1 * sin_u2 + cos_u1 * cos_u2 * cos_lam
        sigma = np.arctan2(sin_sigma, cos_sigma)
        with np.errstate(divide="ignore", invalid="ignore"):
            sin_alpha = np.where(sin_sigma > 0, cos_u1 * cos_u2 * sin_lam / sin_sigma, 0.0)
            cos2_alpha = 1 - sin_alpha**2
            # On the equator cos^2(alpha) = 0 and the term does not matter.
            cos_2sm = np.where(cos2_alpha > 0, cos_sigma - 2 * sin_u1 * sin_u2 / cos2_alpha, 0.0)
        c = f / 16 * cos2_alpha * (4 + f * (4 - 3 * cos2_alpha))
        previous = lam
        lam = big_l + (1 - c) * f * sin_alpha * (
            sigma + c * sin_sigma * (cos_2sm + c * cos_sigma * (-1 + 2 * cos_2sm**2))
        )
        converged = np.abs(lam - previous) <= tolerance
        if converged.all():
            break
    u_sq = cos2_alpha * (a * a - b * b) / (b * b)
    big_a = 1 + u_sq / 16384 * (4096 + u_sq * (-768 + u_sq * (320 - 175 * u_sq)))
    big_b = u_sq / 1024 * (256 + u_sq * (-128 + u_sq * (74 - 47 * u_sq)))
    inner = cos_sigma * (-1 + 2 * cos_2sm**2) - big_b / 6 * cos_2sm * (-3 + 4 * sin_sigma**2) * (
        -3 + 4 * cos_2sm**2
    )
    delta_sigma = big_b * sin_sigma * (cos_2sm + big_b / 4 * inner)
    km = b * big_a * (sigma - delta_sigma)
    stuck = np.flatnonzero(~converged)
    if stuck.size:
        from geographiclib.geodesic import Geodesic

        wgs84 = Geodesic.WGS84
        for k in stuck.tolist():  # nearly antipodal pairs only
            km[k] = wgs84.Inverse(lat1[k], lon1[k], lat2[k], lon2[k], Geodesic.DISTANCE)["s12"] / 1000
    return km.reshape(shape)


@dataclass(frozen=True)
class GeoMetrics:
    """Share of images (0..1) within each threshold, and median and mean error in km, over n images."""

    n: int
    accuracy: dict[float, float]
    median_km: float
    mean_km: float

    @property
    def thresholds(self) -> tuple[float, ...]:
        return tuple(self.accuracy)

    def to_dict(self) -> dict:
        """JSON-ready: threshold keys become strings ("25", "0.5")."""
        return {
            "n": self.n,
            "accuracy": {_threshold_key(t): share for t, share in self.accuracy.items()},
            "median_km": self.median_km,
            "mean_km": self.mean_km,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> GeoMetrics:
        try:
            accuracy = {float(t): float(share) for t, share in d["accuracy"].items()}
            return cls(int(d["n"]), accuracy, float(d["median_km"]), float(d["mean_km"]))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise GeoTokenError(f"not a GeoMetrics dictionary ({exc!r}): {dict(d)!r}") from None

    def __str__(self) -> str:
        return format_table({"result": self})


def _threshold_key(t: float) -> str:
    return str(int(t)) if float(t).is_integer() else repr(float(t))


def _check_thresholds(thresholds: Sequence[float]) -> tuple[float, ...]:
    values = tuple(float(t) for t in thresholds)
    if not values or any(not (math.isfinite(t) and t > 0) for t in values):
        raise GeoTokenError(f"thresholds must be positive finite km, got {tuple(thresholds)!r}")
    if list(values) != sorted(set(values)):
        raise GeoTokenError(f"thresholds must be increasing without repeats, got {tuple(thresholds)!r}")
    return values


def geo_metrics(errors_km, thresholds: Sequence[float] = THRESHOLDS_KM) -> GeoMetrics:
    """Accuracy at each threshold (error <= threshold), median and mean of per-image errors in km."""
    thresholds = _check_thresholds(thresholds)
    errors = np.asarray(errors_km, dtype=np.float64)
    if errors.ndim != 1:
        raise GeoTokenError(f"errors_km must be one error per image (1-D), got shape {errors.shape}")
    if errors.size == 0:
        raise GeoTokenError("errors_km is empty: metrics of 0 images are undefined")
    bad = ~(errors >= 0) | ~np.isfinite(errors)
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        raise GeoTokenError(f"errors_km row {k} = {float(errors[k])!r} is not a finite distance >= 0")
    within = errors[None, :] <= np.array(thresholds)[:, None]  # (T, N)
    return GeoMetrics(
        n=int(errors.size),
        accuracy={t: float(share) for t, share in zip(thresholds, within.mean(axis=1))},
        median_km=float(np.median(errors)),
        mean_km=float(errors.mean()),
    )


def format_table(rows: Mapping[str, GeoMetrics], digits: int = 1) -> str:
    """Plain-text table, one row per method: n, % of images within each threshold, median and mean km.

    Rows may use different thresholds; a threshold a row lacks shows "-".
    """
    thresholds = sorted({t for m in rows.values() for t in m.accuracy})
    header = ["", "n"] + [f"{_threshold_key(t)} km" for t in thresholds] + ["median km", "mean km"]
    body = []
    for name, m in rows.items():
        shares = [f"{100 * m.accuracy[t]:.{digits}f}%" if t in m.accuracy else "-" for t in thresholds]
        body.append([name, str(m.n), *shares, f"{m.median_km:.{digits}f}", f"{m.mean_km:.{digits}f}"])
    widths = [max(len(row[k]) for row in [header, *body]) for k in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) if k == 0 else cell.rjust(w) for k, (cell, w) in enumerate(zip(row, widths)))
        for row in [header, *body]
    ]
    return "\n".join(line.rstrip() for line in lines)

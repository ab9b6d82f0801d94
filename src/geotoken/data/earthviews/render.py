"""EarthViews rendering: the imagery layers, each view's random draws (its augmentations), pixels and JPEG."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator

import numpy as np
from PIL import Image

from geotoken import assets
from geotoken.data.earthviews.config import LAYERS, EarthViewsConfig, ViewStyle
from geotoken.data.earthviews.geometry import Split, sample_equirect, view_latlon
from geotoken.errors import GeoTokenError

_LAYER_CACHE: dict[str, np.ndarray] = {}


def load_layer(name: str) -> np.ndarray:
    """A whole-Earth equirectangular image as uint8 (H, W, 3), decoded once per process."""
    if name not in _LAYER_CACHE:
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

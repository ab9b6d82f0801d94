"""Evaluation plots as PNG (matplotlib, Agg backend): error CDF per method, predictions on a world map.

Each function writes one file atomically and returns its path.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from geotoken.assets import basemap_image
from geotoken.geo import THRESHOLDS_KM
from geotoken.io import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, dpi: int) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    _pyplot().close(fig)
    return Path(path)


def plot_error_cdf(
    errors_km: Mapping[str, np.ndarray],
    path: str | Path,
    thresholds: Sequence[float] = THRESHOLDS_KM,
    dpi: int = 120,
) -> Path:
    """Share of images with error <= x, one curve per method, log-km axis, thresholds marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    lo = 0.1
    for name, e in errors_km.items():
        s = np.sort(np.maximum(np.asarray(e, dtype=np.float64), lo))  # (n,) clip so 0 km shows on a log axis
        ax.step(s, np.arange(1, s.size + 1) / s.size, where="post", label=name, lw=1.6)
    for t in thresholds:
        ax.axvline(t, color="0.6", lw=0.8, ls="--")
        ax.text(
            t,
            1.01,
            f"{t:g} km",
            ha="center",
            va="bottom",
            fontsize=8,
            color="0.35",
            transform=ax.get_xaxis_transform(),
        )
    ax.set_xscale("log")
    ax.set_xlim(lo, 20_100)
    ax.set_ylim(0, 1)
    ax.set_xlabel("error (km, log scale)")
    ax.set_ylabel("share of images within error")
    ax.grid(alpha=0.25, which="both")
    ax.legend(loc="upper left", fontsize=9)
    return _save(fig, Path(path), dpi)


@functools.lru_cache(maxsize=2)
def basemap(width: int = 900, name: str = "bmng") -> np.ndarray:
    """The Blue Marble image (equirectangular, 2:1), decoded at reduced size: (width / 2, width, 3) uint8."""
    with Image.open(basemap_image(name)) as img:
        img.draft("RGB", (width, width // 2))  # JPEG decodes at 1/2, 1/4 or 1/8 scale: fast
        return np.asarray(img.convert("RGB").resize((width, width // 2), Image.Resampling.BILINEAR))


def plot_world_map(
    true_lat: np.ndarray,
    true_lon: np.ndarray,
    pred_lat: np.ndarray,
    pred_lon: np.ndarray,
    path: str | Path,
    title: str = "",
    max_lines: int = 400,
    seed: int = 0,
    dpi: int = 100,
) -> Path:
    """Truth (green) and predictions (red) over Blue Marble; a random subset of pairs joined by lines."""
    plt = _pyplot()
    from matplotlib.collections import LineCollection

    fig, ax = plt.subplots(figsize=(9, 4.8))
    ax.imshow(basemap(), extent=(-180, 180, -90, 90), origin="upper", interpolation="nearest")
    n = len(true_lat)
    rng = np.random.default_rng(seed)
    sub = rng.choice(n, size=min(n, max_lines), replace=False)
    # a line per pair; pairs that cross the antimeridian are drawn the short way and clipped by the axes
    dlon = (pred_lon[sub] - true_lon[sub] + 180) % 360 - 180
    segments = np.stack(
        [np.stack([true_lon[sub], true_lat[sub]], 1), np.stack([true_lon[sub] + dlon, pred_lat[sub]], 1)], 1
    )
    ax.add_collection(
        LineCollection(segments, colors="yellow", linewidths=0.4, alpha=0.5)
    )  # (n, 2 points, xy)
    ms = max(1.0, 12.0 / np.sqrt(max(n, 1) / 100))
    ax.scatter(true_lon, true_lat, s=ms, c="lime", label="truth", linewidths=0, alpha=0.8)
    ax.scatter(pred_lon, pred_lat, s=ms, c="red", label="prediction", linewidths=0, alpha=0.8)
    ax.set_xlim(-180, 180)
    ax.set_ylim(-90, 90)
    ax.set_xticks(range(-180, 181, 60))
    ax.set_yticks(range(-90, 91, 30))
    ax.set_title(title or f"predictions vs truth ({n} images)")
    ax.legend(loc="lower left", fontsize=8, markerscale=3)
    return _save(fig, Path(path), dpi)

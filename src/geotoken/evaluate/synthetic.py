"""Small synthetic-but-structured gallery/query splits for tests and quick checks of the evaluation.

Points cluster around random "cities" (photo collections are clustered); features encode the location
through random Fourier features of the unit vector plus noise and distractor dimensions, so that every
real method can recover part of the location and the prior cannot.
"""

from __future__ import annotations

import numpy as np
import torch

from geotoken.evaluate.baselines import Split, from_xyz, l2_normalize, to_xyz


def clustered_points(
    n: int, n_clusters: int, spread_km: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """n points around n_clusters centres (uniform on the sphere, |lat| < 70), Gaussian spread in km;
    cluster sizes follow a Zipf-like law so one region is densest."""
    clat = np.degrees(np.arcsin(rng.uniform(-0.94, 0.94, n_clusters)))
    clon = rng.uniform(-180, 180, n_clusters)
    p = 1.0 / np.arange(1, n_clusters + 1) ** 0.8
    c = rng.choice(n_clusters, size=n, p=p / p.sum())
    xyz = to_xyz(clat[c], clon[c]) + rng.normal(0, spread_km / 6371.0, size=(n, 3))
    return from_xyz(xyz)


def fourier_features(lat: np.ndarray, lon: np.ndarray, dim: int, scale: float, seed: int) -> np.ndarray:
    """cos(W xyz + b): a fixed random map from a location to `dim` features (nearby points -> similar)."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0, scale, size=(3, dim))
    b = rng.uniform(0, 2 * np.pi, size=dim)
    return np.cos(to_xyz(lat, lon) @ w + b).astype(np.float32)


def gps_encoder(dim: int = 64, scale: float = 30.0, seed: int = 7):
    """A stand-in GPS encoder with the GeoCLIP interface: (B, 2) lat/lon tensor -> (B, dim) tensor."""

    def encode(latlon: torch.Tensor) -> torch.Tensor:
        ll = latlon.double().numpy()
        return torch.from_numpy(fourier_features(ll[:, 0], ll[:, 1], dim, scale, seed))

    return encode


def synthetic_splits(
    n_gallery: int = 2000,
    n_queries: int = 300,
    n_clusters: int = 40,
    spread_km: float = 60.0,
    noise: float = 0.6,
    seed: int = 0,
) -> tuple[Split, Split]:
    """(gallery, queries) with arrays `features` (F=96: 64 location-dependent + 32 distractors),
    `visual` (L2-normalised features) and `gps` (a noisy embedding aligned with `gps_encoder()`)."""
    rng = np.random.default_rng(seed)
    lat, lon = clustered_points(n_gallery + n_queries, n_clusters, spread_km, rng)
    n = lat.size
    loc = fourier_features(lat, lon, 64, 40.0, seed=1)  # (n, 64)
    feats = np.concatenate([loc + rng.normal(0, noise, loc.shape), rng.normal(0, 1, (n, 32))], 1).astype(
        np.float32
    )
    gps = fourier_features(lat, lon, 64, 30.0, seed=7) + rng.normal(0, noise, (n, 64))
    arrays = {"features": feats, "visual": l2_normalize(feats), "gps": l2_normalize(gps)}
    ids = np.array([f"p{i:06d}" for i in range(n)])
    g, q = slice(0, n_gallery), slice(n_gallery, n)
    gallery = Split(ids[g], lat[g], lon[g], {k: a[g] for k, a in arrays.items()}, name="synthetic gallery")
    queries = Split(ids[q], lat[q], lon[q], {k: a[q] for k, a in arrays.items()}, name="synthetic queries")
    return gallery, queries

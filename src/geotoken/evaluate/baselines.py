"""The baselines GeoToken is compared with, each a real method from the literature, on the same features.

- `prior`: always the densest place of the training set (the centre of its most populated S2 cell).
- `nn`: 1-nearest-neighbour retrieval (Im2GPS; the retrieval core of Img2Loc and G3).
- `knn`: similarity-weighted vote of the k neighbours; the cluster (neighbours within R km of one
  neighbour) with the most weight wins, and its weighted centre is the answer.
- `cells`: classification over S2 cells built adaptively by training-set density (PlaNet), a linear or
  small MLP head trained with cross-entropy; the answer is the mean of the training points of the cell.
- `gps-gallery`: GeoCLIP: the image's GPS-aligned embedding scored against the GPS encoder's embeddings
  of a gallery of coordinates; the best-scoring coordinate is the answer.
- `ceiling`: not a method but an oracle bound: the gallery coordinate nearest to the query's true place
  (it reads the answer), the best that any method answering with gallery coordinates can do.
- `geoclip`: GeoCLIP's own pretrained model (not fitted here): its image head on the queries' projected
  CLIP ViT-L/14 features, softmax over its 100K MP16 gallery; the most probable coordinate is the answer.

Everything below is a function over arrays (vectorized over queries); the small classes only hold what
`fit` learned, so `geotoken evaluate` can run any of them through one `fit(gallery) / predict(queries)`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from geotoken.assets import mp16_coordinates_csv
from geotoken.data.manifest import read_manifest
from geotoken.devices import own_random_state
from geotoken.encoders import load_gps_encoder
from geotoken.encoders.base import clip_spelled
from geotoken.encoders.geoclip import IMAGE_DIM, GeoCLIPFiles, GeoCLIPGeolocator, clip_mismatch
from geotoken.errors import GeoTokenError
from geotoken.features import FeatureStore
from geotoken.geo import haversine_km
from geotoken.retrieval.embeddings import join_embeddings
from geotoken.s2 import cell_parent, latlon_to_cell_ids

# --------------------------------------------------------------------------------------- data holders


@dataclass
class Split:
    """One side of an evaluation (gallery or queries): ids and true coordinates in row order, plus the
    per-row arrays of its feature store (`features`, `visual`, `gps`, `text`; any subset)."""

    ids: np.ndarray
    lat: np.ndarray
    lon: np.ndarray
    arrays: Mapping[str, np.ndarray] = field(default_factory=dict)
    name: str = "split"
    images: np.ndarray | None = None  # image references (only the MLLM selector needs the photos)
    skipped: int = 0  # rows dropped because their image could not be embedded
    backbone: dict | None = None  # the store's backbone config ({"name": "clip", "clip": ...}), if known
    store: FeatureStore | None = None  # the store read, if any: neighbour tables are checked against it

    def __post_init__(self) -> None:
        self.lat = np.asarray(self.lat, dtype=np.float64)
        self.lon = np.asarray(self.lon, dtype=np.float64)
        n = len(self.ids)
        if self.lat.shape != (n,) or self.lon.shape != (n,):
            raise GeoTokenError(f"{self.name}: {n} ids but lat {self.lat.shape} / lon {self.lon.shape}")
        for key, arr in self.arrays.items():
            if len(arr) != n:
                raise GeoTokenError(f"{self.name}: array {key!r} has {len(arr)} rows, the manifest has {n}")

    def __len__(self) -> int:
        return len(self.ids)

    def array(self, key: str) -> np.ndarray:
        """One array, or a '+' concatenation of unit-vector arrays as an index searches it ("visual+gps")."""
        names = key.split("+")
        missing = [n for n in names if n not in self.arrays]
        if missing:
            have = ", ".join(sorted(self.arrays)) or "none"
            raise GeoTokenError(f"{self.name}: feature array {missing[0]!r} is missing (available: {have})")
        return self.arrays[key] if len(names) == 1 else join_embeddings([self.arrays[n] for n in names])


@dataclass
class Predictions:
    """Predicted coordinates for each query row; `score` is the method's confidence when it has one."""

    lat: np.ndarray
    lon: np.ndarray
    score: np.ndarray | None = None
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------ geometry helpers


def to_xyz(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """Unit vectors (..., 3) of lat/lon degrees."""
    la, lo = np.radians(lat), np.radians(lon)
    return np.stack([np.cos(la) * np.cos(lo), np.cos(la) * np.sin(lo), np.sin(la)], axis=-1)


def from_xyz(xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """lat/lon degrees of (..., 3) vectors (need not be unit length)."""
    x, y, z = xyz[..., 0], xyz[..., 1], xyz[..., 2]
    return np.degrees(np.arctan2(z, np.hypot(x, y))), np.degrees(np.arctan2(y, x))


def spherical_mean(
    lat: np.ndarray, lon: np.ndarray, weights: np.ndarray | None = None, axis: int = -1
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted mean position on the sphere along `axis` (correct across the antimeridian)."""
    xyz = to_xyz(lat, lon)  # (..., n, 3) with the reduced axis moved before the last
    w = np.ones(np.shape(lat)) if weights is None else np.asarray(weights, dtype=np.float64)
    ax = axis if axis >= 0 else axis - 1
    return from_xyz((xyz * w[..., None]).sum(axis=ax))


def pairwise_km(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """(..., k) coordinates -> (..., k, k) great-circle distances."""
    return haversine_km(lat[..., :, None], lon[..., :, None], lat[..., None, :], lon[..., None, :])


# ---------------------------------------------------------------------------------- retrieval helper


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def exact_neighbours(
    gallery: np.ndarray, queries: np.ndarray, k: int, batch: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine top-k: (rows int64 (B, k), sims float32 (B, k)), best first.

    Brute force in float32 chunks: exact, simple, and fast enough for evaluation-size galleries; a
    FAISS neighbour table from `geotoken index` can be passed to the methods instead.
    """
    g = torch.from_numpy(l2_normalize(gallery))  # (N, D)
    k = min(k, g.shape[0])
    rows, sims = [], []
    for start in range(0, len(queries), batch):
        q = torch.from_numpy(l2_normalize(queries[start : start + batch]))  # (b, D)
        s, r = torch.topk(q @ g.T, k, dim=1)  # (b, k)
        rows.append(r.numpy())
        sims.append(s.numpy())
    return np.concatenate(rows).astype(np.int64), np.concatenate(sims).astype(np.float32)


# ---------------------------------------------------------------------------------------------- prior


def densest_location(lat: np.ndarray, lon: np.ndarray, level: int = 7) -> tuple[float, float]:
    """Mean position of the training points in the most populated S2 cell at `level` (level 7: ~70 km)."""
    cells = cell_parent(latlon_to_cell_ids(lat, lon, level=30), level)
    uniq, inv, counts = np.unique(cells, return_inverse=True, return_counts=True)
    members = inv == np.argmax(counts)
    mlat, mlon = spherical_mean(lat[members], lon[members])
    return float(mlat), float(mlon)


@dataclass
class PriorConfig:
    level: int = 7


class Prior:
    """Predicts the training set's densest place for every query: the floor every method must clear."""

    name = "prior"

    def __init__(self, config: PriorConfig | None = None):
        self.config = config or PriorConfig()

    def fit(self, gallery: Split) -> Prior:
        self.location = densest_location(gallery.lat, gallery.lon, self.config.level)
        return self

    def predict(self, queries: Split) -> Predictions:
        n = len(queries)
        return Predictions(np.full(n, self.location[0]), np.full(n, self.location[1]))


# ---------------------------------------------------------------------------------------------- ceiling


def nearest_coordinate(
    gallery_lat: np.ndarray, gallery_lon: np.ndarray, lat: np.ndarray, lon: np.ndarray, batch: int = 2048
) -> np.ndarray:
    """(N,) int64: the gallery row nearest (great circle) to each point (largest dot product of unit vectors)."""
    g = to_xyz(np.asarray(gallery_lat, dtype=np.float64), np.asarray(gallery_lon, dtype=np.float64))  # (G, 3)
    q = to_xyz(np.asarray(lat, dtype=np.float64), np.asarray(lon, dtype=np.float64))  # (N, 3)
    out = np.empty(len(q), dtype=np.int64)
    for start in range(0, len(q), batch):
        out[start : start + batch] = np.argmax(q[start : start + batch] @ g.T, axis=1)
    return out


class Ceiling:
    """The nearest gallery coordinate to each query's true place: an oracle, the bound on every method that
    answers with gallery coordinates (retrieval; GeoToken under the gallery constraint)."""

    name = "ceiling"

    def fit(self, gallery: Split) -> Ceiling:
        self.gallery = gallery
        return self

    def predict(self, queries: Split) -> Predictions:
        rows = nearest_coordinate(self.gallery.lat, self.gallery.lon, queries.lat, queries.lon)
        return Predictions(self.gallery.lat[rows], self.gallery.lon[rows])


# ------------------------------------------------------------------------------------- nn and knn


def knn_vote(
    nbr_lat: np.ndarray,
    nbr_lon: np.ndarray,
    sims: np.ndarray,
    radius_km: float = 100.0,
    temperature: float = 0.1,
    answer: str = "centre",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Similarity-weighted vote of k neighbours per query, clustered within `radius_km`.

    nbr_lat, nbr_lon, sims: (B, k), best first. Weights are softmax(sims / temperature). Each neighbour j
    defines a cluster {i : d(i, j) <= R}; the cluster with the most weight wins (ties: the better-ranked
    j). The answer is the weighted centre of the cluster ("centre") or its heaviest member ("member").
    Returns (lat (B,), lon (B,), winning weight share (B,)).
    """
    if answer not in ("centre", "member"):
        raise GeoTokenError(f"knn answer must be 'centre' or 'member', got {answer!r}")
    s = np.asarray(sims, dtype=np.float64)
    w = np.exp((s - s.max(axis=1, keepdims=True)) / temperature)
    w /= w.sum(axis=1, keepdims=True)  # (B, k)
    near = pairwise_km(nbr_lat, nbr_lon) <= radius_km  # (B, k, k): near[b, j, i]
    mass = (near * w[:, None, :]).sum(axis=2)  # (B, k) weight of the cluster around j
    best = np.argmax(mass, axis=1)  # (B,) first maximum = best-ranked centre
    rows = np.arange(len(best))
    members = near[rows, best]  # (B, k)
    if answer == "member":
        pick = np.argmax(np.where(members, w, -1.0), axis=1)
        return nbr_lat[rows, pick], nbr_lon[rows, pick], mass[rows, best]
    lat, lon = spherical_mean(nbr_lat, nbr_lon, w * members)
    return lat, lon, mass[rows, best]


@dataclass
class RetrievalConfig:
    embedding: str = "visual"  # which feature-store array to compare (cosine)
    k: int = 15
    radius_km: float = 100.0
    temperature: float = 0.1  # chosen on an EarthViews validation split (k 15, R 100 km)
    answer: str = "centre"

    def __post_init__(self) -> None:
        # temperature 0 divides by zero in the vote's softmax, a negative radius empties every cluster
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise GeoTokenError(f"knn: temperature must be a finite number > 0, got {self.temperature}")
        if not (math.isfinite(self.radius_km) and self.radius_km >= 0):
            raise GeoTokenError(f"knn: radius_km must be a finite number >= 0, got {self.radius_km}")


class NearestNeighbour:
    """1-NN (k = 1) or the clustered k-NN vote over a cosine neighbour search of one embedding.

    `neighbours=(rows, sims)` uses a precomputed table (e.g. FAISS from `geotoken index`) instead of the
    exact search; rows index the gallery.
    """

    def __init__(self, config: RetrievalConfig | None = None, vote: bool = False, neighbours=None):
        self.config = config or RetrievalConfig()
        self.vote = vote
        self.name = "knn" if vote else "nn"
        self.neighbours = neighbours

    def fit(self, gallery: Split) -> NearestNeighbour:
        self.gallery = gallery
        self.gallery_emb = gallery.array(self.config.embedding)
        return self

    def predict(self, queries: Split) -> Predictions:
        k = self.config.k if self.vote else 1
        if self.neighbours is not None:
            if np.shape(self.neighbours[0])[1] < k:
                raise GeoTokenError(
                    f"{self.name}: k {k} but the neighbour table holds {np.shape(self.neighbours[0])[1]} "
                    "neighbours per query"
                )
            rows, sims = (np.asarray(a)[:, :k] for a in self.neighbours)
        else:
            rows, sims = exact_neighbours(self.gallery_emb, queries.array(self.config.embedding), k)
        nlat, nlon = self.gallery.lat[rows], self.gallery.lon[rows]  # (B, k)
        if not self.vote:
            return Predictions(nlat[:, 0], nlon[:, 0], sims[:, 0].astype(np.float64))
        c = self.config
        lat, lon, share = knn_vote(nlat, nlon, sims, c.radius_km, c.temperature, c.answer)
        return Predictions(lat, lon, share)


# ---------------------------------------------------------------------------------------------- cells


@dataclass
class AdaptiveCells:
    """A PlaNet partition: `cell_ids` (C,) uint64 S2 ids at mixed levels, `counts` (C,), the mean position
    of each cell's training points `lat`, `lon` (C,), and each training point's class `labels` (N,),
    -1 where its cell was dropped for having fewer than min_count points."""

    cell_ids: np.ndarray
    counts: np.ndarray
    lat: np.ndarray
    lon: np.ndarray
    labels: np.ndarray


def adaptive_cells(
    lat: np.ndarray,
    lon: np.ndarray,
    max_count: int = 100,
    min_count: int = 5,
    min_level: int = 2,
    max_level: int = 14,
) -> AdaptiveCells:
    """Split S2 cells while they hold more than `max_count` points (down to `max_level`), then drop cells
    with fewer than `min_count` points: dense regions get small cells, empty ones none."""
    if not 0 <= min_level <= max_level <= 30:
        raise GeoTokenError(f"cells: need 0 <= min_level <= max_level <= 30, got {min_level}, {max_level}")
    if min_count < 1 or max_count < min_count:
        raise GeoTokenError(f"cells: need 1 <= min_count <= max_count, got {min_count}, {max_count}")
    leaves = latlon_to_cell_ids(lat, lon, level=30)  # (N,) uint64
    point_cell = np.zeros(len(leaves), dtype=np.uint64)  # final cell id of each point
    active = np.arange(len(leaves))  # points whose cell is still being split
    for level in range(min_level, max_level + 1):
        cells = cell_parent(leaves[active], level)
        _, inv, counts = np.unique(cells, return_inverse=True, return_counts=True)
        done = (counts[inv] <= max_count) | (level == max_level)
        point_cell[active[done]] = cells[done]
        active = active[~done]
        if active.size == 0:
            break
    cell_ids, inv, counts = np.unique(point_cell, return_inverse=True, return_counts=True)
    keep = counts >= min_count
    new_index = np.where(keep, np.cumsum(keep) - 1, -1)  # old cell -> class (or -1)
    labels = new_index[inv]
    # mean position per kept cell: sum unit vectors per class with bincount, vectorized
    xyz = to_xyz(lat, lon)
    m = labels >= 0
    sums = np.stack(
        [np.bincount(labels[m], weights=xyz[m, i], minlength=int(keep.sum())) for i in range(3)], 1
    )
    clat, clon = from_xyz(sums)
    return AdaptiveCells(cell_ids[keep], counts[keep], clat, clon, labels)


@dataclass
class CellsConfig:
    features: str = "features"  # feature-store array the head reads (raw backbone output by default)
    max_count: int = 100  # 100 / 5 chosen on an EarthViews validation split (10K gallery)
    min_count: int = 5
    min_level: int = 2
    max_level: int = 14
    hidden: int = 512  # 0 = linear head
    dropout: float = 0.1
    epochs: int = 15
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    label_smoothing: float = 0.1
    seed: int = 0


class CellClassifier:
    """PlaNet-style classification over adaptive S2 cells with a small head trained by cross-entropy."""

    name = "cells"

    def __init__(self, config: CellsConfig | None = None, progress: bool = False):
        self.config = config or CellsConfig()
        self.progress = progress

    @own_random_state
    def fit(self, gallery: Split) -> CellClassifier:
        c = self.config
        self.cells = adaptive_cells(
            gallery.lat, gallery.lon, c.max_count, c.min_count, c.min_level, c.max_level
        )
        keep = np.flatnonzero(self.cells.labels >= 0)
        n_cls = len(self.cells.cell_ids)
        if n_cls < 2:
            raise GeoTokenError(
                f"cells: only {n_cls} cell(s) with >= {c.min_count} training points; lower min_count"
            )
        x = np.asarray(gallery.array(c.features)[keep], dtype=np.float32)  # (N, F)
        self.mean, self.std = x.mean(0), x.std(0) + 1e-6
        x = torch.from_numpy((x - self.mean) / self.std)
        y = torch.from_numpy(self.cells.labels[keep])
        torch.manual_seed(c.seed)
        layers = [nn.Linear(x.shape[1], n_cls)] if c.hidden == 0 else [
            nn.Linear(x.shape[1], c.hidden), nn.ReLU(), nn.Dropout(c.dropout), nn.Linear(c.hidden, n_cls)
        ]  # fmt: skip
        self.head = nn.Sequential(*layers)
        opt = torch.optim.AdamW(self.head.parameters(), lr=c.lr, weight_decay=c.weight_decay)
        steps = c.epochs * -(-len(x) // c.batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=c.lr, total_steps=steps)
        gen = torch.Generator().manual_seed(c.seed)
        self.head.train()
        for _ in tqdm(range(c.epochs), desc="cells: train head", disable=not self.progress, leave=False):
            order = torch.randperm(len(x), generator=gen)
            for start in range(0, len(x), c.batch_size):
                b = order[start : start + c.batch_size]
                loss = nn.functional.cross_entropy(self.head(x[b]), y[b], label_smoothing=c.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        self.head.eval()
        return self

    def predict_proba(self, features: np.ndarray, batch: int = 4096) -> np.ndarray:
        """(B, F) features -> (B, C) class probabilities."""
        out = []
        with torch.no_grad():
            for start in range(0, len(features), batch):
                x = (np.asarray(features[start : start + batch], dtype=np.float32) - self.mean) / self.std
                out.append(torch.softmax(self.head(torch.from_numpy(x)), dim=1).numpy())
        return np.concatenate(out)

    def predict(self, queries: Split) -> Predictions:
        p = self.predict_proba(queries.array(self.config.features))
        best = p.argmax(axis=1)
        return Predictions(self.cells.lat[best], self.cells.lon[best], p.max(axis=1).astype(np.float64))


# ---------------------------------------------------------------------------------------- gps-gallery


def embed_gps(encoder: Callable, lat: np.ndarray, lon: np.ndarray, batch: int = 8192) -> np.ndarray:
    """GPS-encoder embeddings (M, D) of coordinates, L2-normalised, float32 (computed once per gallery)."""
    out = []
    with torch.no_grad():
        for start in range(0, len(lat), batch):
            ll = torch.from_numpy(
                np.stack([lat[start : start + batch], lon[start : start + batch]], 1)
            ).float()
            out.append(torch.as_tensor(encoder(ll)).float().numpy())
    return l2_normalize(np.concatenate(out))


def best_gallery_match(
    queries: np.ndarray, gallery: np.ndarray, batch: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """argmax over the gallery of cosine(query, gallery): (rows (B,), sims (B,))."""
    rows, sims = exact_neighbours(gallery, queries, 1, batch)
    return rows[:, 0], sims[:, 0]


# coordinates the gps-gallery baseline scores: the gallery split's, or GeoCLIP's 100K MP16 ones
GPS_GALLERIES = ("train", "mp16")


@dataclass
class GPSGalleryConfig:
    embedding: str = "gps"  # the image's GPS-aligned embedding in the query store
    gallery: str = "train"  # one of GPS_GALLERIES


class GPSGallery:
    """GeoCLIP: score a gallery of GPS coordinates against the image's GPS-aligned embedding."""

    name = "gps-gallery"

    def __init__(self, config: GPSGalleryConfig | None = None, encoder: Callable | None = None):
        self.config = config or GPSGalleryConfig()
        self.encoder = encoder

    def fit(self, gallery: Split) -> GPSGallery:
        if self.config.gallery == "train":
            self.lat, self.lon = gallery.lat, gallery.lon
        elif self.config.gallery == "mp16":
            m = read_manifest(mp16_coordinates_csv())
            self.lat, self.lon = m.lat, m.lon
        else:
            raise GeoTokenError(
                f"gps-gallery: gallery must be one of {GPS_GALLERIES}, got {self.config.gallery!r}"
            )
        if self.encoder is None:
            self.encoder = load_gps_encoder().eval()
        self.gallery_emb = embed_gps(self.encoder, self.lat, self.lon)  # (M, D)
        return self

    def predict(self, queries: Split) -> Predictions:
        rows, sims = best_gallery_match(queries.array(self.config.embedding), self.gallery_emb)
        return Predictions(self.lat[rows], self.lon[rows], sims.astype(np.float64))


@dataclass
class GeoCLIPConfig:
    features: str = "features"  # projected CLIP ViT-L/14 image features (`geotoken embed --backbone clip`)
    gallery: str | None = None  # GeoCLIP's gallery CSV (LAT,LON); None: the one in the geoclip wheel
    batch_size: int = 256


def check_geoclip_features(queries: Split, config: GeoCLIPConfig | None = None) -> None:
    """GeoCLIP's head reads 768-d projected features of OpenAI's CLIP ViT-L/14 (`clip_mismatch`): anything else
    is a clear error (other towers' features have the shape but give meaningless numbers)."""
    config = config or GeoCLIPConfig()
    backbone = clip_spelled(queries.backbone or {})
    dim = queries.array(config.features).shape[1]
    if backbone.get("name") != "clip" or dim != IMAGE_DIM:
        raise GeoTokenError(
            f"geoclip: needs queries embedded with `geotoken embed --backbone clip` (CLIP ViT-L/14, "
            f"{IMAGE_DIM}-d projected image features in {config.features!r}); {queries.name} has backbone "
            f"{backbone.get('name') or 'unknown'} with {dim}-d features"
        )
    clip = str(backbone.get("clip", ""))
    source = (queries.store.header.get("backbone_source") if queries.store is not None else None) or {}
    problem = clip_mismatch(clip, source.get("path") if source.get("kind") == "folder" else None)
    if problem:
        raise GeoTokenError(
            f"geoclip: {queries.name} was embedded with CLIP {clip!r}: {problem} (leave geoclip out of the methods)"
        )


class GeoCLIP:
    """GeoCLIP's pretrained geolocator on stored CLIP features: nothing is fitted on the gallery split."""

    name = "geoclip"

    def __init__(self, config: GeoCLIPConfig | None = None, model: GeoCLIPGeolocator | None = None):
        self.config = config or GeoCLIPConfig()
        self.model = model

    def fit(self, gallery: Split) -> GeoCLIP:
        if self.model is None:
            files = GeoCLIPFiles.shipped()
            if self.config.gallery is not None:
                files = dataclasses.replace(files, gallery=Path(self.config.gallery))
            self.model = GeoCLIPGeolocator(files)
        return self

    def predict(self, queries: Split) -> Predictions:
        check_geoclip_features(queries, self.config)
        features = queries.array(self.config.features)
        lat, lon, prob = (np.zeros(len(queries)) for _ in range(3))
        for s in range(0, len(queries), self.config.batch_size):
            x = torch.from_numpy(np.asarray(features[s : s + self.config.batch_size], dtype=np.float32))
            top = self.model.predict_features(x, k=1)
            latlon = top.latlon[:, 0].double().cpu().numpy()
            lat[s : s + len(x)], lon[s : s + len(x)] = latlon[:, 0], latlon[:, 1]
            prob[s : s + len(x)] = top.prob[:, 0].double().cpu().numpy()
        return Predictions(lat, lon, prob)

"""Built-in pretrained models that need no training: GeoCLIP's weights (shipped in the `geoclip` wheel)
with CLIP ViT-L/14 through `transformers`, answering like a GeoToken bundle (`geotoken.prediction`)."""

from __future__ import annotations

import dataclasses
import itertools
import os
import time

import numpy as np
import torch
from tqdm import tqdm

from geotoken import s2
from geotoken.data.images import as_image, as_image_list
from geotoken.encoders.clip import PAPER_MODEL, resolve_precision
from geotoken.encoders.geoclip import GeoCLIPFiles, GeoCLIPGeolocator
from geotoken.encoders.ort import resolve_runtime
from geotoken.errors import GeoTokenError
from geotoken.geo import EARTH_RADIUS_KM
from geotoken.io import is_whole
from geotoken.places import place_names
from geotoken.prediction import Candidate, Prediction, check_top_k, resolve_device
from geotoken.search.options import SearchOptions

WITHIN_ROWS = 64  # candidates whose probability masses are computed together (64 x 100K doubles: 51 MB)


class GeoCLIPPredictor:
    """GeoCLIP (Vivanco et al., NeurIPS 2023; its weights are MIT-licensed) behind `Geolocator`'s `predict`
    and `info`: CLIP ViT-L/14 -> GeoCLIP's image head -> softmax over its 100K MP16 gallery coordinates.

    Each candidate is a gallery coordinate, ranked by GeoCLIP's softmax probability of it (`logp`, its log);
    `within` is the softmax mass within 25 / 200 / 750 km of it (uncalibrated) and `probability` the 200 km
    one, as a bundle's candidates give P(within 200 km); plus its S2 cell and polygon at `level` and the
    nearest place. No strategy or selector
    applies (the `Prediction` says "geoclip", "softmax"). Build with `load(clip=...)` or
    `Geolocator.from_pretrained("geoclip")`.
    """

    name = "geoclip"
    strategy, select = "geoclip", "softmax"
    radii_km = (25.0, 200.0, 750.0)
    probability_within_km = 200.0  # `probability` is the mass within it (a bundle's default radius)

    def __init__(self, model: GeoCLIPGeolocator, level: int = 20, batch_size: int = 16):
        if model.backbone is None:
            raise GeoTokenError("GeoCLIPPredictor needs a GeoCLIPGeolocator with its CLIP backbone")
        if not 1 <= level <= s2.MAX_LEVEL or batch_size < 1:
            raise GeoTokenError(f"geoclip: level must be in 1..{s2.MAX_LEVEL} and batch_size >= 1")
        self.model, self.level, self.batch_size = model.eval(), level, batch_size
        self.to(self.device)

    def to(self, device: str | torch.device) -> GeoCLIPPredictor:
        """Move the model (and the gallery's radians used for `within`) to `device` ("auto" resolves)."""
        self.model.to(resolve_device(device) if isinstance(device, str) else device)
        latlon = self.model.latlon
        exact = torch.float32 if latlon.device.type == "mps" else torch.float64  # MPS has no float64
        lat, lon = torch.deg2rad(latlon.to(exact)).unbind(1)
        self._lat, self._lon, self._cos = lat, lon, torch.cos(lat)
        return self

    @classmethod
    def load(
        cls,
        clip: str | os.PathLike | None = None,
        device: str = "auto",
        *,
        files: GeoCLIPFiles | None = None,
        cache_dir: str | os.PathLike | None = None,
        level: int = 20,
        batch_size: int = 16,
        precision: str = "auto",
        runtime: str = "auto",
    ) -> GeoCLIPPredictor:
        """clip: CLIP ViT-L/14 as a folder or hub id (default openai/clip-vit-large-patch14: about 1.7 GB,
        downloaded once into the hub cache); files: GeoCLIP's weights (default: the `geoclip` wheel's);
        precision: how CLIP runs (`geotoken.encoders.clip.PRECISIONS`, "auto" chosen for `device`);
        runtime: what runs it (`geotoken.encoders.ort.RUNTIMES`; "auto": ONNX Runtime on the CPU at fp32
        when installed, else torch)."""
        device = resolve_device(device)
        precision = resolve_precision(precision, device, runtime)
        runtime = resolve_runtime(runtime, precision, device)
        model = GeoCLIPGeolocator.load(
            clip or PAPER_MODEL, files=files, cache_dir=cache_dir, precision=precision, runtime=runtime
        )
        return cls(model, level, batch_size).to(device)

    @property
    def device(self) -> torch.device:
        return self.model.gallery.device

    def info(self) -> dict:
        """What is loaded (for `geotoken serve` and logs)."""
        return {
            "name": self.name,
            "bundle": None,
            "model": "GeoCLIP (Vivanco et al., NeurIPS 2023), pretrained weights of the geoclip package (MIT)",
            "backbone": self.model.backbone.config(),
            "backbone_precision": self.model.backbone.precision,
            "backbone_runtime": self.model.backbone.runtime,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "gallery_rows": len(self.model),
            "gallery_cache": str(self.model.cache_path),
            "level": self.level,
            "device": str(self.device),
            "strategies": [self.strategy],
            "selectors": [self.select],
            "calibrated": False,
        }

    def predict(
        self,
        images,
        top_k: int = 5,
        strategy: str | None = None,
        select: str | None = None,
        batch_size: int | None = None,
        progress: bool = False,
        **options,
    ) -> list[Prediction]:
        """Photos (paths, bytes, PIL images or NumPy arrays; EXIF orientation applied) -> one `Prediction`
        each, read and run `batch_size` at a time. GeoToken's search options are refused, not ignored."""
        own = {"strategy": self.strategy, "select": self.select}
        unknown = sorted(set(options) - {f.name for f in dataclasses.fields(SearchOptions)})
        if unknown:
            raise GeoTokenError(
                f"geoclip: unknown option(s) {unknown} (predict takes top_k, batch_size, progress)"
            )
        asked = {"strategy": strategy, "select": select, **options}
        given = sorted(k for k, v in asked.items() if v is not None and v != own.get(k))
        if given:
            raise GeoTokenError(
                f"geoclip: search option(s) {given} apply to GeoToken bundles only; GeoCLIP ranks its "
                "gallery by softmax"
            )
        top_k = check_top_k(top_k)
        batch_size = self.batch_size if batch_size is None else batch_size
        if not is_whole(batch_size):
            raise GeoTokenError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
        items = as_image_list(images)
        starts = range(0, len(items), batch_size)
        preds: list[Prediction] = []
        for s in tqdm(starts, desc="geoclip", unit="batch", disable=not progress or len(starts) < 2):
            t0 = time.perf_counter()
            chunk = [as_image(x, f"image {s + i}") for i, x in enumerate(items[s : s + batch_size])]
            features = self.model.embed_images(chunk, batch_size)
            preds += self.predict_features(features, top_k, {"embed": 1e3 * (time.perf_counter() - t0)})
        return preds

    @torch.no_grad()
    def predict_features(
        self, features: torch.Tensor, top_k: int = 5, extra_ms: dict | None = None
    ) -> list[Prediction]:
        """(B, 768) projected CLIP image features -> one `Prediction` per row."""
        t0 = time.perf_counter()
        k = min(top_k, len(self.model))
        probs = self.model(features).softmax(dim=-1)  # (B, N): exactly GeoCLIPGeolocator.predict_features
        top = torch.topk(probs, k, dim=1)
        within = self._within(probs, top.indices)  # {name: (B, k)}
        t1 = time.perf_counter()
        latlon = self.model.latlon[top.indices].cpu().numpy()  # (B, k, 2) float32 degrees
        prob = top.values.cpu().numpy()
        lat, lon = latlon[..., 0].astype(np.float64), latlon[..., 1].astype(np.float64)
        ids = s2.latlon_to_cell_ids(lat.ravel(), lon.ravel(), self.level)
        hexes = np.asarray(s2.cell_ids_to_hex(ids)).reshape(lat.shape)
        polys = np.asarray(s2.cell_vertices(ids)).reshape(*lat.shape, 4, 2)
        places = np.array(place_names(lat.ravel(), lon.ravel()), dtype=object).reshape(lat.shape)
        timings = {**(extra_ms or {}), "rank": 1e3 * (t1 - t0), "describe": 1e3 * (time.perf_counter() - t1)}
        timings["total"] = sum(timings.values())
        B = len(prob)
        per_image = {name: round(v / max(B, 1), 3) for name, v in timings.items()}
        out = []
        for b in range(B):
            cands = [
                Candidate(
                    lat=float(latlon[b, j, 0]),
                    lon=float(latlon[b, j, 1]),
                    probability=float(within[f"{self.probability_within_km:g}km"][b, j]),
                    probability_within_km=self.probability_within_km,
                    within={name: float(v[b, j]) for name, v in within.items()},
                    logp=float(np.log(prob[b, j])) if prob[b, j] > 0 else float("-inf"),
                    cell=str(hexes[b, j]),
                    level=self.level,
                    polygon=polys[b, j].round(6).tolist(),
                    place=places[b, j],
                    level_confidence=None,
                    source="geoclip",
                )
                for j in range(k)
            ]
            note = (
                ""
                if k == top_k
                else f"{k} of the {top_k} candidates asked for: the gallery has {k} coordinates"
            )
            out.append(Prediction(cands, dict(per_image), self.strategy, self.select, note))
        return out

    def _within(self, probs: torch.Tensor, index: torch.Tensor) -> dict[str, np.ndarray]:
        """{"25km": (B, k), ...}: the softmax mass of the gallery within each radius of each candidate."""
        # haversine: distance <= r  <=>  sin^2(dlat/2) + cos(lat1) cos(lat2) sin^2(dlon/2) <= sin^2(r / 2R)
        limits = torch.tensor(
            [np.sin(r / (2 * EARTH_RADIUS_KM)) ** 2 for r in self.radii_km], dtype=torch.float64
        )
        out = np.zeros((len(self.radii_km), *index.shape))
        for b, j in itertools.product(range(index.shape[0]), range(0, index.shape[1], WITHIN_ROWS)):
            rows = index[b, j : j + WITHIN_ROWS]  # a block of candidates: (rows, N) temporaries stay small
            a = (
                torch.sin((self._lat[None, :] - self._lat[rows, None]) / 2) ** 2
                + self._cos[rows, None] * self._cos[None, :] * torch.sin((self._lon[None, :] - self._lon[rows, None]) / 2) ** 2
            )  # (k, N)  # fmt: skip
            p = probs[b].to(a.dtype)
            for i, limit in enumerate(limits.tolist()):
                out[i, b, j : j + WITHIN_ROWS] = ((a <= limit) * p).sum(dim=1).cpu().numpy()
        return {f"{r:g}km": out[i].clip(0, 1) for i, r in enumerate(self.radii_km)}

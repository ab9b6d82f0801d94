"""Inference: photos in, ranked candidate locations out.

    geo = Geolocator.from_bundle("runs/demo/bundle")
    [pred] = geo.predict([PIL.Image.open("photo.jpg")], top_k=5, strategy="beam", select="consensus")
    pred.lat, pred.lon, pred.to_dict()

One call runs the whole method: backbone features -> aligned embeddings (`align/` heads) -> neighbours
from the gallery index -> the GeoToken encoder once -> cached beam search or sampling (optionally only
over cells of the gallery) -> a selector -> for each of the top-k candidates: coordinate, calibrated
probability of being within 200 km (and 25 / 750), its S2 cell (token and polygon), the nearest place
name, and the calibrated confidence of each token level.

`Geolocator.search(...)` is the array-level path (already-aligned embeddings and optional neighbour rows
in, candidate pools and selections out) that `geotoken evaluate` runs over whole test sets.

A bundle folder (`save_bundle` writes it, `bundle.json` last so a half-written bundle never loads):

    bundle.json        names everything below, relative to the folder, and the default search options
    backbone.json      the image backbone's config (`geotoken.encoders.load_backbone(**config)`)
    align/             `geotoken.align.AlignHeads`
    gallery/           feature store of the gallery's aligned embeddings + coords.npy + tokens.npy
    gallery/index/     `geotoken.retrieval.NeighbourIndex` over the query modalities of the gallery
    model/             `geotoken.model.GeoToken`
    calibration.json   optional `geotoken.calibration.Calibration`
    reward/            optional `geotoken.select.reward.RewardScorer`
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from geotoken.errors import GeoTokenError
from geotoken.io import read_json, write_json
from geotoken.select import Candidates, Selection
from geotoken.select.mllm import MLLMConfig

BUNDLE_FORMAT = "geotoken.bundle"
BUNDLE_VERSION = 1


@dataclass
class SearchOptions:
    """How to decode and select. Defaults: beam 5, gallery-constrained, most likely candidate."""

    strategy: str = "beam"  # one of geotoken.select.STRATEGIES
    width: int = 5  # beam width
    samples: int = 10  # samples per image
    retrieved: int = 5  # sample+retrieval: neighbours' cells added to the pool
    temperature: float = 1.0
    sample_top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int = 0
    constrain: bool = True  # only cells that occur in the gallery
    select: str = "logp"  # logp | consensus | reward | mllm
    radius_km: float = 200.0  # consensus radius
    medoid: bool = False
    batch_size: int = 32
    dtype: str = "fp32"  # matmul precision of the model; "bf16" is ~2x faster on CPUs with AVX-512 BF16, GPUs
    mllm: MLLMConfig = field(default_factory=MLLMConfig)

    def replace(self, **changes) -> SearchOptions:
        """A copy with `changes` applied; None values are ignored; unknown names are an error."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise GeoTokenError(f"unknown search option(s) {unknown}; known: {sorted(names)}")
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["mllm"] = {k: v for k, v in d["mllm"].items() if k != "api_key"}  # never write secrets
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SearchOptions:
        d = dict(d)
        mllm = MLLMConfig(**d.pop("mllm", {}))
        return cls().replace(**d, mllm=mllm)


@dataclass
class Prediction:
    """The answer for one image: `candidates` best first (dicts, see `Geolocator.predict`), timings in ms."""

    candidates: list[dict]
    timings_ms: dict[str, float]
    strategy: str
    select: str
    note: str = ""  # e.g. why the MLLM selector fell back

    @property
    def lat(self) -> float:
        return self.candidates[0]["lat"]

    @property
    def lon(self) -> float:
        return self.candidates[0]["lon"]

    def to_dict(self) -> dict:
        return {
            "lat": self.lat,
            "lon": self.lon,
            "candidates": self.candidates,
            "strategy": self.strategy,
            "select": self.select,
            "note": self.note,
            "timings_ms": self.timings_ms,
        }


@dataclass
class SearchResult:
    """Array-level output for B images: the candidate pool, the selection, neighbour rows (B, k) or None."""

    pool: Candidates
    selection: Selection
    neighbours: np.ndarray | None
    timings_ms: dict[str, float]


class Geolocator:
    """The loaded method. Build with `from_bundle(dir)`, or from parts (tests, notebooks)."""

    def __init__(
        self,
        model,
        gallery: dict[str, np.ndarray],
        gallery_coords: np.ndarray,
        gallery_tokens: np.ndarray,
        index=None,
        query_modalities: list[str] | None = None,
        backbone=None,
        heads=None,
        calibration=None,
        reward=None,
        options: SearchOptions | None = None,
        probability_radius_km: float = 200.0,
        root: str | os.PathLike | None = None,
    ):
        from geotoken.decode import PrefixConstraint

        self.model = model.eval()
        self.gallery, self.gallery_tokens = gallery, np.asarray(gallery_tokens)
        self.gallery_coords = np.asarray(gallery_coords, dtype=np.float64)
        self.index, self.query_modalities = index, list(query_modalities or ["visual"])
        self.backbone, self.heads = backbone, heads
        self.calibration, self.reward = calibration, reward
        self.options = options or SearchOptions()
        self.probability_radius_km = probability_radius_km
        self.root = None if root is None else Path(root)
        cfg = model.cfg
        missing = [m for m in cfg.modalities if cfg.k and cfg.use_neighbour_embeddings and m not in gallery]
        if missing:
            raise GeoTokenError(f"gallery has no array(s) {missing} that the model reads for neighbours")
        wrong = {
            m: a.shape[1]
            for m, a in gallery.items()
            if m in cfg.modalities and a.shape[1] != cfg.modalities[m]
        }
        if wrong:
            raise GeoTokenError(
                f"gallery array dims {wrong} differ from the model's modalities {cfg.modalities}"
            )
        if self.gallery_tokens.shape != (len(self.gallery_coords), cfg.n_tokens):
            raise GeoTokenError(
                f"gallery tokens {self.gallery_tokens.shape} do not match {len(self.gallery_coords)} rows x "
                f"{cfg.n_tokens} tokens of the model"
            )
        self.constraint = PrefixConstraint(self.gallery_tokens, cfg.vocab_sizes)

    # ------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_bundle(cls, directory: str | os.PathLike, device: str = "cpu") -> Geolocator:
        """Load everything named by `directory/bundle.json`."""
        from geotoken.align import AlignHeads
        from geotoken.calibration import Calibration
        from geotoken.encoders import load_backbone
        from geotoken.features import FeatureStore
        from geotoken.model import GeoToken
        from geotoken.retrieval import NeighbourIndex

        root = Path(directory)
        spec = _read_bundle(root)
        model = GeoToken.load(root / spec["model"], device=device)
        store = FeatureStore.open(root / spec["gallery"])
        gallery = {m: store[m] for m in model.cfg.modalities if m in store}
        tokens = np.load(root / spec["gallery"] / "tokens.npy", mmap_mode="r")
        backbone = load_backbone(**read_json(root / spec["backbone"])).to(device)
        calibration = Calibration.load(root / spec["calibration"]) if spec.get("calibration") else None
        reward = None
        if spec.get("reward"):
            from geotoken.select.reward import RewardScorer

            reward = RewardScorer.load(root / spec["reward"], device=device)
        return cls(
            model,
            gallery,
            np.asarray(store.coords),
            np.asarray(tokens),
            index=NeighbourIndex.load(root / spec["index"]),
            query_modalities=spec["query_modalities"],
            backbone=backbone,
            heads=AlignHeads.load(root / spec["align"]).to(device).eval(),
            calibration=calibration,
            reward=reward,
            options=SearchOptions.from_dict(spec.get("search", {})),
            probability_radius_km=float(spec.get("probability_radius_km", 200.0)),
            root=root,
        )

    def info(self) -> dict:
        """What is loaded (for `geotoken serve` and logs)."""
        cfg = self.model.cfg
        return {
            "bundle": None if self.root is None else str(self.root),
            "backbone": None if self.backbone is None else self.backbone.config(),
            "model": cfg.to_dict(),
            "parameters": self.model.n_params(),
            "gallery_rows": len(self.gallery_coords),
            "gallery_cells": len(self.constraint.levels[-1]),
            "query_modalities": self.query_modalities,
            "calibrated": self.calibration is not None,
            "reward_scorer": self.reward is not None,
            "search": self.options.to_dict(),
        }

    # ------------------------------------------------------------------------------------------ arrays
    @property
    def device(self):
        return next(self.model.parameters()).device

    def embed(self, images: list) -> dict[str, np.ndarray]:
        """PIL images -> aligned embeddings {modality: float32 (B, D)}."""
        import torch

        if self.backbone is None or self.heads is None:
            raise GeoTokenError("this Geolocator has no backbone/align heads; use predict_embeddings")
        with torch.no_grad():
            x = torch.stack([self.backbone.preprocess(im.convert("RGB")) for im in images]).to(self.device)
            out = self.heads(self.backbone(x).float())
        return {m: v.float().cpu().numpy() for m, v in out.items()}

    def neighbours(self, embeddings: dict[str, np.ndarray]) -> np.ndarray:
        """(B, k) gallery rows of the nearest neighbours (hits 0..k-1: queries are not in the gallery)."""
        k = self.model.cfg.k
        if self.index is None:
            raise GeoTokenError("this Geolocator has no gallery index; pass neighbour rows explicitly")
        from geotoken.retrieval import join_embeddings

        # the same construction as the gallery vectors the index holds (StoreEmbeddings)
        rows, _ = self.index.search(join_embeddings([embeddings[m] for m in self.query_modalities]), k)
        return np.asarray(rows, dtype=np.int64)

    def _batch(self, embeddings: dict[str, np.ndarray], rows: np.ndarray | None):
        import torch

        from geotoken.features.store import read_rows
        from geotoken.model import Batch

        cfg, dev = self.model.cfg, self.device
        query = {
            m: torch.as_tensor(np.asarray(embeddings[m], dtype=np.float32), device=dev)
            for m in cfg.modalities
        }
        if not cfg.k:
            return Batch(query)
        B, k = rows.shape[0], cfg.k
        if rows.shape[1] < k or rows.min() < 0 or rows.max() >= len(self.gallery_coords):
            raise GeoTokenError(f"neighbour rows must be (B, >={k}) in 0..{len(self.gallery_coords) - 1}")
        flat = rows[:, :k].reshape(-1)
        nbr = {}
        if cfg.use_neighbour_embeddings:
            nbr = {
                m: torch.as_tensor(read_rows(self.gallery[m], flat), device=dev).view(B, k, -1)
                for m in cfg.modalities
            }
        tokens = torch.as_tensor(self.gallery_tokens[flat], dtype=torch.long, device=dev).view(B, k, -1)
        return Batch(query, nbr, tokens)

    def search(
        self,
        embeddings: dict[str, np.ndarray],
        neighbours: np.ndarray | None = None,
        images: list | None = None,
        progress: bool = False,
        **options,
    ) -> SearchResult:
        """Decode and select for B images given aligned embeddings {m: (B, D)}, in batches of `batch_size`.

        neighbours: (B, >=k) gallery rows, or None to search the index. images: only for `select="mllm"`.
        options: any `SearchOptions` field (strategy, width, samples, select, radius_km, ...).
        """
        import torch
        from tqdm import tqdm

        from geotoken.decode import generate
        from geotoken.select import select

        opt = self.options.replace(**options)
        B = len(next(iter(embeddings.values())))
        if neighbours is None and self.model.cfg.k:
            t0 = time.perf_counter()
            neighbours = self.neighbours(embeddings)
            t_retrieve = time.perf_counter() - t0
        else:
            t_retrieve = 0.0
        pools, selections, t_decode, t_select = [], [], 0.0, 0.0
        starts = range(0, B, opt.batch_size)
        for s in tqdm(starts, desc="search", unit="batch", disable=not progress or len(starts) < 2):
            part = slice(s, s + opt.batch_size)
            batch = self._batch(
                {m: v[part] for m, v in embeddings.items()}, None if neighbours is None else neighbours[part]
            )
            t0 = time.perf_counter()
            with torch.no_grad():
                pool, memory = generate(
                    self.model,
                    batch,
                    opt.strategy,
                    width=opt.width,
                    n=opt.samples,
                    temperature=opt.temperature,
                    top_k=opt.sample_top_k,
                    top_p=opt.top_p,
                    seed=opt.seed + s,
                    constraint=self.constraint if opt.constrain else None,
                    dtype=opt.dtype,
                    retrieved=opt.retrieved,
                )
            t1 = time.perf_counter()
            selections.append(
                select(pool, opt.select, **self._select_args(opt, memory, part, images, neighbours))
            )
            t_decode, t_select = t_decode + t1 - t0, t_select + time.perf_counter() - t1
            pools.append(pool)
        return SearchResult(
            pool=_concat_pools(pools),
            selection=_concat_selections(selections),
            neighbours=neighbours,
            timings_ms={"retrieve": 1e3 * t_retrieve, "decode": 1e3 * t_decode, "select": 1e3 * t_select},
        )

    def _select_args(self, opt: SearchOptions, memory, part: slice, images, neighbours) -> dict:
        if opt.select == "consensus":
            return {"radius_km": opt.radius_km, "medoid": opt.medoid}
        if opt.select == "reward":
            if self.reward is None:
                raise GeoTokenError(
                    "select='reward' needs a reward scorer in the bundle (geotoken train-reward)"
                )
            return {"scorer": self.reward, "memory": memory}
        if opt.select == "mllm":
            if images is None:
                raise GeoTokenError("select='mllm' needs the images")
            nbr = None if neighbours is None else self.gallery_coords[neighbours[part]]  # (b, k, 2)
            return {"images": images[part], "config": opt.mllm, "neighbours_latlon": nbr}
        return {}

    # ------------------------------------------------------------------------------------------ predictions
    def predict(
        self, images: list, top_k: int = 5, strategy: str | None = None, select: str | None = None, **options
    ) -> list[Prediction]:
        """PIL images -> one `Prediction` per image, candidates best first.

        Each candidate: lat, lon, probability (calibrated P(true location within `probability_radius_km`)),
        within {"25km", "200km", "750km"}, logp (model log-probability of the cell), cell (S2 token), level,
        polygon [[lat, lon] x 4], place {city, region, country, country_code, distance_km},
        level_confidence (calibrated probability of the prefix up to each token level).
        """
        t0 = time.perf_counter()
        embeddings = self.embed(images)
        t_embed = time.perf_counter() - t0
        return self.predict_embeddings(
            embeddings,
            None,
            top_k,
            strategy,
            select,
            images=images,
            extra_ms={"embed": 1e3 * t_embed},
            **options,
        )

    def predict_embeddings(
        self,
        embeddings: dict[str, np.ndarray],
        neighbours: np.ndarray | None = None,
        top_k: int = 5,
        strategy: str | None = None,
        select: str | None = None,
        images: list | None = None,
        extra_ms: dict | None = None,
        **options,
    ) -> list[Prediction]:
        """Like `predict`, from aligned embeddings {m: (B, D)} and optional neighbour rows (B, k)."""
        if top_k < 1:
            raise GeoTokenError(f"top_k must be >= 1, got {top_k}")
        res = self.search(embeddings, neighbours, images, strategy=strategy, select=select, **options)
        opt = self.options.replace(strategy=strategy, select=select)
        t1 = time.perf_counter()
        preds = self._describe(res, top_k, opt)
        timings = {**(extra_ms or {}), **res.timings_ms, "describe": 1e3 * (time.perf_counter() - t1)}
        timings["total"] = sum(timings.values())
        B = len(preds)
        for p in preds:  # per image: the batch's time shared equally
            p.timings_ms = {k: round(v / B, 3) for k, v in timings.items()}
        return preds

    def _describe(self, res: SearchResult, top_k: int, opt: SearchOptions) -> list[Prediction]:
        """Top-k candidates per image with cells, places and calibrated confidences (vectorized over all)."""
        from geotoken import s2
        from geotoken.calibration import Calibration
        from geotoken.places import place_names

        pool, sel = res.pool, res.selection
        B, N = pool.shape
        cfg = self.model.cfg
        order = np.argsort(-sel.scores, axis=1, kind="stable")  # (B, N), duplicates (-inf) last
        finite = np.take_along_axis(np.isfinite(sel.scores) & np.isfinite(pool.logp), order, axis=1)
        free = sel.index < 0  # MLLM free answers go first, outside the pool
        M = min(top_k, N)
        top = pool.take(order[:, :M])  # (B, M)
        keep = finite[:, :M]
        lat, lon = top.lat.copy(), top.lon.copy()
        # the coordinate listed first is the selection's, even when it came from outside the pool
        if free.any():
            lat, lon = np.concatenate([sel.lat[:, None], lat], 1), np.concatenate([sel.lon[:, None], lon], 1)
            keep = np.concatenate([free[:, None], keep], 1)
        cal = self.calibration or Calibration()
        g = cfg.group
        within = {f"{r:g}km": self._within(cal, pool, lat, lon, r, g) for r in cal.radii_km}
        prob_name = f"{self.probability_radius_km:g}km"
        if prob_name not in within:
            within[prob_name] = self._within(cal, pool, lat, lon, self.probability_radius_km, g)
        levels = cal.level_probs(top.level_probs)  # (B, M, T)
        ids = s2.latlon_to_cell_ids(lat.ravel(), lon.ravel(), cfg.level)
        hexes = np.asarray(s2.cell_ids_to_hex(ids)).reshape(lat.shape)
        polys = np.asarray(s2.cell_vertices(ids)).reshape(*lat.shape, 4, 2)
        places = np.array(place_names(lat.ravel(), lon.ravel()), dtype=object).reshape(lat.shape)
        offset = lat.shape[1] - M  # 1 when a free answer was prepended
        out = []
        for b in range(B):
            cands = []
            for j in np.flatnonzero(keep[b]):
                in_pool = j >= offset
                c = {
                    "lat": float(lat[b, j]),
                    "lon": float(lon[b, j]),
                    "probability": float(within[prob_name][b, j]),
                    "probability_within_km": self.probability_radius_km,
                    "within": {name: float(v[b, j]) for name, v in within.items()},
                    "logp": float(top.logp[b, j - offset]) if in_pool else None,
                    "cell": str(hexes[b, j]),
                    "level": cfg.level,
                    "polygon": polys[b, j].round(6).tolist(),
                    "place": places[b, j],
                    "level_confidence": levels[b, j - offset].round(6).tolist() if in_pool else None,
                    "source": "pool" if in_pool else "mllm",
                }
                cands.append(c)
            out.append(Prediction(cands[:top_k], {}, opt.strategy, opt.select, sel.notes[b]))
        return out

    @staticmethod
    def _within(
        cal, pool: Candidates, lat: np.ndarray, lon: np.ndarray, radius_km: float, group: int
    ) -> np.ndarray:
        """(B, M) calibrated P(within radius) of each listed coordinate, from the pool's mass around it."""
        from geotoken.calibration import apply_temperature, within_confidence

        temps = dict(zip(cal.radii_km, cal.within))
        cols = [within_confidence(pool, lat[:, j], lon[:, j], radius_km, group) for j in range(lat.shape[1])]
        return apply_temperature(np.stack(cols, axis=1), temps.get(radius_km, 1.0))


def _concat_pools(pools: list[Candidates]) -> Candidates:
    if len(pools) == 1:
        return pools[0]
    fields = ("tokens", "logp", "lat", "lon", "level_probs")
    return Candidates(*(np.concatenate([getattr(p, f) for p in pools], axis=0) for f in fields))


def _concat_selections(sels: list[Selection]) -> Selection:
    if len(sels) == 1:
        return sels[0]
    cat = lambda name: np.concatenate([getattr(s, name) for s in sels], axis=0)  # noqa: E731
    return Selection(cat("index"), cat("lat"), cat("lon"), cat("scores"), [n for s in sels for n in s.notes])


# ---------------------------------------------------------------------------------------------- bundles
def _read_bundle(root: Path) -> dict:
    path = root / "bundle.json"
    if not path.is_file():
        raise GeoTokenError(f"{root}: not a model bundle (no bundle.json); `geotoken demo` writes one")
    spec = read_json(path)
    if spec.get("format") != BUNDLE_FORMAT:
        raise GeoTokenError(f"{path}: field 'format' is {spec.get('format')!r}, expected {BUNDLE_FORMAT!r}")
    for key in ("backbone", "align", "gallery", "index", "model", "query_modalities"):
        if key not in spec:
            raise GeoTokenError(f"{path}: missing field {key!r}")
    for key in ("backbone", "align", "gallery", "index", "model", "calibration", "reward"):
        if spec.get(key) and not (root / spec[key]).exists():
            raise GeoTokenError(f"{path}: field {key!r} names {spec[key]!r}, which does not exist in {root}")
    return spec


def save_bundle(
    directory: str | os.PathLike,
    *,
    model,
    backbone_config: dict[str, Any],
    heads,
    gallery_store,
    index,
    query_modalities: list[str],
    calibration=None,
    reward=None,
    options: SearchOptions | None = None,
    chunk_rows: int = 65536,
) -> Path:
    """Write a self-contained bundle that `Geolocator.from_bundle` loads.

    gallery_store: a `geotoken.features.FeatureStore` with the gallery's aligned arrays (those the model
    reads are copied) and coordinates; its tokens are computed here at the model's level and group.
    index: a `NeighbourIndex` over `query_modalities` of that gallery (concatenated in this order).
    """
    from geotoken.features import FeatureStore
    from geotoken.s2 import latlon_to_tokens

    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    (root / "bundle.json").unlink(missing_ok=True)  # the folder is not a bundle until it is complete
    cfg = model.cfg
    names = [m for m in cfg.modalities if m in gallery_store]
    missing = sorted(set(cfg.modalities) - set(names))
    if missing and cfg.k and cfg.use_neighbour_embeddings:
        raise GeoTokenError(f"{gallery_store.root}: no aligned array(s) {missing} for the model's neighbours")
    coords = np.asarray(gallery_store.coords, dtype=np.float64)
    gallery = FeatureStore.create(
        root / "gallery",
        gallery_store.ids,
        coords,
        {m: gallery_store.dims[m] for m in names},
        source=str(gallery_store.root),
    )
    for m in names:
        src = gallery_store[m]
        with gallery.writer(m) as w:
            for s in range(0, len(src), chunk_rows):
                w.write(s, np.asarray(src[s : s + chunk_rows]))
        gallery.mark_complete(m)
    tokens = latlon_to_tokens(coords[:, 0], coords[:, 1], cfg.level, cfg.group)
    np.save(root / "gallery" / "tokens.npy", tokens)
    index.save(root / "gallery" / "index")
    heads.save(root / "align")
    model.save(root / "model")
    write_json(root / "backbone.json", backbone_config)
    spec = {
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        "backbone": "backbone.json",
        "align": "align",
        "gallery": "gallery",
        "index": "gallery/index",
        "model": "model",
        "query_modalities": list(query_modalities),
        "calibration": None,
        "reward": None,
        "probability_radius_km": 200.0,
        "search": (options or SearchOptions()).to_dict(),
    }
    if calibration is not None:
        calibration.save(root / "calibration.json")
        spec["calibration"] = "calibration.json"
    if reward is not None:
        reward.save(root / "reward")
        spec["reward"] = "reward"
    write_json(root / "bundle.json", spec)
    return root


def random_bundle(directory: str | os.PathLike, gallery_rows: int = 256, k: int = 5, seed: int = 0) -> Path:
    """An untrained bundle built from the real components (EfficientNet-Lite0 backbone, align heads, FAISS
    index, a `tiny` model) over real MP16 coordinates and random gallery features. Its answers mean
    nothing; it exists so tests and the server can run the whole inference path in seconds."""
    import torch

    from geotoken import assets
    from geotoken.align import AlignHeads, HeadsConfig
    from geotoken.features import FeatureStore
    from geotoken.model import GeoToken, preset
    from geotoken.retrieval import NeighbourIndex

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    coords = np.loadtxt(assets.mp16_coordinates_csv(), delimiter=",", skiprows=1, max_rows=20000)
    coords = coords[np.sort(rng.choice(len(coords), gallery_rows, replace=False))]
    backbone_config = {"name": "efficientnet-lite0", "image_size": 224}
    dims = {"visual": 32, "gps": 32, "text": 32}
    heads = AlignHeads(
        HeadsConfig(in_dim=1280, visual_dim=32, gps_dim=32, text_dim=32, hidden=64, backbone=backbone_config)
    ).eval()
    features = rng.standard_normal((gallery_rows, 1280)).astype(np.float32)  # (no PCA fit: identity slice)
    with torch.no_grad():
        aligned = {m: v.numpy() for m, v in heads(torch.from_numpy(features)).items()}
    with tempfile.TemporaryDirectory() as tmp:
        store = FeatureStore.create(
            Path(tmp) / "gallery", [f"g{i}" for i in range(gallery_rows)], coords, dims
        )
        for m in dims:
            with store.writer(m) as w:
                w.write(0, aligned[m])
            store.mark_complete(m)
        model = GeoToken(preset("tiny", modalities=dims, k=k)).eval()
        index = NeighbourIndex.build(aligned["visual"], "flat", progress=False, meta={"embedding": "visual"})
        return save_bundle(
            directory,
            model=model,
            backbone_config=backbone_config,
            heads=heads,
            gallery_store=store,
            index=index,
            query_modalities=["visual"],
        )


def set_bundle_part(directory: str | os.PathLike, key: str, relative_path: str | None) -> None:
    """Point bundle.json's `key` (e.g. "reward", "calibration") at a file or folder inside the bundle."""
    root = Path(directory)
    spec = _read_bundle(root)
    if relative_path is not None and not (root / relative_path).exists():
        raise GeoTokenError(f"{root / relative_path} does not exist")
    spec[key] = relative_path
    write_json(root / "bundle.json", spec)


def load_queries(
    store_dir: str | os.PathLike, modalities: list[str], neighbours_dir: str | os.PathLike | None = None
) -> tuple[dict[str, np.ndarray], np.ndarray | None, np.ndarray, np.ndarray]:
    """Aligned query embeddings {m: (N, D)} (memmaps), neighbour rows (N, k) or None, true lat, lon (N,).

    Rows the store skipped (unreadable images) are left out of all four.
    """
    from geotoken.features import FeatureStore
    from geotoken.retrieval import NeighbourTable

    store = FeatureStore.open(store_dir)
    missing = [m for m in modalities if m not in store]
    if missing:
        raise GeoTokenError(f"{store_dir}: no finished aligned array(s) {missing}; run the alignment first")
    keep = np.flatnonzero(store.valid)
    everything = len(keep) == store.rows
    emb = {m: store[m] if everything else np.asarray(store[m][keep]) for m in modalities}
    coords = np.asarray(store.coords)[keep]
    rows = None
    if neighbours_dir is not None:
        table = NeighbourTable.open(neighbours_dir)
        if table.rows.shape[0] != store.rows:
            raise GeoTokenError(
                f"{neighbours_dir}: {table.rows.shape[0]} rows of neighbours for {store.rows} rows of {store_dir}"
            )
        rows = np.asarray(table.rows[keep])
    return emb, rows, coords[:, 0].copy(), coords[:, 1].copy()

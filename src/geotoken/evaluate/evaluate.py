"""`geotoken evaluate` as a library: run methods on a gallery/query pair, score them, write the outputs.

Outputs in OUT_DIR, each written atomically:
    metrics.json      per method: accuracy within each threshold, median / mean error, 95% CIs (Wilson / bootstrap);
                      paired comparisons against the reference method; configs, timings, input hashes
    metrics.md        the same tables in Markdown (like the paper's Table I, plus intervals)
    predictions.csv   id, lat, lon, pred_lat, pred_lon, error_km, method, strategy (one row per image and method)
    error_cdf.png     error CDF of every method (log-km axis, thresholds marked)
    map_<method>.png  predictions vs truth on the Blue Marble image
    cache/            each method's predictions keyed by a hash of its config and inputs: a rerun skips
                      finished methods, so an interrupted evaluation resumes where it stopped
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from geotoken.data.manifest import read_manifest
from geotoken.encoders.gps import GPSEncoder
from geotoken.errors import GeoTokenError
from geotoken.evaluate.baselines import (
    Ceiling,
    CellClassifier,
    CellsConfig,
    GeoCLIP,
    GeoCLIPConfig,
    GPSGallery,
    GPSGalleryConfig,
    NearestNeighbour,
    Prior,
    PriorConfig,
    RetrievalConfig,
    Split,
    check_geoclip_features,
)
from geotoken.evaluate.geotoken_method import GALLERY_SUFFIX, calibration_from_arrays, row_label, run_geotoken
from geotoken.evaluate.metrics import (
    INTERVALS,
    PairedComparison,
    bootstrap_metrics,
    metrics_markdown,
    paired_comparison,
)
from geotoken.evaluate.plots import plot_error_cdf, plot_world_map
from geotoken.evaluate.runs import MethodRun, load_cached, save_cached, slug
from geotoken.features import FeatureStore
from geotoken.geo import THRESHOLDS_KM, haversine_km
from geotoken.io import atomic_open, is_whole, read_json, sha256_json, write_json
from geotoken.retrieval.neighbours import NeighbourTable, check_neighbours, check_rows

BASELINES = ("prior", "nn", "knn", "cells", "gps-gallery")
# geoclip: GeoCLIP's pretrained model on CLIP query stores; ceiling: the nearest gallery coordinate to the
# true place (an oracle bound, not a method)
METHODS = (*BASELINES, "ceiling", "geoclip", "geotoken")


# ---------------------------------------------------------------------------------------------- inputs


def load_split(store_dir: str | Path, manifest: str | Path | None = None, name: str = "split") -> Split:
    """A feature store folder (ids, coords and arrays) as a `Split`; rows skipped at embedding time are dropped.

    `manifest` (optional) supplies the true coordinates instead of the store's copy; its ids must be the
    store's ids in the same order. A model bundle folder (bundle.json) stands for its gallery store.
    """
    if (Path(store_dir) / "bundle.json").is_file():
        store_dir = Path(store_dir) / read_json(Path(store_dir) / "bundle.json").get("gallery", "gallery")
    store = FeatureStore.open(store_dir)
    ids = np.asarray(store.ids, dtype=str)
    coords = np.asarray(store.coords, dtype=np.float64)
    images = None
    if manifest is not None:
        m = read_manifest(manifest)
        if len(m) != len(ids):
            raise GeoTokenError(
                f"{manifest}: {len(m)} rows, but the feature store {store_dir} has {len(ids)}"
            )
        diff = np.flatnonzero(np.asarray(m.ids, dtype=str) != ids)
        if diff.size:
            i = diff[0]
            raise GeoTokenError(
                f"{manifest}: row {i + 1} has id {m.ids[i]!r}, the feature store {store_dir} has {ids[i]!r}"
            )
        coords, images = np.stack([m.lat, m.lon], axis=1), np.asarray(m.images, dtype=str)
    arrays: dict[str, np.ndarray] = {key: store[key] for key in store}
    valid = store.valid
    if not valid.all():  # skipped images have NaN features: evaluate the rest, say so in metrics.json
        rows = np.flatnonzero(valid)
        arrays = {key: a[rows] for key, a in arrays.items()}
        ids, coords = ids[rows], coords[rows]
        images = None if images is None else images[rows]
    return Split(ids, coords[:, 0], coords[:, 1], arrays, f"{name} ({store_dir})", images,
                 int((~valid).sum()), store.header.get("backbone"), store)  # fmt: skip


def load_neighbours(folder: str | Path, gallery: Split, queries: Split) -> tuple[np.ndarray, np.ndarray]:
    """The (rows, sims) memmaps of a neighbour table of `queries` in `gallery` (`geotoken index neighbours`),
    checked against both splits: computed for their stores, one row per query, every entry a gallery row."""
    table = NeighbourTable.open(folder)
    if queries.store is not None:
        check_neighbours(table, queries.store, gallery.store)
    if not (queries.skipped or gallery.skipped):
        table.check(len(queries), len(gallery))
        return table.rows, table.sims
    if queries.store is None or gallery.store is None:  # the skipped rows cannot be told apart
        raise GeoTokenError(f"{folder}: a neighbour table needs the stores of splits with skipped rows")
    table.check(queries.store.rows)  # numbered as the stores, skipped rows included
    rows, sims = compact_neighbours(table.rows, table.sims, queries.store.valid, gallery.store.valid)
    check_rows(rows, len(queries), len(gallery), table.root)  # every kept query's neighbours are in the split
    return rows, sims


def compact_neighbours(rows, sims, query_valid: np.ndarray, gallery_valid: np.ndarray):
    """A neighbour table for the splits as the evaluation loads them, without their skipped (unreadable)
    images: the skipped queries' rows dropped, gallery row numbers shifted past the skipped gallery rows
    (which no table points to: the index holds valid rows only)."""
    if query_valid.all() and gallery_valid.all():
        return rows, sims
    remap = np.cumsum(gallery_valid) - 1
    rows = np.asarray(rows)[query_valid]
    return np.where(rows >= 0, remap[np.maximum(rows, 0)], -1), np.asarray(sims)[query_valid]


@dataclass
class GeoTokenMethodConfig:
    """How the project's model is run: a model bundle and every strategy x selector to evaluate."""

    model: str | None = None
    strategies: tuple[str, ...] = ("greedy",)
    selectors: tuple[str, ...] = ("logp",)
    num_samples: int = 10
    beam_width: int = 5
    retrieved: int = 5  # sample+retrieval: neighbours' cells pooled with the samples
    temperature: float = 1.0  # sampling temperature (or "paper": the authors' 0.7)
    logp_kind: str = "t1"  # logp rows rank by the model's own log-probability, or "scaled" (the authors')
    batch_size: int = 64
    dtype: str = "fp32"  # model precision (bf16: autocast)
    # decodings of every strategy's rows: True = gallery-prefix constrained (every answer the cell of a
    # gallery photo; labels end in "+gallery"), False = free (the paper's authors' decoding)
    constrain: tuple[bool, ...] = (True,)
    free_strategies: tuple[str, ...] = ()  # strategies also decoded free, beside `constrain`'s rows
    device: str = "auto"  # where the bundle runs (not in the cache key: the answers are the same)
    mllm: dict = field(default_factory=dict)  # select=mllm: MLLMConfig fields over the bundle's (mode "free")


@dataclass
class EvalConfig:
    methods: tuple[str, ...] = BASELINES
    thresholds: tuple[float, ...] = tuple(THRESHOLDS_KM)
    n_boot: int = 1000
    seed: int = 0
    level: float = 0.95
    reference: str | None = None  # paired comparisons are every other method minus this one (default: first)
    limit: int | None = None  # evaluate only the first N queries
    plots: bool = True
    prior: PriorConfig = field(default_factory=PriorConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    cells: CellsConfig = field(default_factory=CellsConfig)
    gps_gallery: GPSGalleryConfig = field(default_factory=GPSGalleryConfig)
    geoclip: GeoCLIPConfig = field(default_factory=GeoCLIPConfig)
    geotoken: GeoTokenMethodConfig = field(default_factory=GeoTokenMethodConfig)

    def __post_init__(self) -> None:
        if isinstance(self.methods, str):  # "nn" would be read as the methods 'n', 'n'
            raise GeoTokenError(f"evaluation: methods is a tuple of names, e.g. ({self.methods!r},)")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise GeoTokenError(f"evaluation: unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
        if not 0 < self.level < 1:
            raise GeoTokenError(f"evaluation: level is a confidence in (0, 1), e.g. 0.95, got {self.level!r}")
        g = self.geotoken
        counts = {
            "n_boot": self.n_boot,
            "retrieval.k": self.retrieval.k,
            "cells.epochs": self.cells.epochs,
            "geotoken.num_samples": g.num_samples,
            "geotoken.beam_width": g.beam_width,
            "geotoken.retrieved": g.retrieved,
            "limit": 1 if self.limit is None else self.limit,
        }
        for name, value in counts.items():
            if not is_whole(value, 1):  # (10.5 resamples would fail after every method has run)
                raise GeoTokenError(f"evaluation: {name} must be a whole number >= 1, got {value!r}")
        bad = [t for t in self.thresholds if not (math.isfinite(t) and t > 0)]
        if not self.thresholds or bad:  # NaN or inf would end up in metrics.json
            raise GeoTokenError(
                f"evaluation: thresholds must be finite numbers of km > 0, got {list(self.thresholds)}"
            )
        if len({float(t) for t in self.thresholds}) < len(self.thresholds):  # one column would hide the other
            raise GeoTokenError(f"evaluation: thresholds repeat a distance: {list(self.thresholds)}")


@dataclass
class EvalResult:
    runs: dict[str, MethodRun]
    pairs: list[PairedComparison]
    out_dir: Path
    files: list[Path]


# ---------------------------------------------------------------------------------------------- methods


def _strategy_text(method: str, cfg: EvalConfig, table: bool = False) -> str:
    r = cfg.retrieval
    on = "a given neighbour table" if table else f"cosine on {r.embedding}"
    return {
        "prior": f"densest S2 level-{cfg.prior.level} cell",
        "nn": f"1-NN, {on}",
        "knn": f"{r.k}-NN vote, {on}, R={r.radius_km:g} km, T={r.temperature:g}, {r.answer}",
        "cells": f"{'MLP' if cfg.cells.hidden else 'linear'} head on {cfg.cells.features}, "
        f"cells max {cfg.cells.max_count} / min {cfg.cells.min_count}",
        "gps-gallery": f"{cfg.gps_gallery.embedding} vs GPS encoder on {cfg.gps_gallery.gallery} gallery",
        "geoclip": f"GeoCLIP's pretrained head on CLIP {cfg.geoclip.features}, softmax over its MP16 gallery",
        "ceiling": "oracle: the gallery coordinate nearest to the true place",
    }[method]


def _method_config(method: str, cfg: EvalConfig, table: bool = False) -> dict:
    part = {"prior": cfg.prior, "nn": cfg.retrieval, "knn": cfg.retrieval, "cells": cfg.cells,
            "gps-gallery": cfg.gps_gallery, "geoclip": cfg.geoclip}.get(method)  # fmt: skip
    conf = {} if part is None else asdict(part)
    if table and method in ("nn", "knn"):  # the table's own search decides what is compared
        conf["embedding"] = "neighbour table"
    return conf


def build_baseline(method: str, cfg: EvalConfig, neighbours=None, gps_encoder=None, progress: bool = False):
    """A fit/predict object for one baseline name."""
    if method == "prior":
        return Prior(cfg.prior)
    if method in ("nn", "knn"):
        return NearestNeighbour(cfg.retrieval, vote=method == "knn", neighbours=neighbours)
    if method == "cells":
        return CellClassifier(cfg.cells, progress=progress)
    if method == "gps-gallery":
        return GPSGallery(cfg.gps_gallery, encoder=gps_encoder)
    if method == "geoclip":
        return GeoCLIP(cfg.geoclip)
    if method == "ceiling":
        return Ceiling()
    raise GeoTokenError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def check_splits(
    gallery: Split, queries: Split, cfg: EvalConfig, table: int | None = None, gps_encoder=None
) -> None:
    """Raise, naming both stores, if the queries' aligned arrays come from other alignment heads than the
    gallery's, or an array a method compares across them has other widths on the two sides (stores of
    different backbones), or knn's k is deeper than the neighbour table (`table`: its columns; None: no
    table): before any method runs, not in torch."""
    if table is not None and "knn" in cfg.methods and cfg.retrieval.k > table:
        raise GeoTokenError(
            f"knn: k {cfg.retrieval.k} but the neighbour table holds {table} neighbours per query: pass -k "
            f"{table} or less, or write a deeper table (geotoken index neighbours -k {cfg.retrieval.k})"
        )
    if gallery.store is not None and queries.store is not None:
        queries.store.check_heads(gallery.store.heads, f"the gallery {gallery.store.root}'s")
    name, gps_dim = (
        cfg.gps_gallery.embedding,
        getattr(gps_encoder, "dim", None) if gps_encoder else GPSEncoder.dim,
    )
    have = queries.arrays[name].shape[1:] if name in queries.arrays else None
    if "gps-gallery" in cfg.methods and gps_dim and have is not None and have != (gps_dim,):
        raise GeoTokenError(
            f"gps-gallery: {queries.name}'s {name!r} embeddings are {have}, the GPS encoder gives {gps_dim}-d: "
            "they are not in its location space (leave gps-gallery out)"
        )
    keys = {cfg.cells.features} if "cells" in cfg.methods else set()
    if table is None and {"nn", "knn"} & set(cfg.methods):
        keys.update(cfg.retrieval.embedding.split("+"))
    for key in sorted(keys):
        if key in gallery.arrays and key in queries.arrays:
            dg, dq = gallery.arrays[key].shape[1:], queries.arrays[key].shape[1:]
            if dg != dq:
                raise GeoTokenError(
                    f"array {key!r} is {dg[0] if dg else 1}-d in {gallery.name} but {dq[0] if dq else 1}-d in "
                    f"{queries.name}: embed both with the same backbone and alignment heads"
                )


def _inputs_hash(gallery: Split, queries: Split, neighbours=None, chunk_rows: int = 16384) -> str:
    """Identity of the evaluation inputs for the prediction cache: ids, coordinates and every array's
    bytes on both sides (re-embedding with another backbone must not reuse old predictions)."""
    h = hashlib.sha256()
    for s in (gallery, queries):
        h.update("\n".join(s.ids.tolist()).encode())
        h.update(np.ascontiguousarray(np.stack([s.lat, s.lon], 1), dtype="<f8").tobytes())
        for key in sorted(s.arrays):
            a = s.arrays[key]
            h.update(f"{key}:{a.shape}:{a.dtype}".encode())
            for start in range(0, len(a), chunk_rows):  # memmaps are read in chunks, never copied whole
                h.update(np.ascontiguousarray(a[start : start + chunk_rows]).tobytes())
    for a in neighbours or ():
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- driver


def run_methods(
    gallery: Split,
    queries: Split,
    cfg: EvalConfig,
    out_dir: str | Path | None = None,
    neighbours=None,
    gps_encoder=None,
    progress: bool = True,
    log=print,
    geolocator=None,
    inputs: str | None = None,
    cache_dir: str | Path | None = None,
) -> dict[str, MethodRun]:
    """Fit every method on the gallery and predict the queries; reuse cached predictions in `cache_dir`
    (default OUT/cache), keyed by each method's config and a hash of the inputs."""
    inputs = inputs or _inputs_hash(gallery, queries, neighbours)
    if cache_dir is None and out_dir is not None:
        cache_dir = Path(out_dir) / "cache"
    cache = None if cache_dir is None else Path(cache_dir)
    runs: dict[str, MethodRun] = {}
    for method in cfg.methods:
        if method not in METHODS:
            raise GeoTokenError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
        if method == "geotoken":
            for run in run_geotoken(gallery, queries, cfg.geotoken, cache, inputs, log, geolocator):
                runs[run.label] = run
            continue
        conf = _method_config(method, cfg, neighbours is not None)
        key = sha256_json({"method": method, "config": conf, "inputs": inputs})[:16]
        path = cache / f"{slug(method)}.{key}.npz" if cache is not None else None
        pred = load_cached(path, len(queries)) if path is not None else None
        t0 = time.perf_counter()
        cached = pred is not None
        if pred is None:
            fit = (
                "GeoCLIP's own coordinate gallery" if method == "geoclip" else f"{len(gallery)} gallery rows"
            )
            log(f"{method}: fitting on {fit}, predicting {len(queries)} queries")
            model = build_baseline(method, cfg, neighbours, gps_encoder, progress).fit(gallery)
            pred = model.predict(queries)
            if path is not None:
                save_cached(path, pred)
        seconds = time.perf_counter() - t0
        errors = haversine_km(queries.lat, queries.lon, pred.lat, pred.lon)
        runs[method] = MethodRun(
            method,
            method,
            _strategy_text(method, cfg, neighbours is not None),
            conf,
            pred,
            errors,
            seconds=seconds,
            cached=cached,
        )
    return runs


def score_runs(runs: Mapping[str, MethodRun], cfg: EvalConfig) -> list[PairedComparison]:
    """Bootstrap metrics for each run, and paired comparisons: every run against the reference, then every
    other row of the model against its greedy row (the paper's question: do search and selection beat
    greedy decoding?)."""
    for run in runs.values():
        run.metrics = bootstrap_metrics(run.errors_km, cfg.thresholds, cfg.n_boot, cfg.seed, cfg.level)
    labels = list(runs)
    ref = cfg.reference or labels[0]
    if ref not in runs:
        raise GeoTokenError(f"reference method {ref!r} was not evaluated (evaluated: {', '.join(labels)})")
    pairs = [(lab, ref) for lab in labels if lab != ref]
    # each search row against the greedy row of its own decoding (gallery-constrained or free): a free row
    # against the constrained greedy would mix the effect of the search with that of the constraint
    greedy = {c: row_label("greedy", "logp", cfg.geotoken, constrain=c) for c in (True, False)}
    for lab in labels:
        own = greedy[lab.endswith(GALLERY_SUFFIX)]
        if lab == greedy[False]:  # free greedy (the authors' decoding) against the constrained one
            own = greedy[True]
        if runs[lab].method == "geotoken" and own in runs and lab not in (own, ref) and own != ref:
            pairs.append((lab, own))
    return [
        paired_comparison(
            runs[a].errors_km, runs[b].errors_km, (a, b), cfg.thresholds, cfg.n_boot, cfg.seed, cfg.level
        )
        for a, b in pairs
    ]


def write_predictions_csv(path: str | Path, queries: Split, runs: Mapping[str, MethodRun]) -> Path:
    """Long format: one row per (image, method), in query order within each method."""
    with atomic_open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "lat", "lon", "pred_lat", "pred_lon", "error_km", "method", "strategy"])
        for run in runs.values():
            for i in range(len(queries)):  # csv needs rows; formatting is the cost, not the loop
                w.writerow([queries.ids[i], f"{queries.lat[i]:.6f}", f"{queries.lon[i]:.6f}", f"{run.pred.lat[i]:.6f}",
                            f"{run.pred.lon[i]:.6f}", float(run.errors_km[i]), run.label, run.strategy])  # fmt: skip
    return Path(path)


def evaluate(
    gallery: Split,
    queries: Split,
    out_dir: str | Path,
    cfg: EvalConfig | None = None,
    neighbours=None,
    gps_encoder=None,
    progress: bool = True,
    log=print,
    geolocator=None,
    cache_dir: str | Path | None = None,
) -> EvalResult:
    """Run, score and write everything for one gallery/query pair (see the module docstring).

    geolocator: `cfg.geotoken.model` already loaded; cache_dir: where predictions are cached (default
    OUT/cache; one folder may serve several evaluations: the keys hash the config and the inputs)."""
    cfg = cfg or EvalConfig()
    if "geotoken" in cfg.methods and geolocator is None and not cfg.geotoken.model:
        raise GeoTokenError("--method geotoken needs --model BUNDLE (a folder with bundle.json)")
    out = Path(out_dir)
    if cfg.limit is not None:
        q, n = queries, cfg.limit
        queries = dataclasses.replace(q, ids=q.ids[:n], lat=q.lat[:n], lon=q.lon[:n],
                                      arrays={k: a[:n] for k, a in q.arrays.items()},
                                      images=None if q.images is None else q.images[:n])  # fmt: skip
        if neighbours is not None:
            neighbours = tuple(np.asarray(a)[: cfg.limit] for a in neighbours)
    if len(queries) == 0:
        raise GeoTokenError(f"{queries.name}: no queries to evaluate")
    if len(gallery) == 0:  # every baseline would fail inside numpy (argmax of an empty sequence)
        raise GeoTokenError(f"{gallery.name}: the gallery has no rows")
    if "geoclip" in cfg.methods:  # before any method runs
        check_geoclip_features(queries, cfg.geoclip)
    check_splits(
        gallery, queries, cfg, None if neighbours is None else np.shape(neighbours[0])[1], gps_encoder
    )
    inputs = _inputs_hash(gallery, queries, neighbours)
    runs = run_methods(
        gallery, queries, cfg, out, neighbours, gps_encoder, progress, log, geolocator, inputs, cache_dir
    )
    pairs = score_runs(runs, cfg)
    files = [write_predictions_csv(out / "predictions.csv", queries, runs)]
    report = {
        "gallery": {"name": gallery.name, "rows": len(gallery), "skipped": gallery.skipped},
        "queries": {"name": queries.name, "rows": len(queries), "skipped": queries.skipped},
        "inputs_sha256": inputs,
        "thresholds_km": list(cfg.thresholds),
        "bootstrap": {"n_boot": cfg.n_boot, "seed": cfg.seed, "level": cfg.level},
        "intervals": INTERVALS,
        "methods": {
            label: {
                "method": r.method,
                "strategy": r.strategy,
                "config": r.config,
                "seconds": round(r.seconds, 3),
                "cached": r.cached,
                **r.metrics.to_dict(),
            }  # fmt: skip
            for label, r in runs.items()
        },
        "paired": [p.to_dict() for p in pairs],
    }
    for label, r in runs.items():  # the model's confidences: expected calibration error, reliability plots
        plot = out / f"reliability_{slug(label)}.png" if cfg.plots else None
        cal = calibration_from_arrays(r.pred.extra, plot)
        if cal is not None:
            report["methods"][label]["calibration"] = cal
            files += [plot] if plot is not None else []
    write_json(out / "metrics.json", report)
    files.append(out / "metrics.json")
    with atomic_open(out / "metrics.md", "w", encoding="utf-8") as f:
        skipped = f" ({queries.skipped:,} unreadable images left out at embedding)" if queries.skipped else ""
        f.write(f"# Evaluation: {len(queries)} queries{skipped}, gallery of {len(gallery)}\n\n")
        f.write(metrics_markdown({k: r.metrics for k, r in runs.items()}, pairs))
    files.append(out / "metrics.md")
    if cfg.plots:
        files += write_plots(out, queries, runs, cfg.thresholds)
    written = {Path(f).resolve() for f in files}
    for (
        pattern
    ) in DERIVED_FILES:  # an earlier evaluation's plots (other methods, or --no-plots now) would pass
        for stale in out.glob(pattern):  # for this one's in the folder and in its report
            if stale.resolve() not in written:
                stale.unlink()
    return EvalResult(runs, pairs, out, files)


# what an evaluation folder's plots are, and its report (of an earlier evaluation: `geotoken report` rewrites it)
DERIVED_FILES = ("error_cdf.png", "map_*.png", "reliability_*.png", "report.html")


def write_plots(
    out: Path, queries: Split, runs: Mapping[str, MethodRun], thresholds: Sequence[float]
) -> list[Path]:
    """Error CDF of all runs, a world map per run, and reliability plots where a run has calibrated scores."""
    files = [plot_error_cdf({k: r.errors_km for k, r in runs.items()}, out / "error_cdf.png", thresholds)]
    for label, r in runs.items():
        files.append(plot_world_map(queries.lat, queries.lon, r.pred.lat, r.pred.lon, out / f"map_{slug(label)}.png",
                                    title=f"{label}: predictions vs truth ({len(queries)} images)"))  # fmt: skip
    return files

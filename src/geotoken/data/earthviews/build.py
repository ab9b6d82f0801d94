"""EarthViews build: shards and manifests written atomically, resumable, rendered in a process pool."""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
import os
import re
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from geotoken import assets
from geotoken.data.earthviews.config import SPLITS, EarthViewsConfig
from geotoken.data.earthviews.geometry import (
    Coordinates,
    Split,
    geonames_coordinates,
    load_coordinates,
    make_splits,
)
from geotoken.data.earthviews.render import iter_views, load_layer
from geotoken.errors import GeoTokenError
from geotoken.io import atomic_open, atomic_path, exclusive, read_json, sha256_file, sha256_json, write_json

FORMAT_VERSION = 1
_SHARD_RE = re.compile(r"(gallery|train|val|test|test_disjoint|test_shift)-\d{5}\.tar")


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
    out = {"coordinates": coords.source, "layers": {n: sha256_file(assets.basemap_image(n)) for n in layers}}
    if cfg.n_test_shift:  # the distribution-shift split's places
        out["shift_coordinates"] = geonames_coordinates().source
    return out


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
    with exclusive(out.parent / f".{out.name}.earthviews.lock", f"EarthViews folder {out}"):
        return _build(out, cfg, coords_path, workers, overwrite, progress)


def _build(out: Path, cfg: EarthViewsConfig, coords_path, workers: int, overwrite: bool, progress) -> dict:
    """`build_earthviews`, under its folder's lock (so a killed build's temporary files are its own)."""
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
    for stale in out.glob(".*.tmp"):  # a shard of a build killed while writing it (SIGKILL skips the cleanup)
        stale.unlink()
    t0 = time.perf_counter()
    splits = make_splits(coords, cfg)  # before build.json: too few coordinates leave nothing behind
    write_json(out / "build.json", {"config_hash": config_hash, **identity})
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

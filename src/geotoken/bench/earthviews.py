"""EarthViews build benchmark: views/s and disk size per worker count, side by side in one run.

Each build goes to a fresh temporary folder (or OUT/workers-N, kept) and is timed end to end (coordinates,
splits, rendering, JPEG, tar shards, manifests, hashes); `ratio_vs_first` compares each worker count with
the first. The builds are byte-identical whatever the worker count (checked here through the content hash).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from pathlib import Path

from geotoken.data import earthviews as ev


def bench_earthviews(
    preset: str = "demo",
    size: int | None = None,
    workers: tuple[int, ...] = (1, 2),
    out: str | os.PathLike | None = None,
) -> dict:
    """{preset, gallery, image_size, cpus, identical_bytes, rows: [{workers, views, seconds, views_per_s,
    render_views_per_s, disk_mb, bytes_per_view, content_hash, ratio_vs_first}]}, one row per worker count.

    size: gallery views (None: the preset's); out: keep the builds in OUT/workers-N (None: temporary
    folders, removed)."""
    cfg = ev.PRESETS[preset]
    if size is not None:
        cfg = dataclasses.replace(cfg, size=size)
    ev.load_coordinates()  # read once, outside the timings (cached per process)
    rows = []
    for n in workers:
        root = Path(out) if out else Path(tempfile.mkdtemp(prefix="bench_earthviews_"))
        folder = root / f"workers-{n}"
        shutil.rmtree(folder, ignore_errors=True)
        t0 = time.perf_counter()
        info = ev.build_earthviews(folder, cfg, workers=n)
        seconds = time.perf_counter() - t0
        views = sum(info["sizes"].values())
        rows.append(
            {
                "workers": n,
                "views": views,
                "seconds": round(seconds, 2),
                "views_per_s": round(views / seconds, 1),
                "render_views_per_s": info["timings"]["views_per_s"],
                "disk_mb": round(info["bytes"] / 1e6, 2),
                "bytes_per_view": round(info["bytes"] / views),
                "content_hash": info["content_hash"],
            }
        )
        if not out:
            shutil.rmtree(root)
    for r in rows:
        r["ratio_vs_first"] = round(r["views_per_s"] / rows[0]["views_per_s"], 2)
    return {
        "preset": preset,
        "gallery": cfg.size,
        "image_size": cfg.image_size,
        "cpus": os.cpu_count(),
        "identical_bytes": len({r["content_hash"] for r in rows}) == 1,
        "rows": rows,
    }

"""EarthViews build speed and disk size: views/s per worker count, side by side in one run.

    python benchmarks/bench_earthviews.py                      # demo preset (20K gallery + 40K train + 3x1K), 1 and 2 workers
    python benchmarks/bench_earthviews.py --preset full --workers 2        # the 100K build
    python benchmarks/bench_earthviews.py --size 2000 --json              # quick check, machine-readable

Each build goes to a fresh temporary folder (or --keep DIR/workers-N) and is timed end to end (coordinates,
splits, rendering, JPEG, tar shards, manifests, hashes); the ratio column compares each worker count with
the first. The builds are byte-identical whatever the worker count (checked here through the content hash).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from geotoken.data import earthviews as ev


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="demo", choices=sorted(ev.PRESETS))
    p.add_argument("--size", type=int, help="gallery views (default: the preset's)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--keep", help="keep the builds in DIR/workers-N instead of a temporary folder")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args()

    cfg = ev.PRESETS[args.preset]
    if args.size is not None:
        cfg = dataclasses.replace(cfg, size=args.size)
    ev.load_coordinates()  # read once, outside the timings (cached per process)
    rows = []
    for workers in args.workers:
        root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_earthviews_"))
        out = root / f"workers-{workers}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        info = ev.build_earthviews(out, cfg, workers=workers)
        seconds = time.perf_counter() - t0
        views = sum(info["sizes"].values())
        rows.append(
            {
                "workers": workers,
                "views": views,
                "seconds": round(seconds, 2),
                "views_per_s": round(views / seconds, 1),
                "render_views_per_s": info["timings"]["views_per_s"],
                "disk_mb": round(info["bytes"] / 1e6, 2),
                "bytes_per_view": round(info["bytes"] / views),
                "content_hash": info["content_hash"],
            }
        )
        if not args.keep:
            shutil.rmtree(root)
    for r in rows:
        r["ratio_vs_first"] = round(r["views_per_s"] / rows[0]["views_per_s"], 2)
    identical = len({r["content_hash"] for r in rows}) == 1
    report = {
        "preset": args.preset,
        "gallery": cfg.size,
        "image_size": cfg.image_size,
        "cpus": os.cpu_count(),
        "identical_bytes": identical,
        "rows": rows,
    }
    if args.json:
        print(json.dumps(report))
        return 0
    print(
        f"EarthViews build, preset {args.preset}: gallery {cfg.size}, {cfg.image_size} px, {os.cpu_count()} CPUs"
    )
    print(
        f"{'workers':>7} {'views':>7} {'seconds':>8} {'views/s':>8} {'ratio':>6} {'disk MB':>8} {'B/view':>7}"
    )
    for r in rows:
        print(
            f"{r['workers']:>7} {r['views']:>7} {r['seconds']:>8.1f} {r['views_per_s']:>8.1f} "
            f"{r['ratio_vs_first']:>6.2f} {r['disk_mb']:>8.1f} {r['bytes_per_view']:>7}"
        )
    print(f"byte-identical across worker counts: {identical}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

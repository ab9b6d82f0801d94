"""EarthViews build speed and disk size: views/s per worker count, side by side in one run.

    python benchmarks/bench_earthviews.py                      # demo preset (20K gallery + 40K train + 3x1K), 1 and 2 workers
    python benchmarks/bench_earthviews.py --preset full --workers 2        # the 100K build
    python benchmarks/bench_earthviews.py --size 2000 --json              # quick check, machine-readable

Each build goes to a fresh temporary folder (or -o DIR/workers-N) and is timed end to end (coordinates,
splits, rendering, JPEG, tar shards, manifests, hashes); the ratio column compares each worker count with
the first. The builds are byte-identical whatever the worker count (checked here through the content hash).
The body is `geotoken.bench.earthviews.bench_earthviews`.
"""

from __future__ import annotations

import argparse
import json

from geotoken.bench.earthviews import bench_earthviews
from geotoken.data import earthviews as ev


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="demo", choices=sorted(ev.PRESETS))
    p.add_argument("--size", type=int, help="gallery views (default: the preset's)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("-o", "--out", help="keep the builds in OUT/workers-N instead of a temporary folder")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args()

    report = bench_earthviews(args.preset, args.size, tuple(args.workers), args.out)
    if args.json:
        print(json.dumps(report))
        return 0
    print(
        f"EarthViews build, preset {report['preset']}: gallery {report['gallery']}, {report['image_size']} px, "
        f"{report['cpus']} CPUs"
    )
    print(
        f"{'workers':>7} {'views':>7} {'seconds':>8} {'views/s':>8} {'ratio':>6} {'disk MB':>8} {'B/view':>7}"
    )
    for r in report["rows"]:
        print(
            f"{r['workers']:>7} {r['views']:>7} {r['seconds']:>8.1f} {r['views_per_s']:>8.1f} "
            f"{r['ratio_vs_first']:>6.2f} {r['disk_mb']:>8.1f} {r['bytes_per_view']:>7}"
        )
    print(f"byte-identical across worker counts: {report['identical_bytes']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

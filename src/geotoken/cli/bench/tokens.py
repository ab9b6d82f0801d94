"""`geotoken bench tokens`: lat/lon -> grouped level-20 tokens, points/s, beside s2geometry and s2sphere.

All three run in this one process on 1 thread over the same random points; the clock is this process's CPU
time by default (`--clock wall`: elapsed time). The body and its details: `geotoken.bench.tokens`.
"""

from __future__ import annotations

import argparse
import json

from geotoken.bench.tokens import CLOCKS, bench_tokens


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "tokens",
        help="tokenization speed: geotoken.s2 vs the s2geometry and s2sphere per-point loops",
        description=__doc__.splitlines()[0].split(": ", 1)[1],
        epilog="  geotoken bench tokens --points 1000000 --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--points", type=int, default=1_000_000, help="points for geotoken.s2 (default 1,000,000)")
    p.add_argument("--s2geometry-points", type=int, default=100_000, help="prefix timed with s2geometry")
    p.add_argument("--s2sphere-points", type=int, default=20_000, help="prefix timed with s2sphere")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of geotoken.s2; the best is kept")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="cpu", help="process CPU time or wall time")
    p.add_argument("--seed", type=int, default=0, help="random points' seed")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    res = bench_tokens(
        args.points, args.s2geometry_points, args.s2sphere_points, args.repeats, args.clock, args.seed
    )
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(
        f"lat/lon -> level-{res['level']} tokens, group {res['group']}, 1 thread, {res['clock']} clock (points/s)"
    )
    print(f"  geotoken.s2   {res['points_per_s']:>12,.0f}   on {res['points']:,} points")
    for name in ("s2geometry", "s2sphere"):
        if res[f"{name}_points_per_s"] is None:
            print(f"  {name:<12}  not installed")
            continue
        print(f"  {name:<12}  {res[f'{name}_points_per_s']:>12,.0f}   on {res[f'{name}_points']:,} points"
              f"   geotoken.s2 is x{res[f'speedup_vs_{name}']:.1f}")  # fmt: skip
    print(f"  baseline tokens identical to geotoken.s2: {res['baseline_tokens_identical']}")
    print(f"  targets (>= {res['target_points_per_s']:,} points/s, >= x{res['target_speedup_vs_s2geometry']:.0f} "
          f"s2geometry): {'met' if res['meets_targets'] else 'NOT met'}")  # fmt: skip
    return 0

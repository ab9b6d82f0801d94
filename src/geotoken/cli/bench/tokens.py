"""`geotoken bench tokens`: lat/lon -> grouped level-20 tokens, points/s, beside s2geometry and s2sphere.

All three run in this one process on 1 thread over the same random points (uniform on the sphere). The
baselines convert points to level-20 cell ids one at a time, which is how their Python APIs work; turning
those ids into grouped tokens is then left to our vectorized code and not timed, which flatters them.
s2sphere (pure Python, the authors' choice) and s2geometry time a prefix of the points to keep the run
short. The clock is this process's CPU time by default, so that other load on a shared machine does not
distort the figures; `--clock wall` uses elapsed time. The benchmark also checks that the baselines'
tokens are identical to ours.
"""

from __future__ import annotations

import argparse
import json
import time

TARGET_POINTS_PER_S = 5_000_000
TARGET_SPEEDUP_VS_S2GEOMETRY = 20.0
_CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


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
    p.add_argument("--clock", choices=sorted(_CLOCKS), default="cpu", help="process CPU time or wall time")
    p.add_argument("--seed", type=int, default=0, help="random points' seed")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def _timed(fn, clock) -> tuple[float, object]:
    start = clock()
    result = fn()
    return clock() - start, result


def run_benchmark(
    points: int = 1_000_000,
    s2geometry_points: int = 100_000,
    s2sphere_points: int = 20_000,
    repeats: int = 5,
    clock: str = "cpu",
    seed: int = 0,
    level: int = 20,
    group: int = 2,
) -> dict:
    """The figures as a dict (see the module docstring); a baseline that is not installed gets None."""
    import numpy as np

    from geotoken import s2

    tick = _CLOCKS[clock]
    rng = np.random.default_rng(seed)
    lat = np.degrees(np.arcsin(rng.uniform(-1, 1, points)))
    lon = rng.uniform(-180, 180, points)
    s2.latlon_to_tokens(lat[:1000], lon[:1000], level, group)  # warm-up
    seconds, tokens = min((_timed(lambda: s2.latlon_to_tokens(lat, lon, level, group), tick) for _ in range(repeats)),
                          key=lambda r: r[0])  # fmt: skip
    out = {
        "points": points,
        "level": level,
        "group": group,
        "clock": clock,
        "points_per_s": points / seconds,
    }
    identical = True
    for name, n in (("s2geometry", s2geometry_points), ("s2sphere", s2sphere_points)):
        loop = _baseline_loop(name, level)
        n = min(n, points)
        if loop is None or n == 0:
            out[f"{name}_points"], out[f"{name}_points_per_s"], out[f"speedup_vs_{name}"] = n, None, None
            continue
        seconds, ids = _timed(lambda: loop(lat[:n].tolist(), lon[:n].tolist()), tick)  # noqa: B023
        grouped = s2.group_tokens(s2.cell_ids_to_tokens(np.array(ids, dtype=np.uint64), level), group)
        identical &= bool(np.array_equal(grouped, tokens[:n]))
        out[f"{name}_points"] = n
        out[f"{name}_points_per_s"] = n / seconds
        out[f"speedup_vs_{name}"] = out["points_per_s"] / out[f"{name}_points_per_s"]
    out["baseline_tokens_identical"] = identical
    out["target_points_per_s"] = TARGET_POINTS_PER_S
    out["target_speedup_vs_s2geometry"] = TARGET_SPEEDUP_VS_S2GEOMETRY
    speedup = out["speedup_vs_s2geometry"]
    out["meets_targets"] = out["points_per_s"] >= TARGET_POINTS_PER_S and (
        speedup is None or speedup >= TARGET_SPEEDUP_VS_S2GEOMETRY
    )
    return out


def _baseline_loop(name: str, level: int):
    """A function (lat list, lon list) -> list of level-`level` cell ids, one library call chain per point."""
    try:
        if name == "s2geometry":
            import s2geometry

            from_degrees, cell_id = s2geometry.S2LatLng.FromDegrees, s2geometry.S2CellId
            return lambda lat, lon: [cell_id(from_degrees(a, b)).parent(level).id() for a, b in zip(lat, lon)]
        import s2sphere

        from_degrees, from_lat_lng = s2sphere.LatLng.from_degrees, s2sphere.CellId.from_lat_lng
        return lambda lat, lon: [
            from_lat_lng(from_degrees(a, b)).parent(level).id() for a, b in zip(lat, lon)
        ]
    except ImportError:
        return None


def run(args: argparse.Namespace) -> int:
    from geotoken.errors import GeoTokenError

    if args.points < 1 or args.repeats < 1 or args.s2geometry_points < 0 or args.s2sphere_points < 0:
        raise GeoTokenError("--points and --repeats must be >= 1, baseline point counts >= 0")
    res = run_benchmark(
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
    print(f"  targets (>= {TARGET_POINTS_PER_S:,} points/s, >= x{TARGET_SPEEDUP_VS_S2GEOMETRY:.0f} s2geometry): "
          f"{'met' if res['meets_targets'] else 'NOT met'}")  # fmt: skip
    return 0

"""Tokenization benchmark: lat/lon -> grouped level-20 tokens, points/s, beside s2geometry and s2sphere.

All three run in this one process on 1 thread over the same random points (uniform on the sphere). The
baselines convert points to level-20 cell ids one at a time, which is how their Python APIs work; turning
those ids into grouped tokens is then left to our vectorized code and not timed, which flatters them.
s2sphere (pure Python, the authors' choice) and s2geometry time a prefix of the points to keep the run
short. The clock is this process's CPU time by default, so that other load on a shared machine does not
distort the figures; `clock="wall"` uses elapsed time. The benchmark also checks that the baselines'
tokens are identical to ours.
"""

from __future__ import annotations

import time

import numpy as np

from geotoken import s2
from geotoken.errors import GeoTokenError

TARGET_POINTS_PER_S = 5_000_000
TARGET_SPEEDUP_VS_S2GEOMETRY = 20.0
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def _timed(fn, clock) -> tuple[float, object]:
    start = clock()
    result = fn()
    return clock() - start, result


def bench_tokens(
    points: int = 1_000_000,
    s2geometry_points: int = 100_000,
    s2sphere_points: int = 20_000,
    repeats: int = 5,
    clock: str = "cpu",
    seed: int = 0,
    level: int = 20,
    group: int = 2,
) -> dict:
    """{points, level, group, clock, points_per_s, <baseline>_points, <baseline>_points_per_s,
    speedup_vs_<baseline> (baseline s2geometry, s2sphere), baseline_tokens_identical, target_points_per_s,
    target_speedup_vs_s2geometry, meets_targets}; a baseline that is not installed gets None figures."""
    minimum = {"points": (points, 1), "repeats": (repeats, 1), "s2geometry_points": (s2geometry_points, 0),
               "s2sphere_points": (s2sphere_points, 0)}  # fmt: skip
    for name, (value, low) in minimum.items():
        if value < low:
            raise GeoTokenError(f"{name} must be >= {low}, got {value}")
    tick = CLOCKS[clock]
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

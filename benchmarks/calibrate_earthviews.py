"""Calibrate EarthViews' difficulty: 1-NN retrieval on EfficientNet-Lite0 features, against the coordinate-only
prior (the gallery's densest place) and the ceiling (the nearest gallery coordinate), on the random test split
and the spatially disjoint test split. Accuracy % within 1 / 25 / 200 / 750 / 2500 km.

    python benchmarks/calibrate_earthviews.py                          # every setting at demo size
    python benchmarks/calibrate_earthviews.py --settings medium --view-km 200 400 800   # view-size sweep

Views are rendered in memory exactly as `geotoken data earthviews` writes them (same splits, same per-view
seeds, JPEG round trip); features are cached under --cache, so a rerun only prints.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from geotoken.data import earthviews as ev
from geotoken.encoders import load_backbone
from geotoken.evaluate.baselines import densest_location, exact_neighbours, to_xyz
from geotoken.geo import THRESHOLDS_KM, haversine_km
from geotoken.io import sha256_json, write_json

NORTH_UP = dataclasses.replace(ev.GALLERY_STYLE, rotation_deg=0.0)

# name -> (gallery style, test style, description)
SETTINGS = {
    "probe": (NORTH_UP, ev.TEST_STYLES["light"], "north-up gallery, light test (issue 4's first probe)"),
    "north-up/strong": (NORTH_UP, ev.TEST_STYLES["strong"], "north-up gallery, strong test"),
    "light": (ev.GALLERY_STYLE, ev.TEST_STYLES["light"], "gallery any orientation, light test"),
    "medium": (ev.GALLERY_STYLE, ev.TEST_STYLES["medium"], "gallery any orientation, medium test (default)"),
    "strong": (ev.GALLERY_STYLE, ev.TEST_STYLES["strong"], "gallery any orientation, strong test"),
    "cross-layer": (ev.GALLERY_STYLE, ev.TEST_STYLES["cross-layer"], "gallery any orientation, other layers"),
}


def embed_views(split: ev.Split, cfg: ev.EarthViewsConfig, backbone, cache: Path, batch: int = 256):
    """(n, 1280) float32 features of every view of `split`, cached by everything that decides its pixels."""
    key = sha256_json(
        {
            "split": split.name,
            "ids": sha256_json(split.ids.tolist()),
            "style": dataclasses.asdict(cfg.style(split.name)),
            "cfg": {
                k: v
                for k, v in cfg.to_dict().items()
                if k not in ("gallery_style", "test_style", "shard_size")
            },
            "backbone": backbone.config(),
        }
    )[:20]
    path = cache / f"{split.name}-{key}.npy"
    if path.exists():
        return np.load(path), 0.0
    t0 = time.perf_counter()
    feats, tensors = [], []
    rows = np.arange(len(split.ids))
    with torch.no_grad():
        for n, (_key, jpg, _meta) in enumerate(ev.iter_views(split, rows, cfg), start=1):
            with Image.open(io.BytesIO(jpg)) as im:
                tensors.append(backbone.preprocess(im.convert("RGB")))
            if len(tensors) == batch or n == len(rows):
                feats.append(backbone(torch.stack(tensors)).numpy())
                tensors = []
    out = np.concatenate(feats).astype(np.float32)
    cache.mkdir(parents=True, exist_ok=True)
    np.save(path, out)
    return out, time.perf_counter() - t0


def accuracies(errors_km: np.ndarray) -> list[float]:
    return [float(np.mean(errors_km <= t) * 100) for t in THRESHOLDS_KM]


def one_nn_errors(gallery: ev.Split, g_feat: np.ndarray, split: ev.Split, q_feat: np.ndarray) -> np.ndarray:
    rows, _ = exact_neighbours(g_feat, q_feat, 1)
    return haversine_km(split.lat, split.lon, gallery.lat[rows[:, 0]], gallery.lon[rows[:, 0]])


def baseline_errors(gallery: ev.Split, split: ev.Split) -> dict[str, np.ndarray]:
    """Coordinate-only prior and the ceiling (the nearest gallery coordinate): no pixels involved."""
    plat, plon = densest_location(gallery.lat, gallery.lon)
    rows, _ = exact_neighbours(to_xyz(gallery.lat, gallery.lon), to_xyz(split.lat, split.lon), 1)
    return {
        "prior": haversine_km(split.lat, split.lon, plat, plon),
        "ceiling": haversine_km(split.lat, split.lon, gallery.lat[rows[:, 0]], gallery.lon[rows[:, 0]]),
    }


def geometry_rows(gallery: ev.Split, splits: dict, view_kms: list[float], image_size: int) -> list[str]:
    """Why the view size: km per output pixel against Blue Marble's own resolution, and how often a test point
    has a gallery point within half a view width (a heavily overlapping gallery view)."""
    source_km = 2 * np.pi * ev.EARTH_RADIUS_KM / ev.load_layer("bmng").shape[1]  # per pixel at the equator
    nearest = {}
    for name in ("test", "test_disjoint"):
        rows, _ = exact_neighbours(
            to_xyz(gallery.lat, gallery.lon), to_xyz(splits[name].lat, splits[name].lon), 1
        )
        g = rows[:, 0]
        nearest[name] = haversine_km(splits[name].lat, splits[name].lon, gallery.lat[g], gallery.lon[g])
    lines = [
        f"| view km | km / px at {image_size} px | Blue Marble px per view px (equator) "
        "| test: gallery point within half a view | test_disjoint: same |",
        "|---|---|---|---|---|",
    ]
    for km in view_kms:
        px = km / image_size
        share = [float(np.mean(nearest[n] <= km / 2) * 100) for n in ("test", "test_disjoint")]
        lines.append(f"| {km:g} | {px:.2f} | {px / source_km:.2f} | {share[0]:.1f} % | {share[1]:.1f} % |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--view-km", nargs="+", type=float, default=[ev.EarthViewsConfig.view_km])
    p.add_argument("--gallery", type=int, default=ev.PRESETS["demo"].size, help="gallery views (demo: 20000)")
    p.add_argument("--queries", type=int, default=1000, help="views per test split")
    p.add_argument("--image-size", type=int, default=ev.PRESETS["demo"].image_size)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", default="runs/calibrate_earthviews")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    backbone = load_backbone("efficientnet-lite0", image_size=args.image_size)
    base = dataclasses.replace(
        ev.PRESETS["demo"],
        size=args.gallery,
        n_test=args.queries,
        n_test_disjoint=args.queries,
        image_size=args.image_size,
        seed=args.seed,
    )
    splits = ev.make_splits(ev.load_coordinates(), base)
    gallery = splits["gallery"]
    cache = Path(args.cache)
    lines = [
        "| setting | view km | split | method | 1 km | 25 km | 200 km | 750 km | 2500 km |",
        "|" + "---|" * 9,
    ]
    results = []
    for name in ("test", "test_disjoint"):
        for method, err in baseline_errors(gallery, splits[name]).items():
            acc = accuracies(err)
            results.append({"setting": "-", "split": name, "method": method, "accuracy": acc})
            lines.append(f"| - | - | {name} | {method} | " + " | ".join(f"{a:.1f}" for a in acc) + " |")
    for km in args.view_km:
        for setting in args.settings:
            g_style, t_style, _ = SETTINGS[setting]
            cfg = dataclasses.replace(base, view_km=km, gallery_style=g_style, test_style=t_style)
            g_feat, g_sec = embed_views(gallery, cfg, backbone, cache)
            for name in ("test", "test_disjoint"):
                q_feat, q_sec = embed_views(splits[name], cfg, backbone, cache)
                acc = accuracies(one_nn_errors(gallery, g_feat, splits[name], q_feat))
                results.append(
                    {"setting": setting, "view_km": km, "split": name, "method": "1-NN", "accuracy": acc}
                )
                row = f"| {setting} | {km:g} | {name} | 1-NN | " + " | ".join(f"{a:.1f}" for a in acc) + " |"
                lines.append(row)
                print(row + (f"  (render+embed {g_sec + q_sec:.0f} s)" if g_sec + q_sec else ""), flush=True)
    print()
    print(
        f"gallery {len(gallery.ids)} views, {args.queries} per test split, {args.image_size} px, seed {args.seed}"
    )
    for setting in args.settings:
        print(f"  {setting}: {SETTINGS[setting][2]}")
    print("\n".join(lines))
    print()
    print(
        "\n".join(
            geometry_rows(
                gallery, splits, sorted({100.0, 200.0, 400.0, 800.0, *args.view_km}), args.image_size
            )
        )
    )
    write_json(cache / "calibration.json", {"args": vars(args), "results": results})
    print(json.dumps({"written": str(cache / "calibration.json")}))


if __name__ == "__main__":
    main()

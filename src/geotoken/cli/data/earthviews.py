"""`geotoken data earthviews`: build the offline EarthViews dataset (see geotoken.data.earthviews)."""

from __future__ import annotations

import argparse
import dataclasses

from tqdm import tqdm

from geotoken.data.earthviews import PRESETS, TEST_STYLES, build_earthviews
from geotoken.errors import GeoTokenError

HELP = "build EarthViews, the offline dataset of Blue Marble views at real MP16 photo coordinates"

DESCRIPTION = """\
Build EarthViews: square views of NASA Blue Marble imagery, a few hundred km wide, around the ~100K real MP16
photo coordinates (or your own --coords), as WebDataset tar shards plus one manifest CSV per split
(gallery, train, val, test, test_disjoint, test_shift) and dataset.json. Test views carry strong changes (rotation, scale,
season-like colours, haze, clouds, blur, other imagery layers, JPEG). test_disjoint comes from lat/lon bins held
out of the gallery: the headline split; test_shift takes its places from GeoNames towns drawn country-balanced,
not from MP16's photo coordinates. Same command, same bytes; a complete build is a no-op, an interrupted
one resumes. A proxy task on satellite-scale views: numbers are not comparable with Im2GPS3k / YFCC4k."""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "earthviews", help=HELP, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "-o", "--out", required=True, help="output folder (created; must be empty or hold this build)"
    )
    p.add_argument("--preset", default="demo", choices=list(PRESETS),
                   help="named sizes: demo (20K gallery, 64 px; `geotoken demo` builds 10K), full (100K, 96 px), tiny")  # fmt: skip
    p.add_argument("--size", type=int, help="gallery/train views (default: the preset's)")
    p.add_argument("--n-val", type=int, help="validation views")
    p.add_argument("--n-test", type=int, help="random test views (coordinates disjoint from the gallery's)")
    p.add_argument("--n-test-disjoint", type=int, help="spatially disjoint test views (0 skips the split)")
    p.add_argument("--n-test-shift", type=int,
                   help="distribution-shift test views: GeoNames places, country-balanced (0 skips the split)")  # fmt: skip
    p.add_argument("--image-size", type=int, help="pixels per side")
    p.add_argument("--view-km", type=float, help="view width in km before the per-view scale (default 400)")
    styles = ", ".join(TEST_STYLES)
    p.add_argument("--test-style", help=f"test-time changes: one of {styles} (default medium)")
    p.add_argument(
        "--train-views",
        type=int,
        help="photo-like training query views per gallery place (default 2; 0: none)",
    )
    p.add_argument("--train-style", help=f"changes of the train views: one of {styles} (default medium)")
    p.add_argument("--holdout-deg", type=float, help="lat/lon bin size of the spatially disjoint split (5)")
    p.add_argument("--holdout-fraction", type=float, help="share of bins held out of the gallery (0.2)")
    p.add_argument("--seed", type=int, help="changes every random choice (default 0)")
    p.add_argument("--coords", help="plain id,lat,lon CSV to build views at instead of the MP16 coordinates")
    p.add_argument("--shard-size", type=int, help="views per tar shard (1000)")
    p.add_argument("--workers", type=int, default=2, help="rendering processes (bytes do not depend on it)")
    p.add_argument("--overwrite", action="store_true", help="delete an existing build in --out first")
    p.set_defaults(func=run)


def config_from_args(args):
    """The preset, with every option the user gave replacing its field."""
    changes = {
        name: getattr(args, name)
        for name in (
            "size",
            "n_val",
            "n_test",
            "n_test_disjoint",
            "n_test_shift",
            "image_size",
            "view_km",
            "seed",
            "shard_size",
            "train_views",
        )
        + ("holdout_deg", "holdout_fraction")
        if getattr(args, name) is not None
    }
    for option, name in (("--test-style", "test_style"), ("--train-style", "train_style")):
        style = getattr(args, name)
        if style is not None:
            if style not in TEST_STYLES:
                raise GeoTokenError(f"{option} {style!r}: choose from {sorted(TEST_STYLES)}")
            changes[name] = TEST_STYLES[style]
    return dataclasses.replace(PRESETS[args.preset], **changes)


def run(args) -> int:
    cfg = config_from_args(args)
    bar = tqdm(total=None, unit="view", desc="earthviews", disable=None)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    info = build_earthviews(
        args.out,
        cfg,
        coords_path=args.coords,
        workers=args.workers,
        overwrite=args.overwrite,
        progress=progress,
    )
    bar.close()
    sizes = ", ".join(f"{k} {v}" for k, v in info["sizes"].items())
    t = info["timings"]
    print(
        f"EarthViews in {args.out}: {sizes}; {info['bytes'] / 1e6:.1f} MB; content hash {info['content_hash'][:16]}"
    )
    if info.get("reused"):
        print("already complete: nothing to do")
    else:
        print(f"rendered {t['rendered_views']} views in {t['render_s']:.1f} s ({t['views_per_s']} views/s)")
    return 0

"""`geotoken tokenize`: the S2 location tokens of every row of an annotation file, as one .npy array."""

from __future__ import annotations

import argparse

import numpy as np

from geotoken.data.datasets import read_leaving_out_bad_rows, report_path
from geotoken.data.manifest import manifest_tokens, read_manifest
from geotoken.geo import haversine_km
from geotoken.io import atomic_open, check_outputs_spare_inputs
from geotoken.model import ModelConfig
from geotoken.s2 import tokens_to_latlon, vocab_sizes

HELP = "turn the coordinates of an annotation CSV into hierarchical S2 location tokens (.npy, int64)"

EPILOG = """\
The output has one row per input row, in input order, and 1 + ceil(level / group-size) columns: the cube
face (0..5), then groups of child indices (vocabulary 4**group-size; a shorter last group when level is
not a multiple of group-size). The paper's setting is level 20, group size 2: 11 tokens, vocabularies
[6, 16 x 10]. Also prints how far the decoded cell centres are from the original points.

The file is for inspection and other tools: no geotoken command reads it (training, bundles and evaluation
compute the tokens from the coordinates themselves).

  geotoken tokenize mp16_places365.csv -o mp16_tokens.npy --level 20 --group-size 2
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "tokenize",
        help=HELP,
        description=HELP,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "annotations", help="annotation CSV (MP16, Im2GPS3k, YFCC4k, OSV-5M, id,lat,lon[,image] or LAT,LON)"
    )
    p.add_argument("-o", "--out", required=True, help="output .npy file (written atomically)")
    p.add_argument("--level", type=int, default=ModelConfig.level,
                   help="S2 cell level 0..30 (default %(default)s, ~10 m cells)")  # fmt: skip
    p.add_argument("--group-size", type=int, default=ModelConfig.group,
                   help="child indices per token (default %(default)s: vocabulary 16)")  # fmt: skip
    p.add_argument("--skip-bad", action="store_true",
                   help="leave bad rows out (listed in OUT.report.csv: where,id,reason) instead of stopping; "
                   "the output then has a row per row kept")  # fmt: skip
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    sizes = vocab_sizes(args.level, args.group_size)  # checks both before the (slow) read
    report = report_path(args.out)
    check_outputs_spare_inputs([args.annotations], args.out, report if args.skip_bad else None)
    if args.skip_bad:
        manifest, left_out = read_leaving_out_bad_rows([args.annotations], report)
        print(f"{len(left_out):,} bad rows left out (listed in {report})")
    else:
        manifest = read_manifest(args.annotations)
    tokens = manifest_tokens(manifest, args.level, args.group_size)
    with atomic_open(args.out, "wb") as f:
        np.save(f, tokens)
    print(f"wrote {args.out}: {tokens.shape[0]} x {tokens.shape[1]} int64 tokens (level {args.level}, "
          f"group size {args.group_size}, vocabularies {sizes})")  # fmt: skip
    if len(manifest):
        c_lat, c_lon = tokens_to_latlon(tokens, args.level, args.group_size)
        metres = 1000 * haversine_km(manifest.lat, manifest.lon, c_lat, c_lon)
        print(f"cell centre vs point: max {metres.max():.2f} m, median {np.median(metres):.2f} m")
    return 0

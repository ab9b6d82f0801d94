"""`geotoken evaluate`: baselines and the model on one gallery/query pair -> tables with CIs, CSV, plots."""

from __future__ import annotations

import argparse

from geotoken import DTYPES
from geotoken.search import STRATEGIES

# the same names as geotoken.evaluate.METHODS (a test checks); kept here so `--help` imports nothing heavy
BASELINES = ("prior", "nn", "knn", "cells", "gps-gallery")
METHODS = (*BASELINES, "geotoken")

HELP = "evaluate methods (baselines, the model) on a query set: accuracy table with 95% CIs, CSV, plots"

EPILOG = """\
inputs are feature stores (folders with store.json, written by `geotoken embed` / `geotoken align`):
the gallery is what methods fit on (training split), the queries are scored (test split). Works the
same for an EarthViews split and for Im2GPS3k / YFCC4k / OSV-5M stores.

examples:
  geotoken evaluate --gallery runs/demo/gallery --queries runs/demo/test -o runs/demo/eval
  geotoken evaluate --method nn knn cells --gallery G --queries Q --embedding visual -o OUT
  geotoken evaluate --method knn geotoken --model BUNDLE --strategy greedy beam sample \\
      --select logp consensus --gallery G --queries Q -o OUT --reference knn
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help=HELP.replace("%", "%%"),  # help strings are %-formatted, descriptions are not
        description=HELP,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--method", nargs="+", default=list(BASELINES), choices=METHODS, metavar="NAME",
                   help=f"methods to run, in table order: {', '.join(METHODS)} (default: all baselines)")  # fmt: skip
    p.add_argument(
        "--gallery", required=True, help="feature store of the gallery / training split (or a model bundle)"
    )
    p.add_argument("--queries", required=True, help="feature store of the query / test split")
    p.add_argument(
        "--gallery-manifest", help="manifest CSV with the gallery's coordinates (default: the store's)"
    )
    p.add_argument(
        "--queries-manifest", help="manifest CSV with the queries' true coordinates (default: the store's)"
    )
    p.add_argument(
        "-o", "--out", required=True, help="output folder (metrics.json, metrics.md, predictions.csv, PNGs)"
    )
    p.add_argument("--neighbours", help="neighbour table folder (index.npy, sims.npy) of the queries in the gallery, "
                   "used by nn/knn instead of an exact search")  # fmt: skip
    p.add_argument("--reference", help="paired comparisons: every method minus this one (default: the first)")
    p.add_argument("--limit", type=int, help="evaluate only the first N queries")
    g = p.add_argument_group("statistics")
    g.add_argument(
        "--thresholds", type=float, nargs="+", help="accuracy thresholds in km (default 1 25 200 750 2500)"
    )
    g.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates (default 1000)")
    g.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    g.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    g = p.add_argument_group("baselines")
    g.add_argument(
        "--embedding", default="visual", help="store array for nn/knn cosine search (default visual)"
    )
    g.add_argument("--k", type=int, default=15, help="knn: neighbours voting (default 15)")
    g.add_argument("--radius-km", type=float, default=100.0, help="knn: cluster radius (default 100)")
    g.add_argument(
        "--temperature", type=float, default=0.1, help="knn: softmax temperature of similarities (0.1)"
    )
    g.add_argument(
        "--prior-level", type=int, default=7, help="prior: S2 level of the densest cell (default 7)"
    )
    g.add_argument(
        "--cells-features", default="features", help="cells: store array the head reads (default features)"
    )
    g.add_argument(
        "--cells-max-count", type=int, default=100, help="cells: split a cell above this many points"
    )
    g.add_argument("--cells-min-count", type=int, default=5, help="cells: drop cells below this many points")
    g.add_argument("--cells-hidden", type=int, default=512, help="cells: MLP hidden size, 0 = linear head")
    g.add_argument("--cells-epochs", type=int, default=15, help="cells: training epochs (default 15)")
    g.add_argument("--gps-gallery", default="train", choices=["train", "mp16"],
                   help="gps-gallery: coordinates to score (the gallery split, or GeoCLIP's 100K MP16)")  # fmt: skip
    g = p.add_argument_group("geotoken (the model)")
    g.add_argument("--model", help="model bundle folder (bundle.json), required for --method geotoken")
    g.add_argument("--strategy", nargs="+", default=["greedy"], choices=[s for s in STRATEGIES if s != "beam+sample"],
                   help="decoding strategies to evaluate, each a row of the table")  # fmt: skip
    g.add_argument("--select", nargs="+", default=["logp"], choices=["logp", "consensus", "reward", "mllm"],
                   help="selectors applied to beam / sample pools, each a row of the table")  # fmt: skip
    g.add_argument("--num-samples", type=int, default=10, help="samples per image for --strategy sample")
    g.add_argument("--beam-width", type=int, default=5, help="beam width for --strategy beam")
    g.add_argument("--retrieved", type=int, default=5, help="neighbours' cells pooled for sample+retrieval")
    g.add_argument("--sample-temperature", type=float, default=1.0, help="sampling temperature")
    g.add_argument("--dtype", default="fp32", choices=DTYPES, help="model precision (default fp32)")
    p.set_defaults(func=run)


def run(args) -> int:
    import numpy as np

    from geotoken.errors import GeoTokenError
    from geotoken.evaluate.baselines import CellsConfig, GPSGalleryConfig, PriorConfig, RetrievalConfig
    from geotoken.evaluate.evaluate import EvalConfig, GeoTokenMethodConfig, evaluate, load_split
    from geotoken.evaluate.metrics import print_tables
    from geotoken.geo import THRESHOLDS_KM

    if "geotoken" in args.method and not args.model:
        raise GeoTokenError("--method geotoken needs --model BUNDLE (a folder with bundle.json)")
    for name in ("n_boot", "k", "cells_epochs", "num_samples", "beam_width", "retrieved"):
        if getattr(args, name) < 1:
            raise GeoTokenError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.limit is not None and args.limit < 1:
        raise GeoTokenError(f"--limit must be >= 1, got {args.limit}")
    cfg = EvalConfig(
        methods=tuple(dict.fromkeys(args.method)),
        thresholds=tuple(args.thresholds or THRESHOLDS_KM),
        n_boot=args.n_boot,
        seed=args.seed,
        reference=args.reference,
        limit=args.limit,
        plots=not args.no_plots,
        prior=PriorConfig(level=args.prior_level),
        retrieval=RetrievalConfig(args.embedding, args.k, args.radius_km, args.temperature),
        cells=CellsConfig(
            features=args.cells_features,
            max_count=args.cells_max_count,
            min_count=args.cells_min_count,
            hidden=args.cells_hidden,
            epochs=args.cells_epochs,
        ),  # fmt: skip
        gps_gallery=GPSGalleryConfig(gallery=args.gps_gallery),
        geotoken=GeoTokenMethodConfig(
            model=args.model,
            strategies=tuple(args.strategy),
            selectors=tuple(args.select),
            num_samples=args.num_samples,
            beam_width=args.beam_width,
            retrieved=args.retrieved,
            temperature=args.sample_temperature,
            dtype=args.dtype,
        ),  # fmt: skip
    )
    gallery = load_split(args.gallery, args.gallery_manifest, name="gallery")
    queries = load_split(args.queries, args.queries_manifest, name="queries")
    neighbours = None
    if args.neighbours:
        from pathlib import Path

        folder = Path(args.neighbours)
        for f in ("index.npy", "sims.npy"):
            if not (folder / f).is_file():
                raise GeoTokenError(f"{folder}: neighbour table has no {f}")
        neighbours = (
            np.load(folder / "index.npy", mmap_mode="r"),
            np.load(folder / "sims.npy", mmap_mode="r"),
        )
        if queries.skipped or gallery.skipped:  # dropped rows would shift the table's row numbers
            raise GeoTokenError(
                f"{folder}: a neighbour table cannot be used when the stores have skipped rows"
            )
        if len(neighbours[0]) != len(queries):
            raise GeoTokenError(f"{folder}: {len(neighbours[0])} neighbour rows for {len(queries)} queries")
        if int(neighbours[0].min()) < 0 or int(neighbours[0].max()) >= len(gallery):
            raise GeoTokenError(
                f"{folder}: gallery row {int(neighbours[0].max())} out of range ({len(gallery)} rows)"
            )
    result = evaluate(gallery, queries, args.out, cfg, neighbours=neighbours)
    print_tables({k: r.metrics for k, r in result.runs.items()}, result.pairs)
    print(f"wrote {len(result.files)} files to {result.out_dir}")
    return 0

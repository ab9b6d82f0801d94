"""`geotoken evaluate`: baselines and the model on one gallery/query pair -> tables with CIs, CSV, plots."""

from __future__ import annotations

import argparse

from geotoken import DTYPES
from geotoken.cli import DEVICE_HELP, THREADS_HELP, add_mllm_arguments, count, mllm_changes, use_threads
from geotoken.evaluate import (
    BASELINES,
    METHODS,
    EvalConfig,
    GeoTokenMethodConfig,
    evaluate,
    load_neighbours,
    load_split,
)
from geotoken.evaluate.baselines import (
    GPS_GALLERIES,
    CellsConfig,
    GPSGalleryConfig,
    PriorConfig,
    RetrievalConfig,
)
from geotoken.evaluate.metrics import print_tables
from geotoken.search import LOGP_KINDS, SELECTORS, STRATEGIES
from geotoken.search.options import PAPER_TEMPERATURE, sampling_temperature

HELP = "evaluate methods (baselines, the model) on a query set: accuracy table with 95% CIs, CSV, plots"

EPILOG = """\
inputs are feature stores (folders with store.json, written by `geotoken embed` / `geotoken align`):
the gallery is what methods fit on (training split), the queries are scored (test split). Works the
same for an EarthViews split and for Im2GPS3k / YFCC4k / OSV-5M stores. `geoclip` is GeoCLIP's
pretrained model on query stores embedded with `--backbone clip` (CLIP ViT-L/14): check a preparation
against GeoCLIP's published numbers before training anything.

examples:
  geotoken evaluate --gallery runs/demo/gallery --queries runs/demo/test -o runs/demo/eval
  geotoken evaluate --method nn knn cells --gallery G --queries Q --embedding visual -o OUT
  geotoken evaluate --method nn knn geoclip --gallery G --queries Q -o OUT   # Q: embed --backbone clip
  geotoken evaluate --method knn geotoken --model BUNDLE --strategy greedy beam sample \\
      --select logp consensus --gallery G --queries Q -o OUT --reference knn
  geotoken evaluate --method geotoken --model BUNDLE --no-constrain --gallery G --queries Q -o OUT

geotoken rows decoded under the gallery-prefix constraint are labelled "+gallery" (e.g.
"geotoken greedy+gallery"); free rows are not ("geotoken greedy").
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
                   "used by nn/knn instead of an exact search; the geotoken rows search the bundle's own index, "
                   "as predict does")  # fmt: skip
    p.add_argument("--reference", help="paired comparisons: every method minus this one (default: the first)")
    p.add_argument("--limit", type=int, help="evaluate only the first N queries")
    g = p.add_argument_group("statistics")
    g.add_argument("--thresholds", type=float, nargs="+", default=list(EvalConfig.thresholds),
                   help="accuracy thresholds in km (default %(default)s)")  # fmt: skip
    g.add_argument(
        "--n-boot", type=int, default=EvalConfig.n_boot, help="bootstrap replicates (default %(default)s)"
    )
    g.add_argument("--seed", type=int, default=EvalConfig.seed, help="bootstrap seed (default %(default)s)")
    g.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    r, c = RetrievalConfig, CellsConfig
    g = p.add_argument_group("baselines")
    g.add_argument(
        "--embedding",
        default=r.embedding,
        help="store array for nn/knn cosine search, or a '+' concatenation as `index build` takes "
        "(visual+gps) (default %(default)s)",
    )
    g.add_argument(
        "-k", "--k", type=int, default=r.k, help="knn: neighbours per query that vote (default %(default)s)"
    )
    g.add_argument(
        "--knn-radius-km", type=float, default=r.radius_km, help="knn: cluster radius (default %(default)s)"
    )
    g.add_argument(
        "--knn-temperature",
        type=float,
        default=r.temperature,
        help="knn: softmax temperature of similarities (default %(default)s)",
    )
    g.add_argument(
        "--prior-level",
        type=int,
        default=PriorConfig.level,
        help="prior: S2 level of the densest cell (default %(default)s)",
    )
    g.add_argument(
        "--cells-features", default=c.features, help="cells: store array the head reads (default %(default)s)"
    )
    g.add_argument(
        "--cells-max-count", type=int, default=c.max_count, help="cells: split a cell above this many points"
    )
    g.add_argument(
        "--cells-min-count", type=int, default=c.min_count, help="cells: drop cells below this many points"
    )
    g.add_argument(
        "--cells-hidden", type=int, default=c.hidden, help="cells: MLP hidden size, 0 = linear head"
    )
    g.add_argument(
        "--cells-epochs", type=int, default=c.epochs, help="cells: training epochs (default %(default)s)"
    )
    g.add_argument(
        "--gps-gallery",
        default=GPSGalleryConfig.gallery,
        choices=GPS_GALLERIES,
        help="gps-gallery: coordinates to score (the gallery split, or GeoCLIP's 100K MP16)",
    )
    m = GeoTokenMethodConfig
    g = p.add_argument_group("geotoken (the model)")
    g.add_argument("--model", help="model bundle folder (bundle.json), required for --method geotoken")
    g.add_argument(
        "--strategy",
        nargs="+",
        default=list(m.strategies),
        choices=STRATEGIES,
        help="decoding strategies to evaluate, each a row of the table",
    )
    g.add_argument(
        "--select",
        nargs="+",
        default=list(m.selectors),
        choices=SELECTORS,
        help="selectors applied to beam / sample pools, each a row of the table",
    )
    g.add_argument(
        "--num-samples", type=int, default=m.num_samples, help="samples per image for --strategy sample"
    )
    g.add_argument("--beam-width", type=int, default=m.beam_width, help="beam width for --strategy beam")
    g.add_argument(
        "--retrieved", type=int, default=m.retrieved, help="neighbours' cells pooled for sample+retrieval"
    )
    g.add_argument("--temperature", type=sampling_temperature, default=m.temperature, metavar="T",
                   help=f"sampling temperature, a number or 'paper' ({PAPER_TEMPERATURE}, the authors'); "
                   "default %(default)s")  # fmt: skip
    g.add_argument("--logp-kind", choices=LOGP_KINDS, default=m.logp_kind,
                   help="logp selection by the model's own log-probability (t1) or by the temperature-scaled "
                   "one of the samples (scaled, the authors'; rows 'logp-scaled'); default %(default)s")  # fmt: skip
    g.add_argument("--dtype", default=m.dtype, choices=DTYPES, help="model precision (default %(default)s)")
    g.add_argument("--device", default="auto", help=DEVICE_HELP)
    g.add_argument("--threads", type=count, default=0, help=THREADS_HELP)
    g.add_argument(
        "--constrain",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="decode under the gallery-prefix constraint (every answer a gallery photo's cell; rows labelled "
        "+gallery), or freely with --no-constrain as the paper's authors do (default: constrained)",
    )
    g.add_argument(
        "--free-strategy",
        nargs="+",
        default=list(m.free_strategies),
        choices=STRATEGIES,
        help="strategies also decoded freely, beside the --constrain rows (e.g. greedy: both decodings)",
    )
    add_mllm_arguments(g)  # --select mllm: pool or free generation, the paper's two MLLM rows
    p.set_defaults(func=run)


def run(args) -> int:
    use_threads(args.threads)
    cfg = EvalConfig(
        methods=tuple(dict.fromkeys(args.method)),
        thresholds=tuple(args.thresholds),
        n_boot=args.n_boot,
        seed=args.seed,
        reference=args.reference,
        limit=args.limit,
        plots=not args.no_plots,
        prior=PriorConfig(level=args.prior_level),
        retrieval=RetrievalConfig(args.embedding, args.k, args.knn_radius_km, args.knn_temperature),
        cells=CellsConfig(
            features=args.cells_features,
            max_count=args.cells_max_count,
            min_count=args.cells_min_count,
            hidden=args.cells_hidden,
            epochs=args.cells_epochs,
        ),
        gps_gallery=GPSGalleryConfig(gallery=args.gps_gallery),
        geotoken=GeoTokenMethodConfig(
            model=args.model,
            strategies=tuple(args.strategy),
            selectors=tuple(args.select),
            num_samples=args.num_samples,
            beam_width=args.beam_width,
            retrieved=args.retrieved,
            temperature=args.temperature,
            logp_kind=args.logp_kind,
            dtype=args.dtype,
            constrain=GeoTokenMethodConfig.constrain if args.constrain is None else (args.constrain,),
            free_strategies=tuple(args.free_strategy),
            device=args.device,
            mllm=mllm_changes(args),
        ),
    )
    gallery = load_split(args.gallery, args.gallery_manifest, name="gallery")
    queries = load_split(args.queries, args.queries_manifest, name="queries")
    neighbours = load_neighbours(args.neighbours, gallery, queries) if args.neighbours else None
    result = evaluate(gallery, queries, args.out, cfg, neighbours=neighbours)
    print_tables({k: r.metrics for k, r in result.runs.items()}, result.pairs)
    print(f"wrote {len(result.files)} files to {result.out_dir}")
    return 0

"""`geotoken index build|neighbours`: FAISS index of a store's embeddings, and neighbour tables."""

from __future__ import annotations

import argparse
from pathlib import Path

import faiss

from geotoken.cli import count, first_process
from geotoken.features import FeatureStore
from geotoken.retrieval import (
    DEFAULT_EMBEDDING,
    KINDS,
    REFINE,
    IndexConfig,
    NeighbourIndex,
    build_store_index,
    check_index_target,
    neighbour_table,
)

HELP = "build a FAISS index over a feature store's aligned embeddings, or write neighbour tables with it"

EPILOG = f"""\
examples:
  geotoken index build runs/demo/gallery -o runs/demo/index                  # exact, {DEFAULT_EMBEDDING}
  geotoken index build mp16_store -o mp16_ivfpq --kind ivfpq --nlist 8192 --nprobe 64
  geotoken index neighbours runs/demo/index runs/demo/gallery -o runs/demo/nbrs_train -k 15
  geotoken index neighbours runs/demo/index runs/demo/test -o runs/demo/nbrs_test -k 15 --keep-self

--embedding is one store array (visual, gps, text) or a '+'-joined concatenation. The default
{DEFAULT_EMBEDDING!r} was the most robust for 1-NN geolocation on EarthViews (EfficientNet-Lite0 64 px):
within 0.5-1.5 points of the best on held-out gallery rows (where `gps` wins) and on the strongly changed
test split (where `visual` wins); `geotoken align train` prints these numbers for your data.
Compressed kinds (ivfpq, hnsw) report their recall@k against exact search on sampled store rows.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "index",
        help=HELP,
        description=HELP,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="index_command", required=True, metavar="COMMAND")

    b = sub.add_parser(
        "build",
        help="index a store's embeddings",
        description="Build a FAISS index (flat: exact; ivfpq, hnsw: approximate, their recall@k measured on "
        "sampled store rows and recorded) over a gallery store's aligned embedding(s); writes OUT "
        "(index.faiss, index.json with the store, the embedding and the heads that wrote it).",
    )
    b.add_argument("store", help="feature store with aligned arrays (geotoken align apply)")
    b.add_argument("-o", "--out", required=True, help="index folder (index.faiss, index.json)")
    b.add_argument(
        "--embedding", default=DEFAULT_EMBEDDING, help=f"array(s) to index (default {DEFAULT_EMBEDDING})"
    )
    c = IndexConfig
    b.add_argument("--kind", default=c.kind, choices=KINDS, help="index kind (default %(default)s)")
    b.add_argument("--nlist", type=int, help="ivfpq: inverted lists (default ~4 sqrt(N))")
    b.add_argument("--pq-m", type=int, help="ivfpq: bytes per vector (default D/8)")
    b.add_argument(
        "--nprobe", type=int, default=c.nprobe, help="ivfpq: lists searched per query (default %(default)s)"
    )
    b.add_argument("--hnsw-m", type=int, default=c.hnsw_m, help="hnsw: graph degree (default %(default)s)")
    b.add_argument(
        "--ef-search", type=int, default=c.ef_search, help="hnsw: search beam (default %(default)s)"
    )
    b.add_argument("-k", "--k", type=int, default=15, help="k of the reported recall@k (default 15)")
    b.add_argument("--recall-queries", type=int, default=1000, help="store rows sampled to measure recall")
    b.add_argument("--threads", type=count, default=0, help="FAISS threads (default 0: FAISS's choice)")
    b.add_argument("--overwrite", action="store_true", help="replace an index already in --out")
    b.set_defaults(func=run_build)

    n = sub.add_parser(
        "neighbours",
        help="top-k gallery rows of every row of a query store",
        description="Write the neighbour table of a query store: the top-k gallery rows and similarities of "
        "every query row (index.npy, sims.npy), which training, evaluation and calibration read. Training "
        "queries drop their own gallery row (and exact duplicates) unless --keep-self; resumes a killed "
        "run; shared between the processes of a torchrun job.",
    )
    n.add_argument("index", help="index folder (geotoken index build)")
    n.add_argument("queries", help="query feature store (the gallery itself for training neighbours)")
    n.add_argument("-o", "--out", required=True, help="output folder (neighbours.json, index.npy, sims.npy)")
    n.add_argument("-k", "--k", type=int, default=15, help="neighbours per query (default 15, as the paper)")
    n.add_argument("--keep-self", action="store_true",
                   help="test-time queries: do not drop the query's own id and exact duplicates")  # fmt: skip
    n.add_argument("--exclude-same-place", action="store_true",
                   help="also drop gallery rows at exactly the query's coordinates (training queries that are "
                   "other photos of gallery places)")  # fmt: skip
    n.add_argument("--gallery", help="gallery store (default: the one the index was built from)")
    n.add_argument("--batch-size", type=int, default=1024, help="queries per search batch (default 1024)")
    n.add_argument("--refine", type=int, default=REFINE,
                   help=f"ivfpq/hnsw: re-rank REFINE x k candidates by exact vectors read from the gallery store, "
                        f"as prediction does (default {REFINE}; 1: the index's own order)")  # fmt: skip
    n.add_argument("--nprobe", type=int, help="ivfpq: override the index's nprobe")
    n.add_argument("--ef-search", type=int, help="hnsw: override the index's search beam")
    n.add_argument("--overwrite", action="store_true",
                   help="replace a finished table of other queries or options in --out")  # fmt: skip
    n.add_argument("--threads", type=count, default=0, help="FAISS threads (default 0: FAISS's choice)")
    n.set_defaults(func=run_neighbours)


def run_build(args) -> int:
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    check_index_target(Path(args.out), overwrite=args.overwrite)
    options = {"nlist": args.nlist, "pq_m": args.pq_m, "nprobe": args.nprobe, "hnsw_m": args.hnsw_m,
               "ef_search": args.ef_search}  # fmt: skip
    index = build_store_index(FeatureStore.open(args.store), args.embedding, args.kind, recall_k=args.k,
                              recall_queries=args.recall_queries, progress=True, **options)  # fmt: skip
    index.save(args.out)
    m = index.meta
    recall = "".join(f", {key} {value:.3f}" for key, value in m.items() if key.startswith("recall@"))
    shape = ""
    if m["kind"] == "ivfpq":  # what was built: fewer lists / bits than asked when the rows cannot train them
        fewer = (
            " (fewer than asked: too few rows to train more)"
            if args.nlist and m["nlist"] < args.nlist
            else ""
        )
        shape = f", nlist {m['nlist']:,}{fewer}, pq {m['pq_m']} x {m['pq_bits']} bits"
    print(f"{args.out}: {m['kind']} index of {m['indexed']:,} rows ({m['dim']}-d {m['embedding']}){shape}{recall}, "
          f"built in {m['build_seconds']:.1f} s")  # fmt: skip
    return 0


def run_neighbours(args) -> int:
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    index = NeighbourIndex.load(args.index, nprobe=args.nprobe, ef_search=args.ef_search)
    gallery = FeatureStore.open(args.gallery) if args.gallery else None
    table = neighbour_table(
        FeatureStore.open(args.queries),
        index,
        args.k,
        args.out,
        exclude_self_ids=not args.keep_self,
        gallery_store=gallery,
        batch_size=args.batch_size,
        refine=args.refine,
        exclude_same_place=args.exclude_same_place,
        overwrite=args.overwrite,
    )
    if first_process():  # under torchrun, one summary
        print(
            f"{table.root}: {table.rows.shape[0]} queries x {table.k} neighbours ({index.meta.get('embedding')})"
        )
    return 0

"""`geotoken bench index`: flat vs IVF-PQ vs HNSW on random 768-d unit vectors, measured in one run."""

from __future__ import annotations

import json

from geotoken.bench.index import DATA, bench_index
from geotoken.cli import count
from geotoken.retrieval.index import KINDS, REFINE


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "index",
        help="index build time, memory, queries/s and recall@15 for flat / ivfpq / hnsw",
        description="Build time, index size, peak memory, queries/s and recall@k (against exact brute-force search) of each FAISS index "
        "kind on the same random gallery. --rows 4700000 --data clustered "
        "simulates MP16: the vectors go to a float16 file (--vectors, or a temporary one above 1M rows) and are "
        "indexed from it, so memory stays at the index plus a block (flat still holds 14 GB).",
    )
    p.add_argument("--rows", type=int, default=100_000, help="gallery vectors (default 100000)")
    p.add_argument("--dim", type=int, default=768, help="dimension (default 768, the paper's embeddings)")
    p.add_argument("--queries", type=int, default=1000, help="query vectors (default 1000)")
    p.add_argument("-k", "--k", type=int, default=15, help="neighbours per query (default 15)")
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--data", default=DATA[0], choices=DATA,
                   help="uniform random unit vectors (worst case) or clustered ones (closer to real embeddings)")  # fmt: skip
    p.add_argument("--nlist", type=int, help="ivfpq lists (default ~4 sqrt(rows))")
    p.add_argument("--pq-m", type=int, help="ivfpq bytes per vector (default dim/8)")
    p.add_argument(
        "--train-rows", type=int, help="ivfpq: rows sampled to train the quantisers (default 262144)"
    )
    p.add_argument("--nprobe", type=int, help="ivfpq lists searched (default 32)")
    p.add_argument("--ef-search", type=int, help="hnsw search beam (default 128)")
    p.add_argument("--refine", type=int, default=REFINE,
                   help=f"also time ivfpq re-ranking REFINE x k candidates by exact vectors (0: skip; default {REFINE})")  # fmt: skip
    p.add_argument(
        "--vectors",
        help="float16 .npy file holding the gallery (written once, reused while it "
        "matches --rows/--dim/--data; default: in memory up to 1M rows, a temporary file above)",
    )
    p.add_argument("--threads", type=count, default=0, help="FAISS threads (default 0: FAISS's choice)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args) -> int:
    result = bench_index(
        args.rows, args.dim, args.queries, args.k, tuple(args.kinds), args.threads, args.data, progress=not args.json,
        refine=args.refine, vectors=args.vectors,
        nlist=args.nlist, pq_m=args.pq_m, train_rows=args.train_rows, nprobe=args.nprobe, ef_search=args.ef_search,
    )  # fmt: skip
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{result['rows']} x {result['dim']} {result['data']} vectors, {result['queries']} queries, "
          f"k={result['k']}, {result['threads']} threads, {result['storage']}, exact search {result['exact_s'] if result['exact_s'] is not None else 'reused'} s")  # fmt: skip
    print(f"{'kind':<14}{'build s':>9}{'index MB':>10}{'peak RSS MB':>12}{'private MB':>11}{'queries/s':>11}"
          f"{'recall@' + str(args.k):>11}{'sim ratio':>10}")  # fmt: skip
    for kind, r in result["kinds"].items():
        print(f"{kind:<14}{r['build_s']:>9.1f}{r['index_mb']:>10.1f}{r['peak_rss_mb']:>12.0f}{r['peak_anon_mb']:>11.0f}"
              f"{r['queries_per_s']:>11.0f}{r[f'recall@{args.k}']:>11.3f}{r['sim_ratio']:>10.4f}")  # fmt: skip
    return 0

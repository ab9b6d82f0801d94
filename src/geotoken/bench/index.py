"""Index benchmark: build time, memory, queries/s and recall@k of flat vs IVF-PQ vs HNSW, side by side.

The gallery is random unit vectors (default 100K x 768, the paper's embedding size; `rows=4_700_000`
simulates MP16), generated block by block from a seed so a 4.7M gallery never exists twice in memory.
Uniform random vectors are the hardest case for approximate search (no cluster structure to exploit),
so `data="clustered"` is offered as a closer stand-in for real embeddings.
"""

from __future__ import annotations

import time
from typing import Any

import faiss
import numpy as np

from geotoken.retrieval.index import KINDS, NeighbourIndex, recall_at_k

BLOCK = 65536
DATA = ("random", "clustered")  # what `RandomUnitVectors` draws: uniform unit vectors, or around centres


class RandomUnitVectors:
    """(n, dim) float32 unit vectors, row block b drawn from seed (seed, b): indexable without storing them."""

    def __init__(
        self,
        n: int,
        dim: int,
        seed: int = 0,
        data: str = "random",
        clusters: int = 1000,
        centre_seed: int = 0,
    ):
        self.shape, self.seed, self.data = (n, dim), seed, data
        self.centres = (
            np.random.default_rng([centre_seed, 10**9]).standard_normal((clusters, dim)).astype(np.float32)
        )

    def __len__(self) -> int:
        return self.shape[0]

    def block(self, b: int) -> np.ndarray:
        n, dim = self.shape
        rng = np.random.default_rng([self.seed, b])
        m = min(BLOCK, n - b * BLOCK)
        x = rng.standard_normal((m, dim), dtype=np.float32)
        if self.data == "clustered":
            x = self.centres[rng.integers(0, len(self.centres), m)] + 0.5 * x
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def __getitem__(self, rows) -> np.ndarray:
        rows = np.arange(*rows.indices(self.shape[0])) if isinstance(rows, slice) else np.asarray(rows)
        out = np.empty((len(rows), self.shape[1]), dtype=np.float32)
        blocks = rows // BLOCK
        for b in np.unique(blocks):
            sel = blocks == b
            out[sel] = self.block(int(b))[rows[sel] - b * BLOCK]
        return out


def bench_index(
    rows: int = 100_000,
    dim: int = 768,
    queries: int = 1000,
    k: int = 15,
    kinds: tuple[str, ...] = KINDS,
    threads: int = 0,
    data: str = "random",
    seed: int = 0,
    progress: bool = False,
    refine: int = 4,
    **options: Any,
) -> dict[str, Any]:
    """{rows, dim, queries, k, data, threads, kinds: {kind: {build_s, index_mb, queries_per_s, recall@<k>,
    and nlist / pq_m / pq_bits where the index has them}}}: recall@k against flat (always built, reported
    only when in `kinds`). threads 0: FAISS's current setting; options: index build/search options (None
    values dropped).

    With `refine`, an extra row "ivfpq+refine": the same IVF-PQ index re-ranking refine * k candidates by
    their exact vectors (skipped above 1M rows, where the benchmark cannot hold the vectors in RAM).
    """
    if threads:
        faiss.omp_set_num_threads(threads)
    gallery = RandomUnitVectors(rows, dim, seed, data, centre_seed=seed)
    q = RandomUnitVectors(queries, dim, seed + 1, data, centre_seed=seed)[:]  # same clusters, other draws
    results, exact = {}, None
    for kind in ("flat", *[k_ for k_ in kinds if k_ != "flat"]):
        t0 = time.perf_counter()
        index = NeighbourIndex.build(gallery, kind, batch_size=BLOCK, progress=progress,
                                     **{key: v for key, v in options.items() if v is not None})  # fmt: skip
        build = time.perf_counter() - t0
        index.search(q[:10], k)  # warm-up
        t0 = time.perf_counter()
        found, _ = index.search(q, k)
        search = time.perf_counter() - t0
        if kind == "flat":
            exact = found
        if kind in kinds:
            results[kind] = {
                "build_s": round(build, 3),
                "index_mb": round(index.nbytes() / 2**20, 1),
                "queries_per_s": round(queries / search, 1),
                f"recall@{k}": round(recall_at_k(found, exact), 4),
                **{key: index.meta[key] for key in ("nlist", "pq_m", "pq_bits") if key in index.meta},
            }
        if (
            kind == "ivfpq" and refine and rows <= 1_000_000
        ):  # re-rank from exact vectors (RAM here, disk in use)
            vectors = gallery[:]
            t0 = time.perf_counter()
            found, _ = index.search(q, k, exact=vectors, refine=refine)
            results["ivfpq+refine"] = {
                **results["ivfpq"],
                "queries_per_s": round(queries / (time.perf_counter() - t0), 1),
                f"recall@{k}": round(recall_at_k(found, exact), 4),
                "refine": refine,
            }
            del vectors
        del index
    return {
        "rows": rows,
        "dim": dim,
        "queries": queries,
        "k": k,
        "data": data,
        "threads": threads or faiss.omp_get_max_threads(),
        "kinds": results,
    }

"""Index benchmark: build time, peak memory, queries/s and recall@k of flat vs IVF-PQ vs HNSW, side by side.

The gallery is random unit vectors (default 100K x 768, the paper's embedding size; `rows=4_700_000`
simulates MP16), generated block by block from a seed so a 4.7M gallery never exists twice in memory.
Uniform random vectors are the hardest case for approximate search (no cluster structure to exploit),
so `data="clustered"` is offered as a closer stand-in for real embeddings.

With `vectors=FILE` (automatic above 1M rows) the gallery is written once to FILE as a float16 `.npy`, as
a feature store holds it, and every index is built and re-ranked from that file through a memmap opened
per block: private memory stays at a block plus the index, which is what `peak_anon_mb` shows
(`peak_rss_mb` also counts the file's pages mapped while reading it: page cache the kernel reclaims, which
random row gathers over the whole file, as in training the quantisers and in re-ranking, bring to GBs).
The recall reference is an exact brute-force search streamed over the same blocks (no 14 GB flat index).
`sim_ratio` says how close the misses are: the mean exact similarity of the rows an index returns over
that of the true top-k (1.0: as similar as the exact neighbours, whether or not the same rows).
"""

from __future__ import annotations

import contextlib
import os
import resource
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from tqdm import tqdm

from geotoken.errors import GeoTokenError
from geotoken.features.store import read_rows
from geotoken.io import atomic_path, read_json, write_json
from geotoken.retrieval.index import KINDS, REFINE, IndexConfig, NeighbourIndex, recall_at_k

BLOCK = 65536
DATA = ("random", "clustered")  # what `RandomUnitVectors` draws: uniform unit vectors, or around centres
IN_MEMORY_ROWS = 1_000_000  # above this the gallery goes to a float16 file unless one is named


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


class DiskVectors:
    """A generator's vectors as a float16 `.npy` at `path`, written block by block (kept, and reused while
    `path.json` records the same generator), read through a memmap opened per read so that the pages a
    read touched leave the process with it: the resident set stays at one block however large the file."""

    def __init__(self, path: str | os.PathLike, source: RandomUnitVectors, progress: bool = False):
        self.path, self.shape = Path(path), source.shape
        identity = {"rows": source.shape[0], "dim": source.shape[1], "seed": source.seed, "data": source.data}
        meta = self.path.with_name(self.path.name + ".json")
        self.generate_s, self.reused = 0.0, True
        if self.path.is_file() and meta.is_file() and read_json(meta) == identity:
            return
        t0 = time.perf_counter()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path) as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=source.shape)
            del out  # header written; blocks go in through fresh maps below
            for b in tqdm(
                range(-(-source.shape[0] // BLOCK)), desc="vectors", unit="block", disable=not progress
            ):
                out = np.load(tmp, mmap_mode="r+")
                out[b * BLOCK : b * BLOCK + BLOCK] = source.block(b)
                out.flush()
                del out
        write_json(meta, identity)
        self.generate_s, self.reused = time.perf_counter() - t0, False

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        """float32 rows (a slice or an index array), read from the file."""
        array = np.load(self.path, mmap_mode="r")
        try:
            return read_rows(array, rows)
        finally:
            del array


def exact_search(
    vectors, queries: np.ndarray, k: int, block: int = 32768, progress: bool = False
) -> np.ndarray:
    """Exact top-k rows (Q, k) by inner product, streamed over blocks of `vectors` (N, D): the recall
    reference without holding the gallery (or a flat index of it) in memory."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    best_s = np.full((len(q), k), -np.inf, dtype=np.float32)
    best_r = np.full((len(q), k), -1, dtype=np.int64)
    starts = range(0, len(vectors), block)
    for start in tqdm(starts, desc="exact search", unit="block", disable=not progress):
        s = q @ vectors[start : start + block].T  # (Q, m)
        kk = min(k, s.shape[1])
        top = np.argpartition(-s, kk - 1, axis=1)[:, :kk]  # the block's own top-k first
        cand_s = np.concatenate([best_s, np.take_along_axis(s, top, axis=1)], axis=1)  # (Q, k + kk)
        cand_r = np.concatenate([best_r, top + start], axis=1)
        keep = np.argpartition(-cand_s, k - 1, axis=1)[:, :k]
        best_s, best_r = np.take_along_axis(cand_s, keep, axis=1), np.take_along_axis(cand_r, keep, axis=1)
    order = np.argsort(-best_s, axis=1, kind="stable")
    return np.take_along_axis(best_r, order, axis=1)


def _reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS counter of this process (Linux >= 4.0); False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_kb(*fields: str) -> dict[str, int]:
    """Fields of /proc/self/status in kB (empty off Linux)."""
    out = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in fields:
                out[name] = int(value.split()[0])
    return out


def peak_rss_mb() -> float:
    """Peak resident set of this process since the last reset (VmHWM), or since it started."""
    hwm = _status_kb("VmHWM").get("VmHWM")
    return hwm / 1024 if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class MemoryPeak:
    """Peak memory while the block runs: `rss_mb` (VmHWM: every mapped page, a memmap's included) and
    `anon_mb` (the largest private RssAnon seen, sampled every `every` seconds by a thread)."""

    def __init__(self, every: float = 0.02):
        self.every, self.anon_mb, self.rss_mb = every, 0.0, 0.0
        self._stop = threading.Event()

    def _watch(self) -> None:
        while not self._stop.is_set():
            anon = _status_kb("RssAnon").get("RssAnon", 0) / 1024
            self.anon_mb = max(self.anon_mb, anon)
            self._stop.wait(self.every)

    def __enter__(self) -> MemoryPeak:
        _reset_peak_rss()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._watch_once()
        self.rss_mb = peak_rss_mb()

    def _watch_once(self) -> None:
        self.anon_mb = max(self.anon_mb, _status_kb("RssAnon").get("RssAnon", 0) / 1024)


def _exact_sims(gallery, q: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Exact inner products (Q, k) of the queries with the gallery rows (Q, k) found for them (-1: 0)."""
    vectors = gallery[np.maximum(rows, 0).reshape(-1)].reshape(*rows.shape, -1)  # (Q, k, D)
    return np.where(rows >= 0, np.einsum("qd,qkd->qk", q, vectors), 0.0)


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
    refine: int = REFINE,
    vectors: str | os.PathLike | None = None,
    **options: Any,
) -> dict[str, Any]:
    """{rows, dim, queries, k, data, threads, storage, [generate_s,] exact_s, kinds: {kind: {build_s,
    index_mb, peak_rss_mb, peak_anon_mb, queries_per_s, recall@<k>, sim_ratio, and nlist / pq_m / pq_bits
    where the index has them}}}:
    recall@k against exact brute-force search. threads 0: FAISS's current setting; options: index
    build/search options (None values dropped).

    vectors: a float16 `.npy` file to hold the gallery (see `DiskVectors`); above 1M rows a temporary one
    is used (and removed) when none is named. A named file also keeps the exact search's answer beside it
    (`exact_s` None: reused). peak_rss_mb / peak_anon_mb: the process's peak resident set / private memory
    while that index was built and searched (see the module docstring).
    With `refine`, an extra row "ivfpq+refine": the same IVF-PQ index re-ranking refine * k candidates by
    their exact vectors (from the file, or from memory up to 1M rows).
    """
    sizes = {"rows": rows, "dim": dim, "queries": queries, "k": k}
    for name, value in sizes.items():
        if value < 1:
            raise GeoTokenError(f"bench index: {name} must be >= 1, got {value}")
    if refine < 0 or data not in DATA or any(kind not in KINDS for kind in kinds):
        raise GeoTokenError(
            f"bench index: need refine >= 0 (got {refine}), data in {DATA} (got {data!r}), "
            f"kinds in {KINDS} (got {tuple(kinds)})"
        )
    if k > rows:
        raise GeoTokenError(f"bench index: k {k} is more than the {rows} gallery rows (recall@k would be 1)")
    pq_m = options.get("pq_m")
    if "ivfpq" in kinds and pq_m and dim % pq_m:
        raise GeoTokenError(f"bench index: pq_m {pq_m} must divide the dimension {dim}")
    for kind in kinds:  # the index options, before minutes of vector generation and exact search
        IndexConfig(kind=kind, **{key: v for key, v in options.items() if v is not None})
    if threads:
        faiss.omp_set_num_threads(threads)
    source = RandomUnitVectors(rows, dim, seed, data, centre_seed=seed)
    q = RandomUnitVectors(queries, dim, seed + 1, data, centre_seed=seed)[:]  # same clusters, other draws
    with contextlib.ExitStack() as stack:
        if vectors is None and rows > IN_MEMORY_ROWS:
            vectors = (
                Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-index-"))) / "gallery.npy"
            )
        gallery = source if vectors is None else DiskVectors(vectors, source, progress)
        head: dict[str, Any] = {"storage": "generated" if vectors is None else "float16 file"}
        if vectors is not None:
            head["generate_s"] = None if gallery.reused else round(gallery.generate_s, 1)
            head["vectors_gb"] = round(os.path.getsize(vectors) / 1e9, 2)
        t0 = time.perf_counter()
        cache = (
            None if vectors is None else Path(f"{vectors}.exact-q{queries}-k{k}.npy")
        )  # same file, same queries
        if cache is not None and cache.is_file() and not gallery.reused:
            cache.unlink()
        if cache is not None and cache.is_file():
            exact, head["exact_s"] = np.load(cache), None
        else:
            exact = exact_search(gallery, q, k, progress=progress)
            head["exact_s"] = round(time.perf_counter() - t0, 1)
            if cache is not None:
                with atomic_path(cache) as tmp, open(tmp, "wb") as f:
                    np.save(f, exact)
        results = _bench_kinds(gallery, q, exact, k, kinds, refine, progress, vectors is not None, options)
    return {
        "rows": rows,
        "dim": dim,
        "queries": queries,
        "k": k,
        "data": data,
        "threads": threads or faiss.omp_get_max_threads(),
        **head,
        "kinds": results,
    }


def _bench_kinds(gallery, q, exact, k, kinds, refine, progress, on_disk, options) -> dict[str, Any]:
    results = {}
    best = _exact_sims(gallery, q, exact).mean()

    def figures(found: np.ndarray, seconds: float, peak: MemoryPeak) -> dict[str, Any]:
        return {
            "peak_rss_mb": round(peak.rss_mb, 1),
            "peak_anon_mb": round(peak.anon_mb, 1),
            "queries_per_s": round(len(q) / seconds, 1),
            f"recall@{k}": round(recall_at_k(found, exact), 4),
            "sim_ratio": round(float(_exact_sims(gallery, q, found).mean() / best), 4),
        }

    for kind in kinds:
        with MemoryPeak() as peak:
            t0 = time.perf_counter()
            index = NeighbourIndex.build(gallery, kind, batch_size=BLOCK, progress=progress,
                                         **{key: v for key, v in options.items() if v is not None})  # fmt: skip
            build = time.perf_counter() - t0
            index.search(q[:10], k)  # warm-up
            t0 = time.perf_counter()
            found, _ = index.search(q, k)
            search = time.perf_counter() - t0
        results[kind] = {
            "build_s": round(build, 3),
            "index_mb": round(index.nbytes() / 2**20, 1),
            **figures(found, search, peak),
            **{key: index.meta[key] for key in ("nlist", "pq_m", "pq_bits") if key in index.meta},
        }
        if kind == "ivfpq" and refine and (on_disk or len(gallery) <= IN_MEMORY_ROWS):
            vectors = gallery if on_disk else gallery[:]  # exact re-ranking from the file (or RAM)
            with MemoryPeak() as peak:
                t0 = time.perf_counter()
                found, _ = index.search(q, k, exact=vectors, refine=refine)
                search = time.perf_counter() - t0
            results["ivfpq+refine"] = {**results["ivfpq"], **figures(found, search, peak), "refine": refine}
            del vectors
        del index
    return results

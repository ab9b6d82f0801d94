"""FAISS nearest-neighbour search over L2-normalised embeddings (inner product = cosine similarity).

Three kinds, one interface:
- `flat`: exact search; the default and the reference the others are measured against.
- `ivfpq`: inverted lists + product quantisation: ~D/8 bytes per vector, for galleries in the millions.
- `hnsw`: graph search over the full vectors: fast queries, more memory than flat.

Vectors are added with their gallery row as FAISS id (an `IndexIDMap`), so rows left out of the index
(unreadable images) never shift the numbering: `search` returns gallery rows directly.

GPUs: with the `faiss-gpu` wheel (`pip install 'geotoken[gpu]'`) and a GPU in sight (`faiss_gpus()`),
IVF-PQ's k-means runs on the GPU and flat / IVF-PQ searches run on a GPU copy of the index (this rank's
GPU under torchrun); the saved index is the same CPU index either way, so a bundle built on a GPU box
loads anywhere. Results agree with the CPU's within the index's recall (float16 lookup tables, other
summation order); the CPU wheel, or no GPU, is the CPU path unchanged.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from tqdm import tqdm

from geotoken.devices import local_rank
from geotoken.errors import GeoTokenError
from geotoken.features.store import read_rows
from geotoken.io import atomic_path, is_whole, plain, read_json, write_json

KINDS = ("flat", "ivfpq", "hnsw")
INDEX_FILE, META_FILE = "index.faiss", "index.json"
GPU_KINDS = ("flat", "ivfpq")  # FAISS has no GPU HNSW
# a compressed index re-ranks REFINE x k candidates by their exact vectors wherever it is searched: neighbour
# tables (training, evaluation) and prediction alike, so a model meets at test time the neighbours it was
# trained on (at MP16's size, recall@15 0.09 -> 0.21 for ~15 % fewer queries/s: BENCHMARKS.md)
REFINE = 4
GPU_MAX_K = 2048  # FAISS's GPU top-k limit; deeper searches stay on the CPU


def faiss_gpus() -> int:
    """GPUs FAISS can use: 0 with the CPU wheel (no `get_num_gpus`) or on a box without one."""
    count = getattr(faiss, "get_num_gpus", None)
    try:
        return int(count()) if count is not None else 0
    except RuntimeError:  # a GPU wheel without a usable driver
        return 0


def _gpu_resources():
    """FAISS's GPU memory and streams (one per index copy; kept alive by the object that uses it)."""
    return faiss.StandardGpuResources()


def _to_gpu(index: faiss.Index, kind: str):
    """(GPU copy of a CPU flat / IVF-PQ index on this rank's GPU, the resources it lives on).

    IVF-PQ uses float16 lookup tables: needed for codes over 48 bytes (the default 96 for 768-d), which
    otherwise exceed a block's shared memory. Flat stays float32 (exact)."""
    res = _gpu_resources()
    options = faiss.GpuClonerOptions()
    options.useFloat16 = kind == "ivfpq"
    return faiss.index_cpu_to_gpu(res, local_rank() % faiss_gpus(), index, options), res


def _gpu_flat(dim: int):
    """(exact inner-product GPU index, its resources): the assignment step of IVF k-means on the GPU."""
    return _to_gpu(faiss.IndexFlatIP(dim), "flat")


@dataclass
class IndexConfig:
    """Index kind and its parameters; None means "chosen from the gallery size and dimension"."""

    kind: str = "flat"
    nlist: int | None = None  # ivfpq: number of inverted lists (default ~4 sqrt(N), a power of two)
    pq_m: int | None = None  # ivfpq: sub-quantisers, bytes per vector (default: largest divisor of D <= D/8)
    pq_bits: int = 8  # ivfpq: bits per sub-quantiser code
    nprobe: int = 32  # ivfpq: lists visited per query
    train_rows: int = 262_144  # ivfpq: rows sampled to train the coarse quantiser and PQ codebooks
    hnsw_m: int = 32  # hnsw: graph degree
    ef_construction: int = 80  # hnsw: build-time beam
    ef_search: int = 128  # hnsw: query-time beam
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise GeoTokenError(f"index kind {self.kind!r} is not one of {', '.join(KINDS)}")
        # FAISS aborts the process (hnsw_m 0), hangs (hnsw_m < 0) or raises from C++ on these
        least = {"nlist": 1, "pq_m": 1, "nprobe": 1, "train_rows": 1, "hnsw_m": 2, "ef_construction": 1,
                 "ef_search": 1}  # fmt: skip
        for name, low in least.items():
            value = getattr(self, name)
            if value is not None and not is_whole(value, low):
                raise GeoTokenError(f"index option {name} must be an integer >= {low}, got {value!r}")
        if not isinstance(self.pq_bits, int) or not 1 <= self.pq_bits <= 16:
            raise GeoTokenError(f"index option pq_bits must be an integer in 1..16, got {self.pq_bits!r}")


def _ivfpq_shape(config: IndexConfig, n: int, dim: int) -> tuple[int, int, int]:
    """(nlist, pq_m, pq_bits) with enough training rows (FAISS wants >= 39 per centroid)."""
    n_train = min(n, config.train_rows)
    nlist = config.nlist or 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n))))
    nlist = max(1, min(nlist, n_train // 39))
    m = config.pq_m or max(d for d in range(1, max(1, dim // 8) + 1) if dim % d == 0)
    if dim % m:
        raise GeoTokenError(f"ivfpq: pq_m={m} must divide the embedding dimension {dim}")
    bits = config.pq_bits
    while bits > 1 and 39 * 2**bits > n_train:
        bits -= 1
    return nlist, m, bits


def check_index_target(out_dir: Path, overwrite: bool = False) -> None:
    """An index folder holds index.faiss and index.json only: refuse a file, a folder with other things
    (a bundle, a feature store), or (unless `overwrite`) an index already built (hours of IVF-PQ training
    at MP16 size), before an hour of building, not after it."""
    meta = out_dir / META_FILE
    if meta.is_file() and not overwrite:
        was = read_json(meta)
        was = was if isinstance(was, dict) else {}
        raise GeoTokenError(
            f"{out_dir}: holds an index already ({was.get('kind', '?')} over {was.get('indexed', '?')} rows of "
            f"{was.get('embedding', '?')}); pass --overwrite to replace it, or write to a new folder"
        )
    if out_dir.is_file():
        raise GeoTokenError(f"{out_dir}: is a file; name a folder for the index")
    other = (
        sorted(p.name for p in out_dir.iterdir() if p.name not in (INDEX_FILE, META_FILE))
        if out_dir.is_dir()
        else []
    )
    other = [name for name in other if not name.startswith(".")]  # a killed save's temporary file
    if other:
        raise GeoTokenError(
            f"{out_dir}: holds {', '.join(other[:3])}{' ...' if len(other) > 3 else ''}, not an index; write the "
            "index to a new or empty folder"
        )


class NeighbourIndex:
    """A FAISS index whose ids are gallery rows. `search(queries (B, D), k) -> rows int64, sims float32`."""

    def __init__(self, index: faiss.Index, config: IndexConfig, meta: dict[str, Any]):
        self.index, self.config, self.meta = index, config, meta
        self._set_search_params()
        self._gpu = None  # (GPU copy of the wrapped index, its id map, resources), made on first search

    def _searcher(self, depth: int):
        """(index to search, ids of its positions or None): a GPU copy where FAISS has a GPU for this kind."""
        if (
            depth > GPU_MAX_K
            or self.config.kind not in GPU_KINDS
            or faiss_gpus() == 0
            or not isinstance(self.index, faiss.IndexIDMap)
        ):
            return self.index, None
        if self._gpu is None:
            inner = faiss.downcast_index(self.index.index)
            gpu, res = _to_gpu(inner, self.config.kind)
            if self.config.kind == "ivfpq":
                gpu.nprobe = self.config.nprobe
            self._gpu = (gpu, faiss.vector_to_array(self.index.id_map).astype(np.int64), res)
        return self._gpu[0], self._gpu[1]

    @property
    def dim(self) -> int:
        return self.index.d

    @property
    def size(self) -> int:
        """Number of vectors in the index."""
        return self.index.ntotal

    def _set_search_params(self) -> None:
        params = faiss.ParameterSpace()
        if self.config.kind == "ivfpq":
            params.set_index_parameter(self.index, "nprobe", self.config.nprobe)
        elif self.config.kind == "hnsw":
            params.set_index_parameter(self.index, "efSearch", self.config.ef_search)

    @classmethod
    def build(
        cls,
        embeddings: np.ndarray,
        kind: str = "flat",
        valid: np.ndarray | None = None,
        batch_size: int = 65536,
        progress: bool = True,
        meta: dict[str, Any] | None = None,
        **options: Any,
    ) -> NeighbourIndex:
        """Index the rows of `embeddings` (N, D) (any float dtype, e.g. a float16 memmap) where `valid`.

        `options` are IndexConfig fields (nlist, pq_m, nprobe, hnsw_m, ef_search, ...); `meta` is kept in
        index.json (e.g. which store and embedding this is).
        """
        unknown = sorted(set(options) - {f.name for f in fields(IndexConfig)})
        if unknown:
            raise GeoTokenError(
                f"index option(s) {unknown}: known {sorted(f.name for f in fields(IndexConfig))}"
            )
        config = IndexConfig(kind=kind, **options)
        if not hasattr(embeddings, "shape"):  # a list of rows
            embeddings = np.asarray(embeddings, dtype=np.float32)
        if len(embeddings.shape) != 2:
            raise GeoTokenError(f"index: embeddings must be (N, D), got shape {embeddings.shape}")
        n, dim = embeddings.shape
        rows = np.arange(n, dtype=np.int64) if valid is None else np.flatnonzero(valid).astype(np.int64)
        if len(rows) == 0:
            raise GeoTokenError("cannot build an index over 0 rows")
        info: dict[str, Any] = {}
        if kind == "flat":
            base = faiss.IndexFlatIP(dim)
        elif kind == "hnsw":
            base = faiss.IndexHNSWFlat(dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            base.hnsw.efConstruction = config.ef_construction
        else:
            nlist, m, bits = _ivfpq_shape(config, len(rows), dim)
            info = {"nlist": nlist, "pq_m": m, "pq_bits": bits}
            base = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, nlist, m, bits, faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(config.seed)
            sample = np.sort(rng.choice(rows, size=min(len(rows), config.train_rows), replace=False))
            base.cp.seed = base.pq.cp.seed = config.seed
            assign = faiss_gpus() > 0 and _gpu_flat(dim)  # (GPU index, its resources), held while training
            if assign:  # the coarse k-means' nearest-centroid search, the bulk of training, on the GPU
                base.clustering_index = assign[0]  # FAISS keeps a bare pointer: `assign` keeps it alive
            base.train(read_rows(embeddings, sample))
            if assign:
                base.clustering_index = None
            del assign
        index = faiss.IndexIDMap(base)
        for start in tqdm(
            range(0, len(rows), batch_size), desc=f"index {kind}", unit="batch", disable=not progress
        ):
            chunk = rows[start : start + batch_size]
            index.add_with_ids(read_rows(embeddings, chunk), chunk)
        meta = {"kind": kind, "dim": dim, "gallery_rows": n, "indexed": len(rows), **info, **(meta or {})}
        return cls(index, config, meta)

    def search(
        self,
        queries: np.ndarray,
        k: int,
        batch_size: int = 8192,
        progress: bool = False,
        exact: np.ndarray | None = None,
        refine: int = REFINE,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k gallery rows and similarities of each query, best first: (B, k) int64, (B, k) float32.

        exact: the indexed vectors (N, D), e.g. the store's memmap. A compressed index then fetches
        k * refine candidates and re-ranks them by their exact inner product: the recall of PQ codes
        at the memory of PQ codes, the vectors staying on disk. Missing hits are row -1, similarity -inf.
        """
        if not hasattr(queries, "shape"):  # a list of rows
            queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim != 2:
            raise GeoTokenError(f"search: queries must be (B, D), got shape {queries.shape}")
        n, dim = queries.shape
        k = plain(k)  # FAISS takes a Python int
        if not is_whole(k):
            raise GeoTokenError(f"search: k must be a whole number >= 1, got {k!r}")
        if dim != self.dim:
            raise GeoTokenError(f"queries have dimension {dim}, the index {self.dim}")
        depth = k * refine if exact is not None and self.config.kind != "flat" and refine > 1 else k
        batch_size = batch_size if depth == k else min(batch_size, 1024)  # bounds the (B, depth, D) gather
        rows = np.empty((n, k), dtype=np.int64)
        sims = np.empty((n, k), dtype=np.float32)
        index, ids = self._searcher(depth)
        for start in tqdm(range(0, n, batch_size), desc="search", unit="batch", disable=not progress):
            stop = min(n, start + batch_size)
            q = read_rows(queries, slice(start, stop))  # (B, D)
            s, r = index.search(q, depth)  # (B, depth)
            if ids is not None:  # positions in the GPU copy -> gallery rows
                r = np.where(r >= 0, ids[np.maximum(r, 0)], -1)
            if depth > k:
                cand = read_rows(exact, np.maximum(r, 0))  # (B, depth, D)
                s = np.einsum("bd,bkd->bk", q, cand)
                s[r < 0] = -np.inf
                order = np.argsort(-s, axis=1, kind="stable")[:, :k]
                r, s = np.take_along_axis(r, order, axis=1), np.take_along_axis(s, order, axis=1)
            rows[start:stop], sims[start:stop] = r, s
        sims[rows < 0] = -np.inf
        return rows, sims

    def save(self, out_dir: str | os.PathLike) -> Path:
        out_dir = Path(out_dir)
        check_index_target(out_dir, overwrite=True)  # replaces an index (`geotoken index build` asks first)
        out_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(out_dir / INDEX_FILE) as tmp:
            faiss.write_index(self.index, str(tmp))
        write_json(out_dir / META_FILE, {**self.meta, "config": asdict(self.config)})
        return out_dir

    @classmethod
    def load(cls, index_dir: str | os.PathLike, **search_options: Any) -> NeighbourIndex:
        """Load a saved index; `search_options` (nprobe, ef_search) override the saved ones."""
        index_dir = Path(index_dir)
        if not (index_dir / META_FILE).is_file() or not (index_dir / INDEX_FILE).is_file():
            raise GeoTokenError(f"{index_dir}: not an index folder (needs {INDEX_FILE} and {META_FILE})")
        meta = read_json(index_dir / META_FILE)
        saved = meta.pop("config", None) if isinstance(meta, dict) else None
        if not isinstance(saved, dict):
            raise GeoTokenError(f"{index_dir / META_FILE}: not an index description (no 'config' object)")
        known = {f.name for f in fields(IndexConfig)}
        try:
            config = IndexConfig(**{k: v for k, v in saved.items() if k in known})
        except GeoTokenError as exc:
            raise GeoTokenError(f"{index_dir / META_FILE}: {exc}") from None
        # replace() runs the checks again on the overrides
        config = replace(config, **{k: v for k, v in search_options.items() if v is not None})
        try:
            index = faiss.read_index(str(index_dir / INDEX_FILE))
        except RuntimeError as exc:  # truncated or not a FAISS file: faiss's message names the C++ check
            raise GeoTokenError(
                f"{index_dir / INDEX_FILE}: not a readable FAISS index ({str(exc).splitlines()[0][-160:]}); "
                "build it again with `geotoken index`"
            ) from None
        return cls(index, config, meta)

    def nbytes(self) -> int:
        """Size of the serialised index: what it occupies in memory, give or take."""
        return int(faiss.serialize_index(self.index).size)


def recall_at_k(rows: np.ndarray, exact_rows: np.ndarray) -> float:
    """Mean share of the exact top-k found in the approximate top-k: (B, k) each."""
    hits = (rows[:, :, None] == exact_rows[:, None, :]) & (exact_rows[:, None, :] >= 0)  # (B, k, k)
    return float(hits.any(axis=1).sum() / max(1, (exact_rows >= 0).sum()))


def check_recall(k: int, queries: int) -> None:
    """`measure_recall`'s options, checked before an index is built (not after an hour of building)."""
    if k < 1 or queries < 1:
        raise GeoTokenError(f"recall: k ({k}) and the number of queries ({queries}) must be >= 1")


def measure_recall(
    index: NeighbourIndex, embeddings, valid: np.ndarray, k: int, queries: int, seed: int = 0
) -> dict[str, Any]:
    """recall@k of `index` against exact search over the same `embeddings` (N, D), on `queries` rows drawn
    (seeded) from the `valid` ones; an ivfpq index also with re-ranking 4k candidates by exact vectors.

    Returns {"recall@K": .., ["recall@K_refine4": ..,] "recall_queries": n} (4: `REFINE`), what `geotoken index build`
    records in index.json for compressed kinds.
    """
    check_recall(k, queries)
    rows = np.flatnonzero(valid)
    sample = np.sort(np.random.default_rng(seed).choice(rows, min(len(rows), queries), replace=False))
    q = embeddings[sample]
    exact, _ = NeighbourIndex.build(embeddings, "flat", valid=valid, progress=False).search(q, k)
    out: dict[str, Any] = {f"recall@{k}": recall_at_k(index.search(q, k)[0], exact)}
    if index.config.kind == "ivfpq":
        refined = index.search(q, k, exact=embeddings, refine=REFINE)[0]
        out[f"recall@{k}_refine{REFINE}"] = recall_at_k(refined, exact)
    out["recall_queries"] = len(sample)
    return out

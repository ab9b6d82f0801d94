"""Neighbour tables: the top-k gallery rows of every query, as memmapped arrays.

Folder layout: `index.npy` int64 (N, k) gallery rows and `sims.npy` float32 (N, k), best first, plus
`neighbours.json` (written last: its presence means the table is complete). While running, `progress.json`
holds the job (its config and the fixed grid of query chunks, `chunk_rows` rows each) and `progress/rank-R.json`
the chunks process R has written, so a killed job continues where it stopped.

Under torchrun (RANK / WORLD_SIZE) the chunks not yet done are split between the processes; each searches
its own (on its own GPU when FAISS has one) and writes its rows into the one pair of arrays, and rank 0
writes `neighbours.json` when every chunk is done. A chunk is the same batch of queries whichever process
searches it, so the table is byte-identical to a single process's, and a resumed job may use another
process count.

For training queries that are themselves in the gallery, the query's own row (matched by id) and exact
duplicates of its embedding (the same photo uploaded twice) are removed, rather than blindly skipping
the first hit as the paper's code does: with duplicates or ties, the first hit is not always the query.
Training queries that are other photos of gallery places (EarthViews' `train` split) can also drop every
gallery row taken at exactly their own coordinates, so that they meet the gallery as test photos do.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib.format import open_memmap
from tqdm import tqdm

from geotoken.devices import distributed
from geotoken.errors import GeoTokenError
from geotoken.features import FeatureStore, RowWriter
from geotoken.io import is_whole, read_json, write_json
from geotoken.retrieval.embeddings import StoreEmbeddings
from geotoken.retrieval.index import REFINE, NeighbourIndex, check_recall, measure_recall

META, PROGRESS, RANKS = "neighbours.json", "progress.json", "progress"


def first_k_kept(rows: np.ndarray, sims: np.ndarray, drop: np.ndarray, k: int):
    """Per query, the first k candidates not dropped, order kept: (B, K) -> (B, k) rows, sims, count kept.

    Rows with fewer than k kept candidates are padded with -1 / -inf.
    """
    order = np.argsort(drop, axis=1, kind="stable")[:, :k]  # kept candidates first, in rank order
    out_rows = np.take_along_axis(rows, order, axis=1)
    out_sims = np.take_along_axis(sims, order, axis=1)
    n_kept = (~drop).sum(axis=1)
    pad = np.arange(order.shape[1])[None, :] >= n_kept[:, None]
    out_rows[pad], out_sims[pad] = -1, -np.inf
    if out_rows.shape[1] < k:  # fewer candidates than k at all
        extra = k - out_rows.shape[1]
        out_rows = np.pad(out_rows, ((0, 0), (0, extra)), constant_values=-1)
        out_sims = np.pad(out_sims, ((0, 0), (0, extra)), constant_values=-np.inf)
    return out_rows, out_sims, n_kept


def search_excluding(
    index: NeighbourIndex,
    queries: np.ndarray,
    k: int,
    self_rows: np.ndarray | None = None,
    gallery: StoreEmbeddings | np.ndarray | None = None,
    margin: int = 8,
    refine: int = REFINE,
    exact: StoreEmbeddings | np.ndarray | None = None,
    places: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of each query (B, D) without its own gallery row `self_rows` (B,) (-1: not in the gallery),
    without gallery rows whose embedding in `gallery` equals the query exactly, and, given
    places = (query coords (B, 2), gallery coords (G, 2)), without gallery rows at the query's coordinates.

    Searches k + margin; queries left with fewer than k hits are searched again with a larger margin.
    refine > 1: a compressed index re-ranks refine x candidates by their exact vectors in `exact`.
    """
    queries = np.asarray(queries, dtype=np.float32)
    b = len(queries)
    out_rows = np.full((b, k), -1, dtype=np.int64)
    out_sims = np.full((b, k), -np.inf, dtype=np.float32)
    todo = np.arange(b)
    while len(todo):
        depth = min(k + margin, index.size)
        rows, sims = index.search(queries[todo], depth, exact=exact, refine=refine)  # (T, depth)
        drop = rows < 0
        if self_rows is not None:
            drop |= rows == self_rows[todo, None]
        if gallery is not None:
            cand = gallery[np.where(rows < 0, 0, rows).ravel()].reshape(*rows.shape, -1)  # (T, depth, D)
            drop |= (cand == queries[todo, None, :]).all(axis=-1)
        if places is not None:
            here, there = places
            drop |= (there[np.where(rows < 0, 0, rows)] == here[todo, None, :]).all(axis=-1)
        r, s, n_kept = first_k_kept(rows, sims, drop, k)
        out_rows[todo], out_sims[todo] = r, s
        if depth >= index.size:
            break
        todo = todo[n_kept < k]
        margin *= 4
    return out_rows, out_sims


def _self_rows(query_store: FeatureStore, gallery_store: FeatureStore) -> np.ndarray:
    """Gallery row of each query id, -1 where the id is not in the gallery: (Nq,) int64."""
    if query_store.ids == gallery_store.ids:
        return np.arange(query_store.rows, dtype=np.int64)
    where = {id_: row for row, id_ in enumerate(gallery_store.ids)}
    return np.fromiter((where.get(i, -1) for i in query_store.ids), dtype=np.int64, count=query_store.rows)


def neighbour_table(
    query_store: FeatureStore,
    gallery_index: NeighbourIndex,
    k: int,
    out_dir: str | os.PathLike,
    exclude_self_ids: bool = True,
    gallery_store: FeatureStore | None = None,
    embedding: str | None = None,
    batch_size: int = 1024,
    progress: bool = True,
    refine: int = REFINE,
    exclude_same_place: bool = False,
    overwrite: bool = False,
) -> NeighbourTable:
    """Write the top-k gallery rows of every query row to `out_dir` (resumes a killed run; shared between
    the processes of a torchrun job, see the module docstring).

    The query embedding is the one the index was built from unless `embedding` says otherwise. With
    `exclude_self_ids`, the gallery store (default: the one recorded in the index) supplies the ids and
    embeddings used to drop each query's own row and its exact duplicates. With `exclude_same_place`, gallery
    rows at exactly the query's coordinates are dropped too (training queries that are other views of
    gallery places; test photos never share a gallery coordinate). Skipped query rows get -1.
    refine > 1 (compressed indexes): re-rank refine x k candidates by exact vectors from the gallery store;
    a flat index is exact already (its table records refine 1). A finished table of other queries or options
    in `out_dir` is not replaced unless `overwrite` (what trains or evaluates from it would change unseen).
    """
    for name, value in (("k", k), ("batch_size", batch_size), ("refine", refine)):
        if not is_whole(value):
            raise GeoTokenError(f"neighbour table: {name} must be an integer >= 1, got {value!r}")
    refine = 1 if gallery_index.config.kind == "flat" else refine
    rows = gallery_index.size - (1 if exclude_self_ids else 0)  # a query drops its own gallery row
    if k > rows:  # the table would be padded with -1, rows that training and evaluation cannot use
        raise GeoTokenError(
            f"neighbour table: k {k} is more neighbours than the index's gallery has ({gallery_index.size:,} "
            f"rows{', less the query itself' if exclude_self_ids else ''}): choose k <= {rows}"
        )
    out_dir = Path(out_dir)
    embedding = embedding or gallery_index.meta.get("embedding")
    if not embedding:
        raise GeoTokenError("which embedding to search is unknown: pass embedding= (e.g. 'gps')")
    queries = StoreEmbeddings(query_store, embedding)
    recorded = gallery_index.meta.get("store")
    if gallery_store is None and recorded and (Path(recorded) / "store.json").is_file():
        gallery_store = FeatureStore.open(recorded)  # once: its heads, ids, vectors and identity
    # the heads that wrote the indexed embedding (recorded by indexes built since), and the gallery's arrays
    query_store.check_heads(gallery_index.meta.get("heads"), f"the index's gallery {recorded}'s")
    if gallery_store is not None:
        query_store.check_heads(gallery_store.heads, f"the gallery {gallery_store.root}'s")
        indexed_over = gallery_index.meta.get("gallery_rows", gallery_index.size)
        if gallery_store.rows != indexed_over:  # its rows would be read at the index's row numbers
            raise GeoTokenError(
                f"gallery {gallery_store.root} has {gallery_store.rows:,} rows, the index was built over "
                f"{indexed_over:,} ({recorded}): give the store the index was built from"
            )
    if queries.dim != gallery_index.dim:
        raise GeoTokenError(
            f"{query_store.root}: {embedding!r} is {queries.dim}-d, the index {gallery_index.dim}-d"
        )
    self_rows = gallery = None
    if exclude_self_ids or exclude_same_place or refine > 1:
        if gallery_store is None:
            if "store" not in gallery_index.meta:
                raise GeoTokenError("the index does not record its gallery store: pass gallery_store=")
            gallery_store = FeatureStore.open(gallery_index.meta["store"])
        self_rows = _self_rows(query_store, gallery_store) if exclude_self_ids else None
        gallery = StoreEmbeddings(gallery_store, embedding)
    gallery_coords = np.asarray(gallery_store.coords) if exclude_same_place else None

    config = {
        "k": k,
        "embedding": embedding,
        "exclude_self_ids": exclude_self_ids,
        "exclude_same_place": exclude_same_place,
        "refine": refine,
        "queries": {"store": str(query_store.root), "manifest_hash": query_store.header.get("manifest_hash")},
        "index": {key: gallery_index.meta.get(key) for key in ("kind", "store", "embedding", "indexed")},
        "rows": query_store.rows,
    }
    if (out_dir / META).is_file():
        was = read_json(out_dir / META)["config"]
        if _same_table(was, config):
            return NeighbourTable.open(out_dir)
        if not overwrite:
            raise GeoTokenError(
                f"{out_dir}: holds the neighbour table of {was.get('queries', {}).get('store', '?')} (k "
                f"{was.get('k', '?')}) already; pass --overwrite (overwrite=True) to replace it, or write to a new folder"
            )
    d = distributed()
    if d.main:
        _start(out_dir, config, query_store.rows, k, batch_size)
    d.barrier()  # the arrays and the job exist from here on
    state = read_json(out_dir / PROGRESS)
    chunk_rows = state["chunk_rows"]  # a resumed job keeps its grid: the same batches, the same bytes
    n_chunks = -(-query_store.rows // chunk_rows)
    todo = np.flatnonzero(~_done_chunks(out_dir, n_chunks))
    mine = np.array_split(todo, d.world)[d.rank]
    record_path = out_dir / RANKS / f"rank-{d.rank}.json"
    record = read_json(record_path) if record_path.is_file() else {"chunks": []}
    d.barrier()  # every process has read the records before any writes its own

    valid = query_store.valid
    desc = f"neighbours (rank 0's share of {d.world})" if d.world > 1 else "neighbours"  # one bar a terminal
    with RowWriter(out_dir / "index.npy") as row_out, RowWriter(out_dir / "sims.npy") as sim_out:
        for chunk in tqdm(mine, desc=desc, unit="batch", disable=not progress or d.rank > 0):
            start = int(chunk) * chunk_rows
            stop = min(query_store.rows, start + chunk_rows)
            ok = np.flatnonzero(valid[start:stop])
            rows = np.full((stop - start, k), -1, dtype=np.int64)
            sims = np.full((stop - start, k), -np.inf, dtype=np.float32)
            sr = None if self_rows is None else self_rows[start:stop][ok]
            dups = gallery if exclude_self_ids else None
            places = (
                None
                if gallery_coords is None
                else (np.asarray(query_store.coords[start + ok]), gallery_coords)
            )
            rows[ok], sims[ok] = search_excluding(
                gallery_index, queries[start + ok], k, sr, dups, refine=refine, exact=gallery, places=places
            )
            row_out.write(start, rows)
            sim_out.write(start, sims)
            row_out.sync()
            sim_out.sync()
            record["chunks"].append(int(chunk))  # commit: this chunk is on disk
            write_json(record_path, record)
    d.barrier()
    if d.main:
        missing = np.flatnonzero(~_done_chunks(out_dir, n_chunks))
        if len(missing):
            raise GeoTokenError(
                f"{out_dir}: {len(missing)} query chunks not searched (first: {missing[0]}); rerun to resume"
            )
        meta = {"format": "geotoken.neighbours", "version": 1, "config": config}
        if gallery_store is not None:  # outside `config`: a table is reused whatever the gallery's path
            meta["gallery"] = _identity(gallery_store)  # what `check_neighbours` compares
        write_json(out_dir / META, meta)
        for path in (out_dir / RANKS).glob("*.json"):
            path.unlink()
        (out_dir / RANKS).rmdir()
        (out_dir / PROGRESS).unlink()
    d.barrier()
    return NeighbourTable.open(out_dir)


def _start(out_dir: Path, config: dict[str, Any], rows: int, k: int, chunk_rows: int) -> None:
    """Rank 0: keep an unfinished job with the same config (resume), or lay out a new one."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / META).unlink(missing_ok=True)
    state = read_json(out_dir / PROGRESS) if (out_dir / PROGRESS).is_file() else None
    if state is not None and state.get("config") == config and "chunk_rows" in state:
        (out_dir / RANKS).mkdir(exist_ok=True)
        return
    (out_dir / PROGRESS).unlink(missing_ok=True)
    for path in (out_dir / RANKS).glob("*.json"):
        path.unlink()
    (out_dir / RANKS).mkdir(exist_ok=True)
    open_memmap(out_dir / "index.npy", mode="w+", dtype=np.int64, shape=(rows, k)).flush()
    open_memmap(out_dir / "sims.npy", mode="w+", dtype=np.float32, shape=(rows, k)).flush()
    write_json(out_dir / PROGRESS, {"config": config, "chunk_rows": int(chunk_rows)})


def _done_chunks(out_dir: Path, n_chunks: int) -> np.ndarray:
    """(n_chunks,) bool: chunks some process has recorded as written."""
    done = np.zeros(n_chunks, dtype=bool)
    for path in sorted((out_dir / RANKS).glob("rank-*.json")):
        done[np.asarray(read_json(path)["chunks"], dtype=np.int64)] = True
    return done


def _same_table(was: dict, now: dict) -> bool:
    """Whether a finished table's config is this one's: its stores by content (manifest hash, rows), not by
    how their paths were spelled (relative to another folder, or absolute)."""

    def content(config: dict) -> dict:
        config = json.loads(json.dumps(config))
        queries, index = config.get("queries") or {}, config.get("index") or {}
        store = queries.pop("store", None)
        if not queries.get("manifest_hash"):  # nothing else to know the queries by
            queries["store"] = str(Path(store).resolve()) if store else None
        if index.get("store"):
            index["store"] = str(Path(index["store"]).resolve())
        return config

    return content(was) == content(now)


def _identity(store: FeatureStore) -> dict[str, Any]:
    return {"store": str(store.root), "manifest_hash": store.header.get("manifest_hash"), "rows": store.rows}


def _described(store: str | None, manifest: str | None) -> str:
    return f"{store}" + (f" (manifest {manifest[:12]}...)" if manifest else "")


def check_neighbours(
    table: NeighbourTable | str | os.PathLike,
    queries: FeatureStore,
    gallery: FeatureStore | None = None,
    training: bool = False,
) -> NeighbourTable:
    """Raise unless `table` was computed for the store `queries` (manifest hash, where both record one, and
    row count) and, given, for the store `gallery` (manifest hash and row count, where the table records
    them). Another split's table of the same size would otherwise give wrong answers silently.
    `training`: also refuse a table of the gallery's own rows that keeps each query's own row (--keep-self):
    its first neighbour is the answer, and what learns from it learns to copy it."""
    table = table if isinstance(table, NeighbourTable) else NeighbourTable.open(table)
    where = table.root / META
    meta = table.meta if isinstance(table.meta, dict) else {}
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    asked, searched = config.get("queries") or {}, meta.get("gallery") or {}
    indexed = (config.get("index") or {}).get("store")
    of_gallery = (
        asked.get("manifest_hash") and asked.get("manifest_hash") == searched.get("manifest_hash")
    ) or (asked.get("store") and indexed and Path(asked["store"]).resolve() == Path(indexed).resolve())
    if training and config.get("exclude_self_ids") is False and of_gallery:
        raise GeoTokenError(
            f"{where}: the gallery's own rows with each one's own row kept (--keep-self): training on it learns "
            "to copy the first neighbour; write the training table without --keep-self"
        )
    for side, store, rec in (
        ("queries", queries, config.get("queries")),
        ("gallery", gallery, meta.get("gallery")),
    ):
        if store is None or not isinstance(rec, dict):
            continue
        have, want = rec.get("manifest_hash"), store.header.get("manifest_hash")
        if have and want and have != want:
            raise GeoTokenError(
                f"{where}: computed for {side} {_described(rec.get('store'), have)}, "
                f"not {_described(str(store.root), want)}"
            )
        rows = rec.get("rows", config.get("rows") if side == "queries" else None)
        if rows is not None and rows != store.rows:
            raise GeoTokenError(
                f"{where}: computed for {side} {rec.get('store')} ({rows} rows), "
                f"not {store.root} ({store.rows} rows)"
            )
    if gallery is not None:
        queries.check_heads(gallery.heads, f"the gallery {gallery.root}'s")
    return table.check(queries.rows)


class NeighbourTable:
    """A finished neighbour table: `.rows` int64 (N, k) and `.sims` float32 (N, k) memmaps, `.meta`."""

    def __init__(self, root: Path, meta: dict[str, Any]):
        self.root, self.meta = root, meta
        self.rows = np.load(root / "index.npy", mmap_mode="r")
        self.sims = np.load(root / "sims.npy", mmap_mode="r")

    @classmethod
    def open(cls, root: str | os.PathLike) -> NeighbourTable:
        root = Path(root)
        if not (root / META).is_file():
            state = "unfinished (rerun to resume)" if (root / PROGRESS).is_file() else "not a neighbour table"
            raise GeoTokenError(f"{root}: {state}: no {META}")
        for name in ("index.npy", "sims.npy"):
            if not (root / name).is_file():
                raise GeoTokenError(f"{root}: neighbour table has no {name}")
        table = cls(root, read_json(root / META))
        if table.rows.ndim != 2 or table.rows.dtype != np.int64:
            raise GeoTokenError(
                f"{root / 'index.npy'}: {table.rows.dtype} {table.rows.shape}, expected int64 (queries, k)"
            )
        if table.sims.shape != table.rows.shape:
            raise GeoTokenError(
                f"{root / 'sims.npy'}: shape {table.sims.shape}, index.npy has {table.rows.shape}"
            )
        return table

    def check(self, queries: int, gallery: int | None = None) -> NeighbourTable:
        """Raise unless the table has one row per query and, given the gallery's row count, every entry is
        a gallery row (a missing neighbour, -1, counts as out of range). Returns the table."""
        check_rows(self.rows, queries, gallery, self.root)
        return self

    @property
    def k(self) -> int:
        return self.rows.shape[1]


def check_rows(rows: np.ndarray, queries: int, gallery: int | None, root: Path) -> None:
    """`NeighbourTable.check` of the rows (queries, k) of the table at `root`, as stored or compacted."""
    if rows.shape[0] != queries:
        raise GeoTokenError(f"{root}: {rows.shape[0]} neighbour rows for {queries} queries")
    if gallery is not None and rows.size:
        low, high = int(rows.min()), int(rows.max())
        if low < 0 or high >= gallery:
            raise GeoTokenError(
                f"{root / 'index.npy'}: gallery row {low if low < 0 else high} out of range ({gallery} rows)"
            )


def build_store_index(
    store: FeatureStore,
    embedding: str,
    kind: str = "flat",
    *,
    recall_k: int = 15,
    recall_queries: int = 1000,
    progress: bool = False,
    **options,
) -> NeighbourIndex:
    """A FAISS index over a store's `embedding` rows (`geotoken index build` and the run's index stage):
    `meta` names the store by its absolute path (it is reopened from anywhere), the build time, and for the
    compressed kinds their recall@`recall_k` against exact search on `recall_queries` rows (checked before the
    build, not after an hour of it). `options`: IndexConfig fields (nlist, pq_m, nprobe, hnsw_m, ef_search)."""
    embeddings = StoreEmbeddings(store, embedding)
    if kind != "flat":
        check_recall(recall_k, recall_queries)
    meta = {"store": str(Path(store.root).resolve()), "embedding": embedding, "heads": embeddings.heads}
    t0 = time.perf_counter()
    index = NeighbourIndex.build(embeddings, kind, valid=store.valid, meta=meta, progress=progress, **options)
    index.meta["build_seconds"] = round(time.perf_counter() - t0, 3)
    if kind != "flat":
        index.meta.update(measure_recall(index, embeddings, store.valid, recall_k, recall_queries))
        key = next(k for k in (f"recall@{recall_k}_refine{REFINE}", f"recall@{recall_k}") if k in index.meta)
        if (
            index.meta[key] < 0.9
        ):  # what prediction gets (re-ranked where it re-ranks): said, not only recorded
            warnings.warn(
                f"{kind} index over {store.rows:,} rows: {key} {index.meta[key]:.3f}, so predictions will miss "
                f"neighbours an exact search finds; kind flat searches exactly (compressed kinds pay off from "
                "about a million rows), or raise nlist / pq_m / nprobe",
                stacklevel=2,
            )
    return index

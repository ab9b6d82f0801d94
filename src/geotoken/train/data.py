"""Training data: aligned embeddings of queries and gallery, the neighbour table, and S2 target tokens.

A batch is assembled by indexing arrays with row-index arrays (query rows -> neighbour rows -> gallery
embeddings and tokens); nothing loops over samples. Arrays may be memmaps (a 4.7M-row gallery stays on
disk) or in-memory copies (small sets are loaded once, see `TrainData.load`).

Data order is a pure function of (seed, epoch): each epoch is one permutation of the training rows, cut
into global batches of `batch_size * world` rows; rank r takes the r-th slice of each. Resuming only
needs the step number, and every rank sees disjoint rows, like `DistributedSampler` without padding.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from geotoken.errors import GeoTokenError
from geotoken.features import FeatureStore
from geotoken.features.store import read_rows
from geotoken.gallery import Gallery
from geotoken.geo import haversine_km
from geotoken.model import Batch, ModelConfig
from geotoken.retrieval import check_neighbours

IN_MEMORY_BYTES = 2 << 30  # stores smaller than this are read into RAM once


@dataclass
class TrainData:
    """Arrays behind training batches. Queries and gallery may be the same arrays (training on MP16).

    query[m] (N, D_m), neighbours (N, k_store) int64 gallery rows (best first), query_tokens (N, T) int64,
    query_coords (N, 2) float64 (for validation); `gallery` assembles the batches (`Gallery.batch`).
    """

    query: dict[str, np.ndarray]
    gallery: Gallery
    neighbours: np.ndarray
    query_tokens: np.ndarray
    query_coords: np.ndarray | None = None
    source: str = "arrays"  # names the files in error messages

    def __post_init__(self) -> None:
        for name in ("neighbours", "query_tokens", "query_coords"):  # lists, as a user may pass them
            value = getattr(self, name)
            if value is not None and not isinstance(value, np.ndarray):
                setattr(self, name, np.asarray(value))
        N = len(self.query_tokens)
        for m, a in self.query.items():
            if len(a) != N:
                raise GeoTokenError(f"{self.source}: query array {m!r} has {len(a)} rows, expected {N}")
        if self.neighbours.ndim != 2 or len(self.neighbours) != N:
            raise GeoTokenError(
                f"{self.source}: neighbour table has shape {self.neighbours.shape}, expected ({N}, k)"
            )

    @property
    def rows(self) -> int:
        return len(self.query_tokens)

    @property
    def k_store(self) -> int:
        return self.neighbours.shape[1]

    def usable(self, k: int) -> np.ndarray:
        """bool (N,): rows with k real neighbours (the retrieval stage writes -1 for unreadable images)."""
        return (np.asarray(self.neighbours[:, :k]) >= 0).all(axis=1)

    def check(self, cfg: ModelConfig) -> None:
        """Fail early, naming the field, if the arrays cannot feed a model with config `cfg`."""
        k = cfg.k
        for name, arrays in (("query", self.query), ("gallery", self.gallery.embeddings)):
            for m, dim in cfg.modalities.items():
                if m not in arrays:
                    raise GeoTokenError(f"{self.source}: {name} has no array {m!r} (has {sorted(arrays)})")
                if arrays[m].shape[1] != dim:
                    raise GeoTokenError(
                        f"{self.source}: {name} array {m!r} is {arrays[m].shape[1]}-d, model expects {dim}"
                    )
        if k > self.k_store:
            raise GeoTokenError(
                f"{self.source}: neighbour table has {self.k_store} neighbours per row, the model reads k={k}: "
                f"train with -k {self.k_store} (or fewer), or write a deeper table (geotoken index neighbours "
                f"... -k {k})"
            )
        bad = self.neighbours[:, :k] >= self.gallery.rows  # -1 marks a skipped row, see `usable`
        if bad.any():
            r, c = np.argwhere(bad)[0]
            raise GeoTokenError(
                f"{self.source}: neighbour table row {r} column {c} is {self.neighbours[r, c]}, "
                f"outside the gallery's {self.gallery.rows} rows"
            )
        vocab = np.asarray(cfg.vocab_sizes)
        for name, tok in (("query", self.query_tokens), ("gallery", self.gallery.tokens)):
            if tok.shape[1] != len(vocab) or ((tok < 0) | (tok >= vocab)).any():
                raise GeoTokenError(f"{self.source}: {name} tokens do not fit vocabularies {cfg.vocab_sizes}")

    def batch(self, rows: np.ndarray, cfg: ModelConfig) -> Batch:
        """Batch for query rows (B,): their embeddings, first k neighbours' embeddings and tokens, targets."""
        rows = np.asarray(rows, dtype=np.int64)
        query = {m: read_rows(self.query[m], rows) for m in cfg.modalities}  # (B, D_m)
        neighbours = np.asarray(self.neighbours[rows, : cfg.k])  # (B, k) gallery rows
        return self.gallery.batch(query, neighbours, cfg, targets=self.query_tokens[rows])

    def drop_near(self, km: float, share: float, k: int, seed: int = 0) -> TrainData:
        """The same data with a (k-column) neighbour table in which a seeded `share` of the queries lose
        every neighbour within `km` of their own place (`drop_near_neighbours`): training queries that see
        what a photo of a region the gallery never saw gets. Needs the query and gallery coordinates."""
        if self.query_coords is None or self.gallery.coords is None:
            raise GeoTokenError(f"{self.source}: drop_near_km needs query and gallery coordinates")
        table = drop_near_neighbours(
            self.neighbours, np.asarray(self.query_coords), self.gallery.coords, k, km, share, seed
        )
        return dataclasses.replace(self, neighbours=table)

    # ------------------------------------------------------------------------------ from the pipeline's folders
    @classmethod
    def load(
        cls,
        features: str | Path,
        neighbours: str | Path,
        gallery: str | Path | Gallery | None = None,
        modalities: list[str] | None = None,
        level: int = 20,
        group: int = 2,
    ) -> TrainData:
        """A query feature store, its neighbour folder (`index.npy`) and the gallery: a store (default: the
        query store itself) or an already loaded `Gallery` (e.g. the training set's, shared by validation)."""
        qstore = FeatureStore.open(features)
        if isinstance(gallery, Gallery):
            gstore = None
            qstore.check_heads(gallery.heads, f"the gallery {gallery.source}'s")
        elif gallery is None or Path(gallery) == Path(features):
            gstore = qstore
        else:
            gstore = FeatureStore.open(gallery)
        names = modalities or [m for m in ("visual", "gps", "text") if m in qstore]
        if not names:
            raise GeoTokenError(
                f"{features}: no aligned arrays (visual/gps/text); run the alignment step first"
            )
        index_path = Path(neighbours) / "index.npy"
        if not index_path.is_file():
            raise GeoTokenError(f"{index_path} is missing: not a neighbour folder")
        if (Path(neighbours) / "neighbours.json").is_file():  # a bare index.npy records nothing to check
            check_neighbours(neighbours, qstore, gstore, training=True)
        elif gstore is not None:
            qstore.check_heads(gstore.heads, f"the gallery {gstore.root}'s")
        index = np.load(index_path, mmap_mode="r")
        if index.dtype != np.int64:
            raise GeoTokenError(f"{index_path}: dtype {index.dtype}, expected int64")
        if index.ndim != 2 or len(index) != qstore.rows:  # (what neighbours.json would have said)
            raise GeoTokenError(
                f"{index_path}: {index.shape} neighbour rows for the {qstore.rows:,} query rows of {features}: "
                "the table of another split?"
            )

        def in_memory(g: Gallery) -> Gallery:
            if sum(a.nbytes for a in g.embeddings.values()) < IN_MEMORY_BYTES:
                g.embeddings = {m: np.ascontiguousarray(a) for m, a in g.embeddings.items()}
            return g

        q = in_memory(Gallery.from_store(qstore, names, level, group))
        if gstore is None:
            g = gallery
        else:
            g = q if gstore is qstore else in_memory(Gallery.from_store(gstore, names, level, group))
        index = np.ascontiguousarray(index) if index.nbytes < IN_MEMORY_BYTES else index
        return cls(q.embeddings, g, index, q.tokens, q.coords, source=f"{features} + {neighbours}")


def drop_near_neighbours(
    neighbours: np.ndarray,
    query_coords: np.ndarray,
    gallery_coords: np.ndarray,
    k: int,
    km: float,
    share: float,
    seed: int = 0,
    chunk: int = 8192,
) -> np.ndarray:
    """(N, k) int64 neighbour rows: for a seeded `share` of the N queries, the neighbours (table (N, K), best
    first, K >= k) whose gallery place lies within `km` of the query's own place are dropped and the first
    k left are kept, best first; where fewer than k are left, the best-ranked dropped ones fill the end.
    The other queries keep their first k. A deeper table (K > k) leaves more to choose from."""
    if km < 0 or not 0.0 <= share <= 1.0:
        raise GeoTokenError(f"drop_near_km {km} must be >= 0 and drop_near_share {share} in [0, 1]")
    table = np.asarray(neighbours)
    if table.ndim != 2 or table.shape[1] <= k:  # k columns would only reorder the same neighbours
        raise GeoTokenError(
            f"neighbour table of shape {table.shape}: dropping near neighbours needs more than k={k} columns "
            "(a deeper table: geotoken index neighbours ... -k 64)"
        )
    picked = np.random.default_rng([seed, 0xD509]).random(len(table)) < share  # (N,) queries that drop
    out = np.ascontiguousarray(table[:, :k], dtype=np.int64)
    for start in range(0, len(table), chunk):
        rows = start + np.flatnonzero(picked[start : start + chunk])
        if not len(rows):
            continue
        nb = np.asarray(table[rows], dtype=np.int64)  # (b, K)
        g = gallery_coords[np.maximum(nb, 0)]  # (b, K, 2); -1 (skipped rows) is never near
        q = query_coords[rows]
        near = (haversine_km(q[:, None, 0], q[:, None, 1], g[..., 0], g[..., 1]) <= km) & (nb >= 0)
        order = np.argsort(near, axis=1, kind="stable")[:, :k]  # far ones first, each group best first
        out[rows] = np.take_along_axis(nb, order, axis=1)
    return out


def holdout_rows(n: int, fraction: float, max_rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, validation rows), both sorted: a seeded random `fraction` of n rows, at most
    `max_rows` of them, held out for validation."""
    if not 0.0 <= fraction < 1.0:
        raise GeoTokenError(f"validation fraction {fraction} must be in [0, 1)")
    if max_rows < 0:  # (negative: the slices below would swap training and validation)
        raise GeoTokenError(f"validation rows at most (--val-max) {max_rows} must be >= 0")
    order = np.random.default_rng(seed).permutation(n)
    n_val = min(int(round(fraction * n)), max_rows)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of n training rows used in `epoch` (a pure function: resumable, same on every rank)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def steps_per_epoch(n: int, batch_size: int, world: int = 1) -> int:
    """Full global batches per epoch (the remainder of the permutation is dropped, so ranks stay in step)."""
    steps = n // (batch_size * world)
    if steps == 0:
        raise GeoTokenError(
            f"{n} training rows are fewer than one batch of {batch_size} x {world} process(es)"
        )
    return steps


def batch_rows(
    order: np.ndarray, step_in_epoch: int, batch_size: int, rank: int = 0, world: int = 1
) -> np.ndarray:
    """Rows of this rank's share of global batch `step_in_epoch`."""
    start = (step_in_epoch * world + rank) * batch_size
    return order[start : start + batch_size]

"""Training data: aligned embeddings of queries and gallery, the neighbour table, and S2 target tokens.

A batch is assembled by indexing arrays with row-index arrays (query rows -> neighbour rows -> gallery
embeddings and tokens); nothing loops over samples. Arrays may be memmaps (a 4.7M-row gallery stays on
disk) or in-memory copies (small sets are loaded once, see `TrainData.load`).

Data order is a pure function of (seed, epoch): each epoch is one permutation of the training rows, cut
into global batches of `batch_size * world` rows; rank r takes the r-th slice of each. Resuming only
needs the step number, and every rank sees disjoint rows, like `DistributedSampler` without padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from geotoken.errors import GeoTokenError
from geotoken.model import Batch

IN_MEMORY_BYTES = 2 << 30  # stores smaller than this are read into RAM once


def _rows(array: np.ndarray, rows: np.ndarray) -> torch.Tensor:
    """float32 tensor of array[rows] for any row-index shape: (...,) -> (..., D)."""
    flat = np.asarray(rows, dtype=np.int64).ravel()
    if isinstance(array, np.memmap):  # sorted reads for disk locality
        order = np.argsort(flat, kind="stable")
        out = np.empty((flat.size, array.shape[1]), dtype=np.float32)
        out[order] = array[flat[order]]
    else:
        out = array[flat].astype(np.float32)
    return torch.from_numpy(out).view(*np.shape(rows), array.shape[1])


@dataclass
class TrainData:
    """Arrays behind training batches. Queries and gallery may be the same arrays (training on MP16).

    query[m] (N, D_m), gallery[m] (G, D_m), neighbours (N, k_store) int64 gallery rows (best first),
    query_tokens (N, T) int64, gallery_tokens (G, T) int64, query_coords (N, 2) float64 (for validation).
    """

    query: dict[str, np.ndarray]
    gallery: dict[str, np.ndarray]
    neighbours: np.ndarray
    query_tokens: np.ndarray
    gallery_tokens: np.ndarray
    query_coords: np.ndarray | None = None
    source: str = "arrays"  # names the files in error messages

    def __post_init__(self) -> None:
        N, G = len(self.query_tokens), len(self.gallery_tokens)
        for m, a in self.query.items():
            if len(a) != N:
                raise GeoTokenError(f"{self.source}: query array {m!r} has {len(a)} rows, expected {N}")
        for m, a in self.gallery.items():
            if len(a) != G:
                raise GeoTokenError(f"{self.source}: gallery array {m!r} has {len(a)} rows, expected {G}")
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

    def check(self, modalities: dict[str, int], k: int, vocab_sizes: list[int]) -> None:
        """Fail early, naming the field, if the arrays cannot feed a model with these settings."""
        for name, arrays in (("query", self.query), ("gallery", self.gallery)):
            for m, dim in modalities.items():
                if m not in arrays:
                    raise GeoTokenError(f"{self.source}: {name} has no array {m!r} (has {sorted(arrays)})")
                if arrays[m].shape[1] != dim:
                    raise GeoTokenError(
                        f"{self.source}: {name} array {m!r} is {arrays[m].shape[1]}-d, model expects {dim}"
                    )
        if k > self.k_store:
            raise GeoTokenError(
                f"{self.source}: neighbour table has {self.k_store} neighbours per row, model needs k={k}"
            )
        bad = self.neighbours[:, :k] >= len(self.gallery_tokens)  # -1 marks a skipped row, see `usable`
        if bad.any():
            r, c = np.argwhere(bad)[0]
            raise GeoTokenError(
                f"{self.source}: neighbour table row {r} column {c} is {self.neighbours[r, c]}, "
                f"outside the gallery's {len(self.gallery_tokens)} rows"
            )
        vocab = np.asarray(vocab_sizes)
        for name, tok in (("query", self.query_tokens), ("gallery", self.gallery_tokens)):
            if tok.shape[1] != len(vocab) or ((tok < 0) | (tok >= vocab)).any():
                raise GeoTokenError(f"{self.source}: {name} tokens do not fit vocabularies {vocab_sizes}")

    def batch(self, rows: np.ndarray, k: int) -> Batch:
        """Batch for query rows (B,): their embeddings, first k neighbours' embeddings and tokens, targets."""
        rows = np.asarray(rows, dtype=np.int64)
        nbr = np.asarray(self.neighbours[rows, :k])  # (B, k) gallery rows
        return Batch(
            query={m: _rows(a, rows) for m, a in self.query.items()},  # (B, D_m)
            nbr={m: _rows(a, nbr) for m, a in self.gallery.items()} if k else {},  # (B, k, D_m)
            nbr_tokens=torch.from_numpy(np.asarray(self.gallery_tokens[nbr], dtype=np.int64)),  # (B, k, T)
            targets=torch.from_numpy(np.asarray(self.query_tokens[rows], dtype=np.int64)),  # (B, T)
        )

    # ------------------------------------------------------------------------------ from the pipeline's folders
    @classmethod
    def load(
        cls,
        features: str | Path,
        neighbours: str | Path,
        gallery: str | Path | None = None,
        modalities: list[str] | None = None,
        level: int = 20,
        group: int = 2,
    ) -> TrainData:
        """A query feature store, its neighbour folder (`index.npy`) and the gallery store (default: same)."""
        from geotoken.features import FeatureStore
        from geotoken.s2 import latlon_to_tokens

        qstore = FeatureStore.open(features)
        gstore = qstore if gallery is None or Path(gallery) == Path(features) else FeatureStore.open(gallery)
        names = modalities or [m for m in ("visual", "gps", "text") if m in qstore]
        if not names:
            raise GeoTokenError(
                f"{features}: no aligned arrays (visual/gps/text); run the alignment step first"
            )
        index_path = Path(neighbours) / "index.npy"
        if not index_path.is_file():
            raise GeoTokenError(f"{index_path} is missing: not a neighbour folder")
        index = np.load(index_path, mmap_mode="r")
        if index.dtype != np.int64:
            raise GeoTokenError(f"{index_path}: dtype {index.dtype}, expected int64")

        def arrays(store) -> dict[str, np.ndarray]:
            out = {m: store[m] for m in names}
            if sum(a.nbytes for a in out.values()) < IN_MEMORY_BYTES:
                out = {m: np.ascontiguousarray(a) for m, a in out.items()}
            return out

        def tokens(store) -> np.ndarray:
            coords = np.asarray(store.coords)
            return latlon_to_tokens(coords[:, 0], coords[:, 1], level, group)

        q = arrays(qstore)
        g = q if gstore is qstore else arrays(gstore)
        qt = tokens(qstore)
        gt = qt if gstore is qstore else tokens(gstore)
        index = np.ascontiguousarray(index) if index.nbytes < IN_MEMORY_BYTES else index
        return cls(q, g, index, qt, gt, np.asarray(qstore.coords), source=f"{features} + {neighbours}")


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

"""The retrieval gallery as the model reads it, and the one place where model inputs are assembled.

Training, prediction and the reward scorer all call `Gallery.batch`: query embeddings plus the gallery
rows of their retrieved neighbours -> `geotoken.model.Batch` (neighbour embeddings and location tokens
gathered by indexing, never by a loop over samples). A query therefore gives the same tensors whichever
path it takes, and what the model reads is decided by its config alone (k, modalities, whether it reads
the neighbours' embeddings).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch

from geotoken.errors import GeoTokenError
from geotoken.features import FeatureStore
from geotoken.features.store import read_rows
from geotoken.model import Batch, ModelConfig
from geotoken.retrieval import check_neighbours
from geotoken.s2 import latlon_to_tokens


@dataclass
class Gallery:
    """Aligned embeddings {m: (G, D_m)}, location tokens (G, T) int64 and coordinates (G, 2) float64 of
    the gallery. Arrays may be memmaps (a 4.7M-row gallery stays on disk) or in-memory copies."""

    embeddings: dict[str, np.ndarray]
    tokens: np.ndarray
    coords: np.ndarray | None = None
    source: str = "gallery"  # names the files in error messages
    heads: dict[str, str] = field(default_factory=dict)  # {array: fingerprint of the heads that wrote it}

    def __post_init__(self) -> None:
        G = len(self.tokens)
        if np.ndim(self.tokens) != 2:
            raise GeoTokenError(f"{self.source}: tokens have shape {np.shape(self.tokens)}, expected (G, T)")
        for m, a in self.embeddings.items():
            if len(a) != G:
                raise GeoTokenError(f"{self.source}: array {m!r} has {len(a)} rows, tokens {G}")
        if self.coords is not None and np.shape(self.coords) != (G, 2):
            raise GeoTokenError(f"{self.source}: coordinates {np.shape(self.coords)}, expected ({G}, 2)")

    @property
    def rows(self) -> int:
        return len(self.tokens)

    @classmethod
    def from_store(
        cls,
        store: FeatureStore | str | os.PathLike,
        modalities: list[str],
        level: int = 20,
        group: int = 2,
        tokens: np.ndarray | None = None,
    ) -> Gallery:
        """The arrays `modalities` of an aligned feature store; tokens computed at (level, group) unless given."""
        store = store if isinstance(store, FeatureStore) else FeatureStore.open(store)
        missing = [m for m in modalities if m not in store]
        if missing:
            raise GeoTokenError(f"{store.root}: no aligned array(s) {missing}; run the alignment first")
        coords = np.asarray(store.coords, dtype=np.float64)
        if tokens is None:
            tokens = latlon_to_tokens(coords[:, 0], coords[:, 1], level, group)
        arrays = {m: store[m] for m in modalities}
        heads = {m: h for m, h in store.heads.items() if m in modalities}
        return cls(arrays, np.asarray(tokens), coords, source=str(store.root), heads=heads)

    def check(self, cfg: ModelConfig) -> None:
        """Fail early, naming the field, if this gallery cannot feed a model with config `cfg`."""
        if cfg.k and cfg.use_neighbour_embeddings:
            missing = [m for m in cfg.modalities if m not in self.embeddings]
            if missing:
                raise GeoTokenError(
                    f"{self.source}: no array(s) {missing} that the model reads for neighbours"
                )
            wrong = {
                m: self.embeddings[m].shape[1]
                for m, d in cfg.modalities.items()
                if self.embeddings[m].shape[1] != d
            }
            if wrong:
                raise GeoTokenError(
                    f"{self.source}: array dims {wrong} differ from the model's {cfg.modalities}"
                )
        vocab = np.asarray(cfg.vocab_sizes)
        if self.tokens.shape[1] != len(vocab) or ((self.tokens < 0) | (self.tokens >= vocab)).any():
            raise GeoTokenError(
                f"{self.source}: tokens {self.tokens.shape} do not fit the model's vocabularies {cfg.vocab_sizes}"
            )

    def batch(
        self,
        query: dict[str, np.ndarray],
        neighbours: np.ndarray | None,
        cfg: ModelConfig,
        targets: np.ndarray | None = None,
    ) -> Batch:
        """Model inputs on the CPU for B queries.

        query {m: (B, D_m)} aligned embeddings (any float dtype); neighbours (B, >=k) gallery rows, best
        first (None when the model reads none); targets (B, T) location tokens (training) or None.
        """
        missing = [m for m in cfg.modalities if m not in query]
        if missing:
            raise GeoTokenError(f"query embeddings lack {missing} (have {sorted(query)})")
        q = {m: torch.as_tensor(np.asarray(query[m], dtype=np.float32)) for m in cfg.modalities}  # (B, D_m)
        tgt = None if targets is None else torch.from_numpy(np.asarray(targets, dtype=np.int64))  # (B, T)
        k = cfg.k
        if not k:
            return Batch(q, targets=tgt)
        if neighbours is None:
            raise GeoTokenError(f"the model reads k={k} neighbours; none were given")
        rows = np.asarray(neighbours)
        B = len(rows)
        if (
            rows.ndim != 2
            or rows.shape[1] < k
            or (B and (rows[:, :k].min() < 0 or rows[:, :k].max() >= self.rows))
        ):
            raise GeoTokenError(
                f"neighbour rows must be (B, >={k}) in 0..{self.rows - 1}, got shape {rows.shape}"
            )
        flat = np.ascontiguousarray(rows[:, :k], dtype=np.int64).reshape(-1)  # (B*k,)
        nbr = {}
        if cfg.use_neighbour_embeddings:
            nbr = {
                m: torch.from_numpy(read_rows(self.embeddings[m], flat)).view(B, k, -1)
                for m in cfg.modalities
            }
        tokens = torch.from_numpy(np.asarray(self.tokens[flat], dtype=np.int64)).view(B, k, -1)  # (B, k, T)
        return Batch(q, nbr, tokens, tgt)


def load_queries(
    store_dir: str | os.PathLike,
    modalities: list[str],
    neighbours_dir: str | os.PathLike | None = None,
    made_by: str | None = None,
    training: bool = False,
) -> tuple[dict[str, np.ndarray], np.ndarray | None, np.ndarray, np.ndarray]:
    """Aligned query embeddings {m: (N, D)} (memmaps), neighbour rows (N, k) or None, true lat, lon (N,).

    Rows the store skipped (unreadable images) are left out of all four. made_by: the fingerprint of the
    alignment heads the arrays must come from (a bundle's, `Geolocator.made_by`). training: the rows train
    something (the reward scorer): see `check_neighbours`.
    """
    store = FeatureStore.open(store_dir)
    store.check_heads(made_by, "the model's alignment heads")
    missing = [m for m in modalities if m not in store]
    if missing:
        raise GeoTokenError(f"{store_dir}: no finished aligned array(s) {missing}; run the alignment first")
    keep = np.flatnonzero(store.valid)
    everything = len(keep) == store.rows
    emb = {m: store[m] if everything else np.asarray(store[m][keep]) for m in modalities}
    coords = np.asarray(store.coords)[keep]
    rows = None
    if neighbours_dir is not None:
        table = check_neighbours(neighbours_dir, store, training=training)  # this store's, a row per query
        rows = np.asarray(table.rows[keep])
    return emb, rows, coords[:, 0].copy(), coords[:, 1].copy()

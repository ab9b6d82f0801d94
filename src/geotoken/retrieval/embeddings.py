"""Which embedding of a feature store is searched: one array ("gps") or a concatenation ("visual+gps").

A concatenation of p unit vectors is divided by sqrt(p), so it stays unit-norm and its inner product is
the mean of the parts' cosine similarities: each part counts equally.
"""

from __future__ import annotations

import numpy as np

from geotoken.errors import GeoTokenError
from geotoken.features import FeatureStore

# what an index searches unless told otherwise: the most robust for 1-NN geolocation on EarthViews
# (`geotoken index --help` has the numbers)
DEFAULT_EMBEDDING = "visual+gps"


def join_embeddings(parts: list[np.ndarray]) -> np.ndarray:
    """float32 (..., sum D) concatenation of unit-vector parts, scaled by 1/sqrt(p) to stay unit-norm."""
    if len(parts) == 1:
        return np.asarray(parts[0], dtype=np.float32)
    scale = np.float32(1 / np.sqrt(len(parts)))
    return np.concatenate([np.asarray(p, dtype=np.float32) * scale for p in parts], axis=-1)


class StoreEmbeddings:
    """Read-only (N, D) view of a store's embedding `spec`; indexing returns float32 rows."""

    def __init__(self, store: FeatureStore, spec: str):
        self.store, self.spec = store, spec
        self.names = spec.split("+")
        missing = [n for n in self.names if n not in store]
        if not spec or missing:
            raise GeoTokenError(
                f"{store.root}: embedding {spec!r} needs arrays {missing or [spec]}; the store has {sorted(store)}"
            )
        self.parts = [store[n] for n in self.names]
        self.shape = (store.rows, sum(p.shape[1] for p in self.parts))

    @property
    def heads(self) -> dict[str, str]:
        """{part: fingerprint of the alignment heads that wrote it}, for the index to record."""
        return {n: h for n, h in self.store.heads.items() if n in self.names}

    @property
    def dim(self) -> int:
        return self.shape[1]

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        return join_embeddings([p[rows] for p in self.parts])

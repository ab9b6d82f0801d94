"""The `Manifest` table: one row per image (id, lat, lon, image reference), in the order later arrays follow.

Readers that build one (`geotoken.data.manifest`) and readers of the images behind one
(`geotoken.data.images`) both use this type; it depends on neither.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
from dataclasses import dataclass

import numpy as np

from geotoken.io import atomic_open

_NEEDS_QUOTES = re.compile(r'[,"\r\n]')


@dataclass
class Manifest:
    """One row per image, in the order every later array follows.

    ids: (N,) str; lat, lon: (N,) float64 degrees; images: (N,) str image references ('' when the row has none):
    a file path or `SHARD.tar#MEMBER`; source: the file (or name) the rows came from.
    """

    ids: np.ndarray
    lat: np.ndarray
    lon: np.ndarray
    images: np.ndarray
    source: str = ""

    def __post_init__(self) -> None:
        self.ids = np.asarray(self.ids, dtype=np.str_).reshape(-1)
        self.lat = np.asarray(self.lat, dtype=np.float64).reshape(-1)
        self.lon = np.asarray(self.lon, dtype=np.float64).reshape(-1)
        self.images = np.asarray(self.images, dtype=np.str_).reshape(-1)
        self.source = str(self.source)
        n = len(self.ids)
        for name in ("lat", "lon", "images"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"Manifest: {name} has {len(getattr(self, name))} rows, ids has {n}")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def coords(self) -> np.ndarray:
        """(N, 2) float64 [lat, lon]."""
        return np.stack([self.lat, self.lon], axis=1)

    def subset(self, rows) -> Manifest:
        """The rows selected by an integer index array or a boolean mask, in that order."""
        rows = np.asarray(rows)
        return Manifest(self.ids[rows], self.lat[rows], self.lon[rows], self.images[rows], self.source)

    def write_csv(self, path: str | os.PathLike) -> None:
        """Write `id,lat,lon,image` atomically. Images inside the CSV's folder are written relative to it,
        so the folder can be moved; `read_manifest` resolves them back. Floats round-trip exactly."""
        folder = os.path.abspath(os.path.dirname(os.path.abspath(path))) + os.sep
        cut = len(folder)
        ids = self.ids.tolist()
        images = [s[cut:] if s.startswith(folder) else s for s in self.images.tolist()]
        rows = zip(ids, self.lat.tolist(), self.lon.tolist(), images)
        with atomic_open(path, "w", newline="", encoding="utf-8") as f:
            f.write("id,lat,lon,image\n")
            if _NEEDS_QUOTES.search("".join(ids)) or _NEEDS_QUOTES.search("".join(images)):
                csv.writer(f, lineterminator="\n").writerows(rows)
            else:  # nothing to quote: plain lines (~1.4x faster than csv.writer); repr(float) round-trips
                f.writelines(f"{i},{a!r},{b!r},{m}\n" for i, a, b, m in rows)

    def content_hash(self) -> str:
        """Hex SHA-256 of ids, coordinates and image references (not of `source`): a dataset's identity.
        Images count from the folder they all share, so the same dataset moved elsewhere (another mount,
        a copied disk) keeps its identity and a killed `embed` of it still resumes."""
        h = hashlib.sha256()
        images = self.images.tolist()
        shared = os.path.commonprefix(images) if images else ""
        cut = max(shared.rfind("/"), shared.rfind(os.sep)) + 1  # whole folder names only
        for strings in (self.ids.tolist(), [r[cut:] for r in images]):
            h.update(len(strings).to_bytes(8, "little"))
            h.update("\x00".join(strings).encode("utf-8"))
        h.update(np.ascontiguousarray(self.lat, dtype="<f8").tobytes())
        h.update(np.ascontiguousarray(self.lon, dtype="<f8").tobytes())
        return h.hexdigest()

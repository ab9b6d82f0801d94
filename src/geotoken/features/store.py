"""The feature store: one folder of float16 `.npy` arrays whose rows follow a manifest's rows.

Layout of a store folder:

    store.json       header: backbone config, array dims, row count, manifest hash, skipped rows, ids
    features.npy     float16 (N, F)  raw backbone output                (written by `embed`)
    visual.npy ...   float16 (N, D)  L2-normalised aligned embeddings   (written by `align.apply`)
    coords.npy       float64 (N, 2)  (lat, lon) of every row, copied from the manifest
    skipped.csv      manifest_row,id,image,reason of images that could not be read (only with
                     --skip-bad); manifest_row is 1-based, as messages say it (the header's `skipped`
                     holds the 0-based array rows, NaN there)

Arrays are opened as read-only memmaps, so a 4.7M-row gallery costs no RAM until rows are touched.
Rows are written with `os.pwrite` at their byte offset rather than through a shared memmap: several
processes (or machines on a shared file system) can then fill disjoint rows of one file safely.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib.format import open_memmap

from geotoken.errors import GeoTokenError
from geotoken.io import read_json, write_json

FORMAT = "geotoken.feature-store"
VERSION = 1
HEADER = "store.json"
COORDS = "coords.npy"
SKIPPED = "skipped.csv"


ALIGNED = ("visual", "gps", "text")  # what `geotoken align apply` writes beside the backbone's "features"


class MissingArray(GeoTokenError, KeyError):
    """A store has no (complete) array of that name: a one-line error, and still a KeyError for lookups."""

    def __str__(self) -> str:  # KeyError's str() would quote the message
        return str(self.args[0])


def load_array(path: Path, shape: tuple[int, ...] | None = None) -> np.memmap:
    """A store's `.npy` file, memory-mapped, checked to hold `shape`: a truncated or replaced file is an
    error naming it, not numpy's "mmap length is greater than file size" far from its cause."""
    try:
        array = np.load(path, mmap_mode="r")
    except FileNotFoundError:
        raise GeoTokenError(
            f"{path}: missing from its feature store; rerun the command that wrote it"
        ) from None
    except (ValueError, OSError, EOFError) as exc:
        raise GeoTokenError(f"{path}: damaged ({exc}); rerun the command that wrote it") from None
    if shape is not None and array.shape != shape:
        raise GeoTokenError(f"{path}: holds an array of shape {array.shape}, its store expects {shape}")
    return array


class RowWriter:
    """Writes row blocks of one float16 `.npy` file in place (pwrite at the row's byte offset)."""

    def __init__(self, path: str | os.PathLike):
        array = np.load(path, mmap_mode="r")
        self.path = Path(path)
        self.shape, self.dtype, self.offset = array.shape, array.dtype, array.offset
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        del array
        self.fd = os.open(self.path, os.O_WRONLY)

    def write(self, start: int, rows: np.ndarray) -> None:
        """Write `rows` (n, *shape[1:]) at rows start..start+n of the file."""
        if rows.shape[1:] != self.shape[1:] or not 0 <= start <= start + len(rows) <= self.shape[0]:
            raise ValueError(f"{self.path}: cannot write {rows.shape} at row {start} of {self.shape}")
        data = np.ascontiguousarray(rows, dtype=self.dtype).tobytes()
        os.pwrite(self.fd, data, self.offset + start * self.row_bytes)

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FeatureStore(Mapping):
    """A store folder: maps array name -> read-only float16 memmap (N, dim); `.ids`, `.coords`, `.header`."""

    def __init__(self, root: str | os.PathLike, header: dict[str, Any]):
        self.root = Path(root)
        self.header = header
        self._arrays: dict[str, np.memmap] = {}

    # ----------------------------------------------------------------------------------------- create/open
    @classmethod
    def create(
        cls,
        root: str | os.PathLike,
        ids: Sequence[str],
        coords: np.ndarray,
        arrays: Mapping[str, int],
        **info: Any,
    ) -> FeatureStore:
        """Make a new store with zero-filled (sparse) arrays {name: dim}; `info` goes into the header.

        The header is written last, so a folder without `store.json` is never mistaken for a store.
        """
        root = Path(root)
        ids = [str(i) for i in ids]
        coords = np.asarray(coords, dtype=np.float64)
        if coords.shape != (len(ids), 2):
            raise ValueError(f"coords must be ({len(ids)}, 2), got {coords.shape}")
        root.mkdir(parents=True, exist_ok=True)
        (root / HEADER).unlink(missing_ok=True)
        for name, dim in arrays.items():
            open_memmap(root / f"{name}.npy", mode="w+", dtype=np.float16, shape=(len(ids), int(dim))).flush()
        np.save(root / COORDS, coords)
        header = {
            "format": FORMAT,
            "version": VERSION,
            "rows": len(ids),
            **info,
            "arrays": {name: {"dim": int(dim), "complete": False} for name, dim in arrays.items()},
            "skipped": [],
            "ids": ids,
        }
        write_json(root / HEADER, header)
        return cls(root, header)

    @classmethod
    def open(cls, root: str | os.PathLike) -> FeatureStore:
        root = Path(root)
        if not (root / HEADER).is_file():
            raise GeoTokenError(
                f"{root}: not a feature store (no {HEADER}); create one with `geotoken embed`"
            )
        header = read_json(root / HEADER)
        if header.get("format") != FORMAT:
            raise GeoTokenError(
                f"{root / HEADER}: field 'format' is {header.get('format')!r}, expected {FORMAT!r}"
            )
        if len(header["ids"]) != header["rows"]:
            raise GeoTokenError(f"{root / HEADER}: {len(header['ids'])} ids for {header['rows']} rows")
        return cls(root, header)

    def reload(self) -> FeatureStore:
        return FeatureStore.open(self.root)

    def save_header(self) -> None:
        write_json(self.root / HEADER, self.header)

    # ----------------------------------------------------------------------------------------- arrays
    def __getitem__(self, name: str) -> np.memmap:
        """Read-only memmap of a complete array (an unfinished one raises, naming the store)."""
        meta = self.header["arrays"].get(name)
        if meta is None:
            message = f"{self.root}: no array {name!r} (has: {', '.join(self.header['arrays'])})"
            if name in ALIGNED and "features" in self.header["arrays"]:  # embedded, not aligned yet
                message += f"; the aligned {', '.join(ALIGNED)} embeddings come from `geotoken align apply HEADS STORE`"
            raise MissingArray(message)
        if not meta["complete"]:
            raise GeoTokenError(
                f"{self.root}: array {name!r} is unfinished; rerun the command that writes it"
            )
        if name not in self._arrays:
            self._arrays[name] = load_array(self.root / f"{name}.npy", (self.rows, int(meta["dim"])))
        return self._arrays[name]

    def __iter__(self) -> Iterator[str]:
        return (name for name, meta in self.header["arrays"].items() if meta["complete"])

    def __len__(self) -> int:
        return sum(meta["complete"] for meta in self.header["arrays"].values())

    def __contains__(self, name: object) -> bool:
        """True for complete arrays only (an unfinished one is not usable yet)."""
        meta = self.header["arrays"].get(name)
        return bool(meta and meta["complete"])

    def add_array(self, name: str, dim: int, **meta: Any) -> Path:
        """Create (or recreate) a zero-filled array `name` (N, dim), marked unfinished; returns its path."""
        path = self.root / f"{name}.npy"
        self._arrays.pop(name, None)
        self.header["arrays"][name] = {"dim": int(dim), "complete": False, **meta}
        self.save_header()
        open_memmap(path, mode="w+", dtype=np.float16, shape=(self.rows, int(dim))).flush()
        return path

    def mark_complete(self, name: str) -> None:
        self.header["arrays"][name]["complete"] = True
        self.save_header()

    def writer(self, name: str) -> RowWriter:
        return RowWriter(self.root / f"{name}.npy")

    # ----------------------------------------------------------------------------------------- rows
    @property
    def rows(self) -> int:
        return int(self.header["rows"])

    @property
    def ids(self) -> list[str]:
        return self.header["ids"]

    @property
    def dims(self) -> dict[str, int]:
        return {name: meta["dim"] for name, meta in self.header["arrays"].items()}

    @property
    def heads(self) -> dict[str, str]:
        """{array: fingerprint of the alignment heads that wrote it} for the aligned arrays that record one."""
        return {n: m["heads"] for n, m in self.header["arrays"].items() if isinstance(m.get("heads"), str)}

    def check_heads(self, made_by: dict[str, str] | str | None, other: str) -> None:
        """Raise if an aligned array of this store was written by other alignment heads than `made_by` (one
        fingerprint, or one per array name) says wrote `other`'s: neighbours and the model would compare
        embeddings from two different spaces (e.g. queries re-aligned after `align train` ran again).
        Arrays without a fingerprint on either side (stores from before fingerprints) pass."""
        if not made_by:
            return
        for name, mine in self.heads.items():
            theirs = made_by if isinstance(made_by, str) else made_by.get(name)
            if theirs and theirs != mine:
                raise GeoTokenError(
                    f"{self.root}: its {name!r} embeddings were written by alignment heads {mine[:12]}, "
                    f"{other} by {theirs[:12]}: run `geotoken align apply` with one set of heads on both "
                    "(then rebuild the index and the neighbour tables)"
                )

    @property
    def coords(self) -> np.ndarray:
        """float64 (N, 2) latitude, longitude in degrees."""
        return load_array(self.root / COORDS, (self.rows, 2))

    @property
    def skipped(self) -> list[dict[str, Any]]:
        """[{row, id, reason}] of images that could not be read; their feature rows are NaN."""
        return self.header["skipped"]

    @property
    def valid(self) -> np.ndarray:
        """bool (N,): False for skipped rows."""
        mask = np.ones(self.rows, dtype=bool)
        mask[[s["row"] for s in self.skipped]] = False
        return mask

    def __repr__(self) -> str:
        arrays = ", ".join(
            f"{n}:{m['dim']}{'' if m['complete'] else '(unfinished)'}"
            for n, m in self.header["arrays"].items()
        )
        return f"FeatureStore({str(self.root)!r}, rows={self.rows}, arrays=[{arrays}])"


def read_rows(array: np.ndarray, rows: np.ndarray | slice) -> np.ndarray:
    """`array[rows]` as a new float32 C-contiguous array: the one reader of stored feature rows.

    array: (N, *F) of any numeric dtype: a store's float16 memmap, or an array in memory.
    rows: integer row indices of any shape (...,) (unsorted, repeated and negative indices allowed), giving
        (..., *F); or a slice, giving (len, *F). A 1-d index (n,) gives (n, *F).
    A memmap is read in sorted row order, for disk locality, and the rows are put back in the order asked;
    an in-memory array is gathered directly. The values are the same either way: those of `array[rows]`,
    converted to float32. The result never shares memory with `array` (`torch.from_numpy` of it is safe).
    """
    if isinstance(rows, slice):
        return np.array(array[rows], dtype=np.float32, order="C")  # one contiguous read, copied
    rows = np.asarray(rows, dtype=np.int64)
    flat = rows.reshape(-1)
    if isinstance(array, np.memmap):
        order = np.argsort(flat, kind="stable")
        out = np.empty((flat.size, *array.shape[1:]), dtype=np.float32)
        out[order] = array[flat[order]]
    else:
        out = np.ascontiguousarray(array[flat], dtype=np.float32)
    return out.reshape(*rows.shape, *array.shape[1:])

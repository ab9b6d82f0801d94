"""Annotation files -> one validated table: id, lat, lon, image reference per row.

Every later stage (features, neighbours, tokens) follows the row order of a `Manifest`, so this is where bad
input is caught: missing columns, unparseable or out-of-range coordinates, duplicate ids, missing images.
Each problem either raises a `GeoTokenError` naming the file, the line and the value, or (on_error="skip") drops
the row and writes it to a CSV skip report. Nothing is dropped silently.

Supported layouts (columns are found by name, case-insensitively, from the aliases in `COLUMN_ALIASES`):
- MP16 / MP16-Pro, Im2GPS3k (`im2gps3k_places365.csv`), YFCC4k (`yfcc25600_places365.csv`, `yfcc4k_places365.csv`):
  `IMG_ID, ..., LAT, LON`. The image's path relative to `image_root` is the id.
- OSV-5M: `id, latitude, longitude, ...`; the image file is `{id}.jpg` directly under `image_root`.
Real downloads put images elsewhere (OSV-5M's `images/test/00/<id>.jpg` or its zip archives, MP16 in tar
shards, YFCC4k's 4,536 images for 25,600 rows): `geotoken.data.datasets` finds each row's image in those
layouts and reports rows without an image and images without a row (`geotoken manifest --format`).
- plain: `id,lat,lon,image` or `id,lat,lon,path` (what `Manifest.write_csv` writes), GeoCLIP's
  `IMG_FILE,LAT,LON`. Without an id column the image reference, as the file spells it, is the id.
- `LAT,LON` without ids (GeoCLIP's gallery): ids are the 0-based data row numbers, no images.
- img2dataset WebDataset shards (`manifest_from_shards`): lat/lon (and the id) from each sample's `KEY.json`.

Coordinates: latitude in [-90, 90], longitude in [-180, 180]. Values beyond by at most `COORD_TOLERANCE`
degrees are float noise from upstream tools: latitudes are clamped and longitudes wrapped into range. Anything
further out is an error (it usually means swapped or garbled columns, which wrapping would hide).
"""

from __future__ import annotations

import contextlib
import csv
import gc
import json
import os
import sys
import warnings
from collections.abc import Sequence
from operator import itemgetter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from geotoken.data.images import IMAGE_EXTENSIONS, read_shard_index, shard_samples
from geotoken.data.images import check_images as find_bad_images
from geotoken.data.table import Manifest
from geotoken.errors import GeoTokenError
from geotoken.io import atomic_open
from geotoken.s2 import latlon_to_tokens, vocab_sizes

# Role -> accepted header names (compared after lower-casing and mapping ' ' and '-' to '_'), in priority order.
COLUMN_ALIASES: dict[str, tuple[str, ...]] = {
    "id": ("id", "img_id", "image_id", "imgid", "photo_id", "key"),
    "lat": ("lat", "latitude", "gps_lat", "gps_latitude"),
    "lon": ("lon", "lng", "long", "longitude", "gps_lon", "gps_lng", "gps_longitude"),
    "image": (
        "image",
        "path",
        "image_path",
        "img_path",
        "filepath",
        "file_path",
        "filename",
        "file_name",
        "file",
        "img_file",  # GeoCLIP's loader
    ),
}
# Columns that only OSV-5M's annotation files have: with `id,latitude,longitude` they mean images are `{id}.jpg`.
_OSV5M_COLUMNS = {"thumb_original_url", "sequence", "captured_at", "land_cover"}
COORD_TOLERANCE = 1e-6  # degrees
# at least this share of rows with latitudes out of range (and all fine exchanged): the columns are swapped
SWAPPED_SHARE = 0.1
ON_ERROR = ("raise", "skip")

TOKEN_BLOCK = 1 << 20  # rows per progress step of `manifest_tokens`

csv.field_size_limit(sys.maxsize)


def normalize_column(name: str) -> str:
    """A header name (or json key) as `COLUMN_ALIASES` spells it: trimmed, no BOM, lower case, '_' for ' ' and '-'."""
    return name.strip().lstrip("\ufeff").lower().replace(" ", "_").replace("-", "_")


def detect_columns(header: list[str], path: str | os.PathLike = "<csv>") -> dict[str, int]:
    """Map roles ('id', 'lat', 'lon', 'image') to column indices; 'lat' and 'lon' are required."""
    names = [normalize_column(h) for h in header]
    found = {}
    for role, aliases in COLUMN_ALIASES.items():
        for alias in aliases:
            if alias in names:
                found[role] = names.index(alias)
                break
    missing = [r for r in ("lat", "lon") if r not in found]
    if missing:
        raise GeoTokenError(
            f"{path}: line 1: no {' or '.join(missing)} column in header {header}; "
            f"expected one of {[COLUMN_ALIASES[r] for r in missing]} (case-insensitive)"
        )
    return found


def _add(problems: dict[int, str], indices, reasons) -> None:
    """Record a reason per bad row; the first reason found for a row wins."""
    for i, r in zip(np.asarray(indices, dtype=np.int64).tolist(), reasons):
        problems.setdefault(i, r)


def _parse_floats(values: list[str], field: str, problems: dict[int, str]) -> np.ndarray:
    """str -> float64 for the whole column at once; only on failure walk it to find the bad cells."""
    try:
        return np.array(values, dtype=np.float64)
    except ValueError:
        out = np.full(len(values), np.nan)
        for i, v in enumerate(values):
            try:
                out[i] = float(v)
            except ValueError:
                problems.setdefault(i, f"{field} {v!r} is not a number")
        return out


def _check_range(x: np.ndarray, field: str, limit: float, wrap: bool, problems: dict[int, str]) -> np.ndarray:
    """Flag non-finite and out-of-range values; wrap (lon) or clamp (lat) overshoots within COORD_TOLERANCE."""
    bad = ~np.isfinite(x)
    _add(problems, np.flatnonzero(bad), [f"{field} {v!r} is not finite" for v in x[bad].tolist()])
    with np.errstate(invalid="ignore"):
        over = np.abs(x) > limit
        out = over & (np.abs(x) > limit + COORD_TOLERANCE)
    _add(
        problems,
        np.flatnonzero(out),
        [f"{field} {v!r} is outside [-{limit:g}, {limit:g}]" for v in x[out].tolist()],
    )
    fix = over & ~out
    if fix.any():
        x = x.copy()
        x[fix] = (x[fix] + 180.0) % 360.0 - 180.0 if wrap else np.clip(x[fix], -limit, limit)
    return x


def _check_swapped(lat: np.ndarray, lon: np.ndarray, names: dict[str, str], source: str, locations) -> None:
    """Refuse latitude/longitude columns that look exchanged instead of dropping half the rows as out of range
    and keeping the rest with swapped coordinates (the 2018 im2gps3k_places365.csv: header LON,LAT over
    lat,lon values). Guessing the fix could hide a real garbled column, so this is an error."""
    with np.errstate(invalid="ignore"):
        as_named = (np.abs(lat) <= 90.0 + COORD_TOLERANCE) & (np.abs(lon) <= 180.0 + COORD_TOLERANCE)
        exchanged = (np.abs(lat) <= 180.0 + COORD_TOLERANCE) & (np.abs(lon) <= 90.0 + COORD_TOLERANCE)
    only_exchanged = exchanged & ~as_named
    count = int(only_exchanged.sum())
    # a row that fits neither way (a garbled value, NaN) is a bad row either way: it says nothing of the columns
    if count < max(2, SWAPPED_SHARE * len(lat)) or (as_named & ~exchanged).any():
        return
    i = int(np.flatnonzero(only_exchanged)[0])
    where = locations(np.array([i])) if callable(locations) else [(locations[i], locations[i])]
    neither = int((~as_named & ~exchanged).sum())
    raise GeoTokenError(
        f"{source}: the {names['lat']!r} and {names['lon']!r} columns look swapped: {count} of {len(lat)} "
        f"rows have {names['lat']} outside [-90, 90] (first: {where[0][0]}: {float(lat[i])!r}) and every row "
        f"fits with the two exchanged{f' (but {neither} that fit neither way)' if neither else ''}; fix the "
        f"header (or get the current file: TIBHannover/GeoEstimation fixed im2gps3k_places365.csv in 2020)"
    )


def _line_numbers(path: Path, count: int) -> np.ndarray:
    """1-based file line where each data record starts (records with quoted newlines span several lines)."""
    lines = np.empty(count, dtype=np.int64)
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        next(reader, None)
        start = reader.line_num + 1
        i = 0
        for record in reader:
            if record:  # blank lines are not rows
                lines[i] = start
                i += 1
            start = reader.line_num + 1
    return lines


@contextlib.contextmanager
def _gc_paused():
    """Millions of small tuples trigger the cyclic GC over and over for nothing; none of them form cycles."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _check_options(on_error: str, skip_report, check_images) -> None:
    if on_error not in ON_ERROR:
        raise GeoTokenError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    if on_error == "skip" and skip_report is None:
        raise GeoTokenError("on_error='skip' needs a skip_report path, so that skipped rows are never silent")
    if check_images not in (False, True, "exists", "decode"):
        raise GeoTokenError(f"check_images must be False, True, 'exists' or 'decode', got {check_images!r}")


def read_manifest(
    path: str | os.PathLike,
    *,
    image_root: str | os.PathLike | None = None,
    check_images: bool | str = False,
    on_error: str = "raise",
    skip_report: str | os.PathLike | None = None,
    image_column: str | None = None,
) -> Manifest:
    """Read an annotation CSV (see the module docstring for layouts) into a validated `Manifest`.

    image_root: folder that relative image paths (and `SHARD.tar#MEMBER` shards) are resolved against; default
        the CSV's folder. Resolved references are absolute, so the manifest works from any directory.
    check_images: False; "exists" (file or tar member present); True or "decode" (also fully decoded, slow).
    on_error: "raise" -> `GeoTokenError` for the first bad row (file, line, value); "skip" -> drop bad rows and
        write `row,id,reason` to `skip_report` (row = 1-based line in the file; required, so nothing is
        dropped unseen). Blank lines are not rows and are ignored.
    image_column: take image references from this column (case-insensitive) instead of the detected one.
    """
    _check_options(on_error, skip_report, check_images)
    path = Path(path)
    if not path.is_file():
        raise GeoTokenError(f"{path}: annotation file not found")

    header = read_header(path)
    cols = detect_columns(header, path)
    if image_column is not None:
        names = [normalize_column(h) for h in header]
        if normalize_column(image_column) not in names:
            raise GeoTokenError(f"{path}: line 1: no column {image_column!r} in header {header}")
        cols["image"] = names.index(normalize_column(image_column))
    roles = [r for r in ("id", "lat", "lon", "image") if r in cols]

    # Fast path: numpy's C parser, when every row is well formed. Any parse error: the csv module path below,
    # which pins each problem to its row. Both skip blank lines, so data row i is the i-th non-blank record.
    columns, problems = _read_columns_numpy(path, cols, len(header)), {}
    if columns is None:
        columns, problems = _read_columns_csv(path, cols, roles, len(header))
    n = len(columns["lat"])
    id_role = "id" if "id" in cols else "image" if "image" in cols else None
    ids = list(columns[id_role]) if id_role else [str(i) for i in range(n)]
    images = _image_references(path, header, cols, columns, ids, image_root)

    def locate(rows: np.ndarray) -> list[tuple[str, int]]:
        lines = (rows + 2) if _count_lines(path) == n + 1 else _line_numbers(path, n)[rows]
        return [(f"{path}: line {line}", line) for line in lines.tolist()]

    return finish_manifest(
        ids,
        columns["lat"],
        columns["lon"],
        images,
        source=str(path),
        locations=locate,
        problems=problems,
        field_names={r: header[c] for r, c in (cols | {"id": cols[id_role]} if id_role else cols).items()},
        on_error=on_error,
        skip_report=skip_report,
        check_images=check_images,
    )


def read_header(path: Path) -> list[str]:
    """The first line of a CSV, or a GeoTokenError naming the file (empty, not UTF-8, unparseable)."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        try:
            return next(csv.reader(f))
        except StopIteration:
            raise GeoTokenError(f"{path}: file is empty (expected a header line)") from None
        except UnicodeDecodeError:
            raise not_utf8(path) from None
        except csv.Error as exc:
            raise GeoTokenError(f"{path}: line 1: cannot parse the header: {exc}") from None


def not_utf8(path: Path) -> GeoTokenError:
    """The error for a file that is not UTF-8, naming the line and byte of the first bad character (the
    decoder's own position is in a buffer read ahead, not the line the csv reader stands on)."""
    line, offset, carry = 1, 0, b""
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            data = carry + block
            try:
                data.decode("utf-8")
                carry = b""
            except UnicodeDecodeError as exc:
                if exc.reason == "unexpected end of data" and exc.end == len(data):
                    carry = data[exc.start :]  # a character cut by the block boundary: read on
                    data = data[: exc.start]
                else:
                    line += data.count(b"\n", 0, exc.start)
                    return GeoTokenError(
                        f"{path}: line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
                        f"{offset + exc.start}); save the file as UTF-8"
                    )
            line += data.count(b"\n")
            offset += len(data)
    return GeoTokenError(f"{path}: line {line}: not UTF-8 text (the file ends inside a character)")


def _read_columns_numpy(
    path: Path, cols: dict[str, int], width: int
) -> dict[str, list[str] | np.ndarray] | None:
    """Columns via np.loadtxt (C parser): string columns as lists, lat/lon as float64. None if any row fails,
    or if the file's commas are not `width - 1` a line (loadtxt reads the columns it is given and ignores
    the rest: a row with more fields, or quoted commas, go to the csv module's path, which tells them apart)."""
    opts = dict(delimiter=",", quotechar='"', skiprows=1, comments=None, encoding="utf-8", ndmin=2)
    text_roles = [r for r in ("id", "image") if r in cols]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "input contained no data" for a header-only file
            coords = np.loadtxt(path, usecols=(cols["lat"], cols["lon"]), dtype=np.float64, **opts)
            text = (
                np.loadtxt(path, usecols=[cols[r] for r in text_roles], dtype=str, **opts)
                if text_roles
                else None
            )
    except (ValueError, UnicodeDecodeError):
        return None
    if _count_bytes(path, b",") != (width - 1) * (len(coords) + 1):
        return None
    columns = {"lat": coords[:, 0].copy(), "lon": coords[:, 1].copy()}
    for k, role in enumerate(text_roles):
        columns[role] = text[:, k].tolist() if len(text) else []
    if text is not None and len(text) != len(coords):
        return None
    return columns


def _read_columns_csv(path: Path, cols: dict[str, int], roles: list[str], width: int):
    """Columns via the csv module, one pass; rows with fewer fields than the header (cut short: a download
    that stopped inside a coordinate leaves `...,166.` for 166.156), and rows with more fields than the header
    (an unquoted comma cuts a path short), become problems; empty trailing fields (`a,1,2,`) are not more
    fields."""
    index = [cols[r] for r in roles]
    get = itemgetter(*index)
    odd: list[tuple[int, int]] = []  # (data row, field count)

    def odd_row(i: int, row: list[str]) -> tuple[str, ...]:
        if len(row) < width or any(row[width:]):
            odd.append((i, len(row)))
        return tuple(row[c] if c < len(row) else "" for c in index)

    with _gc_paused(), open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        next(reader)
        try:  # filter(None, ...) drops blank lines (csv yields [] for them): they are not rows
            picked = [
                get(r) if len(r) == width else odd_row(i, r) for i, r in enumerate(filter(None, reader))
            ]
        except UnicodeDecodeError:
            raise not_utf8(path) from None
        except csv.Error as exc:
            raise GeoTokenError(f"{path}: line {reader.line_num + 1}: cannot parse CSV: {exc}") from None
        columns = {r: [p[k] for p in picked] for k, r in enumerate(roles)}
    problems = {
        i: f"has {count} fields, the header has {width}"
        + (" (an unquoted comma?)" if count > width else " (cut short: an interrupted download?)")
        for i, count in odd
    }
    return columns, problems


def _count_bytes(path: Path, byte: bytes) -> int:
    """How often `byte` occurs in the file, counted in 16 MiB blocks."""
    count = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            count += block.count(byte)
    return count


def _count_lines(path: Path) -> int:
    """Number of lines (a last line without a newline counts)."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return 0
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
    return _count_bytes(path, b"\n") + (last != b"\n")


def finish_manifest(
    ids: list[str],
    lat: list[str],
    lon: list[str],
    images: list[str],
    *,
    source: str,
    locations,
    problems: dict[int, str] | None = None,
    field_names: dict[str, str] | None = None,
    on_error: str = "raise",
    skip_report: str | os.PathLike | None = None,
    check_images: bool | str = False,
) -> Manifest:
    """Validate raw columns (coordinates as strings) into a Manifest: the checks every reader shares.

    locations: a list with one label per row, or a function rows -> [(message prefix, report row)].
    problems: rows already known to be bad (row -> reason)."""
    _check_options(on_error, skip_report, check_images)
    problems = dict(problems or {})
    names = {"id": "id", "lat": "lat", "lon": "lon", **(field_names or {})}
    n = len(ids)
    lat, lon = _parse_floats(lat, names["lat"], problems), _parse_floats(lon, names["lon"], problems)
    _check_swapped(lat, lon, names, source, locations)
    lat = _check_range(lat, names["lat"], 90.0, False, problems)
    lon = _check_range(lon, names["lon"], 180.0, True, problems)
    unique = set(ids)
    if "" in unique:
        empty = [i for i, s in enumerate(ids) if not s]
        _add(problems, empty, [f"{names['id']} is empty"] * len(empty))
    duplicate_of: dict[int, int] = {}  # row -> row of the id's first occurrence
    if len(unique) != n:
        first: dict[str, int] = {}
        for i, s in enumerate(ids):
            j = first.setdefault(s, i)
            if j != i and s and i not in problems:
                duplicate_of[i] = j
                problems[i] = f"duplicate {names['id']} {s!r}"
    manifest = Manifest(ids, lat, lon, images, source)

    if check_images:
        ok = np.ones(n, dtype=bool)
        ok[list(problems)] = False
        for row, reason in find_bad_images(
            manifest, np.flatnonzero(ok), decode=check_images in (True, "decode")
        ):
            problems.setdefault(row, reason)
    if not problems:
        if skip_report is not None:
            write_skip_report(skip_report, [], [], [])
        return manifest

    bad = np.array(sorted(problems), dtype=np.int64)
    firsts = sorted(set(duplicate_of.values()))
    if callable(locations):
        where = locations(np.concatenate([bad, np.array(firsts, dtype=np.int64)]))
    else:
        where = [(locations[i], locations[i]) for i in bad.tolist() + firsts]
    first_at = dict(zip(firsts, where[len(bad) :]))
    for i, j in duplicate_of.items():
        row = first_at[j][1]
        problems[i] += f" (first at {'line ' if isinstance(row, int) else ''}{row})"
    if on_error == "raise":
        i = int(bad[0])
        more = (
            f" ({len(bad) - 1} more bad rows; `geotoken manifest FILE -o CLEAN.csv --skip-bad` (or "
            "--format FORMAT, for a dataset whose images are named by id) writes the file without them and "
            "lists them in CLEAN.report.csv; library: on_error='skip')"
            if len(bad) > 1
            else ""
        )
        raise GeoTokenError(f"{where[0][0]}: id {ids[i]!r}: {problems[i]}{more}")
    rows = bad.tolist()
    write_skip_report(
        skip_report, [w[1] for w in where[: len(bad)]], [ids[i] for i in rows], [problems[i] for i in rows]
    )
    keep = np.ones(n, dtype=bool)
    keep[bad] = False
    return manifest if keep.all() else manifest.subset(np.flatnonzero(keep))


def write_skip_report(path: str | os.PathLike, rows, ids, reasons) -> None:
    """CSV `row,id,reason` (row = 1-based line in the input file), written atomically."""
    with atomic_open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["row", "id", "reason"])
        w.writerows(zip(np.asarray(rows).tolist(), ids, reasons))


def image_source(header: list[str], cols: dict[str, int]) -> str | None:
    """Where a row's image comes from: "image" (a column of paths), "img_id" (MP16, Im2GPS3k, YFCC4k: the
    id is the path), "osv5m" (`{id}.jpg`), or None (no images)."""
    if "image" in cols:
        return "image"
    if "id" not in cols:
        return None
    if normalize_column(header[cols["id"]]) == "img_id":
        return "img_id"
    norm = {normalize_column(h) for h in header}
    if normalize_column(header[cols["lat"]]) == "latitude" and norm & _OSV5M_COLUMNS:
        return "osv5m"
    return None


def _image_references(path, header, cols, columns, ids, image_root) -> list[str]:
    """Absolute image references per row: the image column, else the id for layouts where it is the file name."""
    kind = image_source(header, cols)
    if kind is None:
        return [""] * len(ids)
    if kind == "image":
        refs = columns["image"]
    elif kind == "img_id":
        refs = ids
    else:
        refs = [f"{s}.jpg" for s in ids]
    root = os.path.abspath(image_root if image_root is not None else path.parent).rstrip(os.sep) + os.sep
    absolute = os.sep  # what an absolute path starts with (POSIX); remote URLs are kept as they are
    return [r if (not r or r[0] == absolute or "://" in r) else root + r for r in refs]


def _pick(record: dict, role: str):
    """The value of the first alias of `role` present among the (case-insensitive) keys of a json sidecar."""
    norm = {normalize_column(k): k for k in record}
    for alias in COLUMN_ALIASES[role]:
        if alias in norm:
            return norm[alias], record[norm[alias]]
    return None, None


def manifest_from_shards(
    shard_paths: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    on_error: str = "raise",
    skip_report: str | os.PathLike | None = None,
    check_images: bool | str = False,
) -> Manifest:
    """Build a Manifest from img2dataset WebDataset shards, using the lat/lon fields of each `KEY.json`.

    `shard_paths` is a list of `.tar` files or a folder (its `*.tar`, sorted). Rows follow shard order, then key
    order inside each shard (img2dataset's threads write samples in any order; its keys follow the URL list,
    so sorting them makes the manifest deterministic and in input order). The id is the sidecar's dataset id
    (`id`, `IMG_ID`, ...; see COLUMN_ALIASES) or else img2dataset's `key`. Samples whose status is not "success" or that have no image are bad rows,
    handled like bad CSV rows (`on_error`, `skip_report`; the report's `row` is `SHARD.tar#KEY.json`)."""
    if isinstance(shard_paths, (str, os.PathLike)):
        folder = Path(shard_paths)
        if not folder.is_dir():
            shard_paths = [folder]
        else:
            shard_paths = sorted(folder.glob("*.tar"))
            if not shard_paths:
                raise GeoTokenError(f"{folder}: no .tar shards in this folder")
    ids, lats, lons, images, where, problems = [], [], [], [], [], {}
    for shard in tqdm(
        shard_paths, desc="reading shards", unit="shard", disable=None if len(shard_paths) > 10 else True
    ):
        shard = os.path.abspath(shard)
        samples = shard_samples(shard)
        index = read_shard_index(shard)
        with open(shard, "rb") as f:
            for key in sorted(samples):
                members = samples[key]
                image = next((members[e[1:]] for e in IMAGE_EXTENSIONS if e[1:] in members), None)
                if "json" not in members and image is None:
                    continue  # not a sample of ours (e.g. a stray file); img2dataset always writes the json
                # a sample whose sidecar is missing, unreadable or without coordinates is a bad row (counted and
                # reported, or the error of on_error="raise"), not the end of the whole read
                record, why = {}, None
                if "json" not in members:
                    ref, why = f"{shard}#{image}", "no KEY.json beside the image: no coordinates"
                else:
                    ref = f"{shard}#{members['json']}"
                    f.seek(index[members["json"]][0])
                    try:
                        record = json.loads(f.read(index[members["json"]][1]))
                    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                        why = f"not valid JSON: {exc}"
                    if why is None and not isinstance(record, dict):
                        record, why = {}, f"its JSON is a {type(record).__name__}, not an object"
                status = record.get("status", "success")
                lat_key, lat = _pick(record, "lat")
                lon_key, lon = _pick(record, "lon")
                if why is None and status == "success" and (lat_key is None or lon_key is None):
                    why = (f"no latitude/longitude field in {sorted(record)}; download with the lat/lon columns "
                           "saved (geotoken data download does this)")  # fmt: skip
                _, sample_id = _pick(record, "id")
                i = len(ids)
                ids.append(str(sample_id if sample_id is not None else key))
                lats.append("" if lat is None else str(lat))
                lons.append("" if lon is None else str(lon))
                images.append(f"{shard}#{image}" if image else "")
                where.append(ref)
                if why is not None:
                    problems[i] = why
                elif status != "success":
                    problems[i] = f"status {status!r}: {record.get('error_message')}"
                elif image is None:
                    problems[i] = f"no image member for key {key!r}"
    source = str(Path(shard_paths[0]).parent) if len(shard_paths) else ""
    return finish_manifest(
        ids,
        lats,
        lons,
        images,
        source=source,
        locations=where,
        problems=problems,
        on_error=on_error,
        skip_report=skip_report,
        check_images=check_images,
    )


def read_annotations(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    image_root: str | os.PathLike | None = None,
    check_images: bool | str = False,
    on_error: str = "raise",
    skip_report: str | os.PathLike | None = None,
) -> Manifest:
    """A validated `Manifest` of one annotation CSV (`read_manifest`) or of img2dataset shards: .tar files, or
    one folder of them (`manifest_from_shards`). The options are `read_manifest`'s; image_root is CSV-only."""
    paths = [Path(p) for p in ([inputs] if isinstance(inputs, (str, os.PathLike)) else inputs)]
    if not paths:
        raise GeoTokenError("no input: give one annotation CSV, or .tar shards / a folder of them")
    first, options = paths[0], dict(check_images=check_images, on_error=on_error, skip_report=skip_report)
    if first.is_dir() or first.suffix == ".tar":
        if image_root is not None:
            raise GeoTokenError("image_root applies to CSV input, not to shards")
        return manifest_from_shards(paths if len(paths) > 1 or first.suffix == ".tar" else first, **options)
    if len(paths) > 1:
        raise GeoTokenError(f"give one annotation CSV (got {len(paths)} inputs), or several .tar shards")
    return read_manifest(first, image_root=image_root, **options)


def manifest_tokens(manifest: Manifest, level: int = 20, group: int = 2, progress: bool = True) -> np.ndarray:
    """The S2 location tokens (N, T) int64 of every row, in row order (`geotoken.s2.latlon_to_tokens`),
    computed in blocks of TOKEN_BLOCK rows so that inputs longer than one block show a progress bar."""
    lat, lon = manifest.lat, manifest.lon
    tokens = np.empty((len(lat), len(vocab_sizes(level, group))), dtype=np.int64)
    disable = not progress or len(lat) <= TOKEN_BLOCK or None
    with tqdm(total=len(lat), unit="pt", unit_scale=True, desc="tokenize", disable=disable) as bar:
        for start in range(0, len(lat), TOKEN_BLOCK):
            block = slice(start, start + TOKEN_BLOCK)
            tokens[block] = latlon_to_tokens(lat[block], lon[block], level, group)
            bar.update(len(tokens[block]))
    return tokens

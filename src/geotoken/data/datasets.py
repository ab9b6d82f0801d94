"""Real datasets as users download them -> validated manifests, place texts and a report of what was left out.

One `DatasetSource` names an annotation file, where its images are, and the layout (`FORMATS`):

    format     annotations (columns found by name)             images
    mp16       mp16_places365.csv: IMG_ID (8a/4c/123.jpg),     a folder holding IMG_ID's nested folders, or
               AUTHOR, LAT, LON, scene labels                  archives (.tar / .zip, e.g. img2dataset shards)
    mp16-pro   MP16_Pro_places365.csv: MP16's columns plus     as mp16
               neighbourhood, city, county, state, region,
               country, continent (the text-aligned targets)
    im2gps3k   im2gps3k_places365.csv: IMG_ID, LAT, LON, ...   a folder of IMG_ID files (or an archive)
    yfcc4k     yfcc25600_places365.csv or yfcc4k_places365.csv as im2gps3k; rows without an image are left out
    osv5m      test.csv / train.csv: id, latitude, longitude,  images/SPLIT/00/<id>.jpg folders, or the zip
               ..., country, region, sub-region, city          archives images/SPLIT/00.zip as downloaded
    csv        id,lat,lon[,image] (Manifest.write_csv)         images relative to `images` (default: the CSV's folder)
    shards     - (img2dataset shards with lat/lon in KEY.json) the shards (.tar files or a folder of them)

Images are referenced where they are (a file, `SHARD.tar#MEMBER` or `ARCHIVE.zip#MEMBER`), never copied.
A row whose image is not there is left out and reported; so is an image that no row labels (real Im2GPS3k
has 2,997 labels for its 3,000 images; `yfcc25600_places365.csv` lists 25,600 rows for YFCC4k's 4,536
images). Bad rows (coordinates, duplicate ids) are left out and reported the same way. `read_source`
returns the manifest, the texts (one per row, when the layout has place names) and that report.
"""

from __future__ import annotations

import csv
import json
import os
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from geotoken.data.images import IMAGE_EXTENSIONS, archive_members, is_zip, read_shard_index, split_ref
from geotoken.data.manifest import COLUMN_ALIASES, manifest_from_shards, normalize_column, read_manifest
from geotoken.data.table import Manifest
from geotoken.errors import GeoTokenError
from geotoken.io import atomic_open

FORMATS = ("mp16", "mp16-pro", "im2gps3k", "yfcc4k", "osv5m", "csv", "shards")
ARCHIVES = (".tar", ".zip")
# the place-name text of each row, as G3 builds it from MP16-Pro's columns (city, state, country; empty
# parts dropped); other layouts with place columns can use their own template
TEXT_TEMPLATES = {
    "mp16-pro": "a photo taken in {city}, {state}, {country}",
}
_FIELD = re.compile(r"\{([^{}]+)\}")


@dataclass(frozen=True)
class DatasetSource:
    """One split read from disk: `annotations` (a CSV; none for `shards`) and `images` (a folder, an archive
    or a folder of archives; default: the annotation file's folder), in layout `format` (FORMATS).

    limit: keep the first `limit` labelled rows that have an image (a quick subset; None: all).
    text_template: '{column}' fields filled from each row (empty parts and their ', ' dropped); None: the
        format's (`TEXT_TEMPLATES`), or no texts. text_column: take each row's text from this column instead.
    """

    split: str
    format: str
    annotations: str | None = None
    images: str | None = None
    limit: int | None = None
    text_template: str | None = None
    text_column: str | None = None

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise GeoTokenError(
                f"source {self.split!r}: unknown format {self.format!r}; choose from {FORMATS}"
            )
        if not self.split or "/" in self.split:
            raise GeoTokenError(f"source: split name {self.split!r} must be a non-empty file name")
        if self.format != "shards" and not self.annotations:
            raise GeoTokenError(f"source {self.split!r}: format {self.format!r} needs an annotations file")
        if self.format == "shards" and not self.images:
            raise GeoTokenError(f"source {self.split!r}: format 'shards' needs images (the .tar shards)")
        for name in ("annotations", "images"):  # absolute: a stage's identity must not depend on the cwd
            value = getattr(self, name)
            if value:
                object.__setattr__(self, name, os.path.abspath(os.path.expanduser(value)))

    @property
    def template(self) -> str | None:
        return self.text_template or TEXT_TEMPLATES.get(self.format)


@dataclass
class SourceResult:
    """A source read: its manifest, texts (one per row, or None), and every row or image left out."""

    manifest: Manifest
    texts: list[str] | None
    report: list[tuple[str, str, str]] = field(default_factory=list)  # (where, id, reason)
    counts: dict[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- images
class ImageIndex:
    """The images of a source: relative path (posix) -> reference, with a by-file-name view for layouts
    whose rows name a file but not its folder (OSV-5M's `<id>.jpg`, archives with their own folders)."""

    def __init__(self, refs: dict[str, str]):
        self.refs = refs
        self._names: dict[str, str] | None = None

    @classmethod
    def scan(cls, source: str | os.PathLike) -> ImageIndex:
        """Every image file under a folder (recursive, hidden entries skipped) and every image member of the
        archives (.tar / .zip) in it, or of one archive."""
        source = os.path.abspath(source)
        refs: dict[str, str] = {}
        if os.path.isfile(source):
            if not source.lower().endswith(ARCHIVES):
                raise GeoTokenError(f"{source}: images must be a folder, a .tar or a .zip archive")
            cls._add_archive(refs, source)
            return cls(refs)
        if not os.path.isdir(source):
            raise GeoTokenError(f"{source}: image folder or archive not found")
        for root, dirs, files in os.walk(source):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            rel = os.path.relpath(root, source)
            for name in sorted(files):
                if name.startswith("."):
                    continue
                path = os.path.join(root, name)
                low = name.lower()
                if low.endswith(ARCHIVES):
                    cls._add_archive(refs, path)
                elif os.path.splitext(low)[1] in IMAGE_EXTENSIONS:
                    refs[name if rel == "." else posixpath.join(Path(rel).as_posix(), name)] = path
        return cls(refs)

    @staticmethod
    def _add_archive(refs: dict[str, str], path: str) -> None:
        members = archive_members(path)
        for m in members:
            if os.path.splitext(m.lower())[1] in IMAGE_EXTENSIONS:
                refs.setdefault(m, f"{path}#{m}")
        if not is_zip(path):  # img2dataset shards: the dataset's id in KEY.json names the image
            for ref in _shard_ids(path, members):
                refs.setdefault(*ref)

    @property
    def names(self) -> dict[str, str]:
        if self._names is None:
            names: dict[str, str] = {}
            for key, ref in self.refs.items():
                names.setdefault(posixpath.basename(key), ref)
            self._names = names
        return self._names

    def find(self, key: str) -> str | None:
        """The reference of an image named by a row: its relative path, else (flattened with '_', as some
        MP16 copies store 8a/4c/1.jpg as 8a_4c_1.jpg) by file name."""
        ref = self.refs.get(key)
        if ref is None:
            ref = self.names.get(posixpath.basename(key)) or self.names.get(key.replace("/", "_"))
        return ref


def _shard_ids(path: str, members: list[str]) -> list[tuple[str, str]]:
    """(id in the sidecar, image reference) for every img2dataset sample of a shard whose json has an id."""
    by_key: dict[str, dict[str, str]] = {}
    for m in members:
        key, dot, ext = m.rpartition(".")
        if dot:
            by_key.setdefault(key, {})[ext.lower()] = m
    out = []
    index = read_shard_index(path)
    with open(path, "rb") as f:
        for key in sorted(by_key):
            sample = by_key[key]
            image = next((sample[e[1:]] for e in IMAGE_EXTENSIONS if e[1:] in sample), None)
            if "json" not in sample or image is None:
                continue
            f.seek(index[sample["json"]][0])
            try:
                record = json.loads(f.read(index[sample["json"]][1]))
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            norm = {normalize_column(k): v for k, v in record.items()}
            for alias in ("img_id", "image_id", "id"):
                if norm.get(alias) not in (None, ""):
                    out.append((str(norm[alias]), f"{path}#{image}"))
                    break
    return out


# ---------------------------------------------------------------------------------------------- texts
def fill_template(template: str, values: dict[str, str]) -> str:
    """'a photo taken in {city}, {state}, {country}' with empty (or NaN) fields dropped with their ', '."""
    head, _, _ = template.partition("{")
    parts = [str(values.get(name, "") or "").strip() for name in _FIELD.findall(template)]
    parts = [p for p in parts if p and p.lower() != "nan"]
    parts = list(dict.fromkeys(parts))  # "Singapore, Singapore" -> "Singapore"
    return (head + ", ".join(parts)).strip() if parts else head.strip() or "a photo"


def read_columns(path: str | os.PathLike, names: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """(header, {normalized name: values}) for the named columns of a CSV (matched case-insensitively)."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise GeoTokenError(f"{path}: file is empty (expected a header line)")
        norm = [normalize_column(h) for h in header]
        missing = [n for n in names if normalize_column(n) not in norm]
        if missing:
            raise GeoTokenError(f"{path}: line 1: no column(s) {missing} in header {header}")
        index = [norm.index(normalize_column(n)) for n in names]
        width = max(index) + 1
        values: list[list[str]] = [[] for _ in names]
        for line, row in enumerate(filter(None, reader), start=2):
            if len(row) < width:
                raise GeoTokenError(f"{path}: line {line}: has {len(row)} fields, needs {width}")
            for k, i in enumerate(index):
                values[k].append(row[i])
    return header, {normalize_column(n): v for n, v in zip(names, values)}


def texts_for(
    path: str | os.PathLike, ids, *, id_column: str, template: str | None = None, column: str | None = None
) -> list[str]:
    """One text per id (in the order of `ids`) from an annotation CSV: its `column`, or `template` filled
    from its columns. An id the file does not have -> GeoTokenError."""
    if (template is None) == (column is None):
        raise GeoTokenError("texts: give a template or a column (one of them)")
    names = [column] if column else list(dict.fromkeys(_FIELD.findall(template)))
    _, cols = read_columns(path, [id_column, *names])
    row_of = {s: i for i, s in enumerate(cols[normalize_column(id_column)])}
    out = []
    for s in np.asarray(ids).tolist():
        i = row_of.get(s)
        if i is None:
            raise GeoTokenError(f"{path}: no row with {id_column} {s!r}")
        if column:
            out.append(cols[normalize_column(column)][i])
        else:
            out.append(fill_template(template, {n: cols[normalize_column(n)][i] for n in names}))
    return out


def read_texts(path: str | os.PathLike, ids, template: str | None = None) -> list[str]:
    """The texts of `ids` from a texts file (`id,text`, what the dataset stage writes) or from an annotation
    file with place-name columns (MP16-Pro: city, state, country; `template`, default MP16-Pro's)."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        raw = next(csv.reader(f), [])
    header = [normalize_column(h) for h in raw]
    found = next((c for c in ("id", "img_id", "image_id") if c in header), None)
    if found is None:
        raise GeoTokenError(f"{path}: line 1: no id column (id or IMG_ID) in header {raw}")
    id_column = raw[header.index(found)].strip()
    if "text" in header and template is None:
        return texts_for(path, ids, id_column=id_column, column="text")
    return texts_for(path, ids, id_column=id_column, template=template or TEXT_TEMPLATES["mp16-pro"])


def write_texts(path: str | os.PathLike, ids, texts: list[str]) -> None:
    """`id,text` CSV, atomically, in manifest order."""
    with atomic_open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["id", "text"])
        w.writerows(zip(np.asarray(ids).tolist(), texts))


def write_report(path: str | os.PathLike, report: list[tuple[str, str, str]]) -> None:
    """`where,id,reason` CSV of every row or image left out, atomically."""
    with atomic_open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["where", "id", "reason"])
        w.writerows(report)


# ---------------------------------------------------------------------------------------------- reading
def _id_column(source: DatasetSource, header: list[str]) -> str:
    norm = [normalize_column(h) for h in header]
    for name in ("img_id", "id", "image_id"):
        if name in norm:
            return header[norm.index(name)]
    raise GeoTokenError(f"{source.annotations}: line 1: no IMG_ID or id column in header {header}")


def read_source(source: DatasetSource, workdir: str | os.PathLike) -> SourceResult:
    """Read one source into a validated manifest (rows whose image exists), its texts and its report.

    workdir: a folder for the reader's own skip report (bad rows); its rows end up in the result's report."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    skips = workdir / f"{source.split}.bad-rows.csv"
    if source.format == "shards":
        manifest = manifest_from_shards(source.images, on_error="skip", skip_report=skips)
        report = _read_skips(skips, source.images)
        manifest, report = _limit(manifest, report, source.limit)
        return SourceResult(manifest, None, report, {"rows": len(manifest) + len(report),
                                                     "kept": len(manifest), "left_out": len(report)})  # fmt: skip
    annotations = Path(source.annotations)
    if not annotations.is_file():
        raise GeoTokenError(f"{annotations}: annotation file not found (source {source.split!r})")
    images = source.images or str(annotations.parent)
    # every row first (coordinates, ids checked; images resolved below), then the images it names
    manifest = read_manifest(annotations, image_root=images, on_error="skip", skip_report=skips)
    report = _read_skips(skips, str(annotations))
    bad_rows = len(report)
    header = _header(annotations)
    id_column = _id_column(source, header)
    norm = {normalize_column(h) for h in header}
    bad_ids = [r[1] for r in report if r[1]]  # their images are not "without a label": their rows were bad
    if source.format == "osv5m":
        keys = [f"{s}.jpg" for s in manifest.ids.tolist()]
        bad_ids = [f"{s}.jpg" for s in bad_ids]
    elif source.format == "csv":
        if not norm & set(COLUMN_ALIASES["image"]):
            raise GeoTokenError(f"{annotations}: line 1: format 'csv' needs an image column in {header}")
        keys = None  # the image column holds paths (resolved against `images` by read_manifest)
    else:
        keys = manifest.ids.tolist()  # MP16, Im2GPS3k, YFCC4k: the id is the image's relative path
    labelled = len(manifest)
    if keys is None:
        refs = manifest.images.tolist()
        found = np.array([os.path.isfile(split_ref(r)[0]) for r in refs], dtype=bool)
        unlabelled: list[str] = []
    else:
        index = ImageIndex.scan(images)
        refs = [index.find(k) or "" for k in keys]
        found = np.array([bool(r) for r in refs], dtype=bool)
        used = {r for r in refs if r} | {r for r in map(index.find, bad_ids) if r}
        unlabelled = sorted(key for key, r in index.refs.items() if r not in used)
        manifest = Manifest(manifest.ids, manifest.lat, manifest.lon, refs, manifest.source)
    report += [
        (str(annotations), s, f"no image {k} under {images}")
        for s, k in zip(manifest.ids[~found].tolist(), np.asarray(keys or refs)[~found].tolist())
    ]
    report += [(images, key, "image without a label in the annotations") for key in unlabelled]
    manifest = manifest.subset(np.flatnonzero(found))
    manifest, report = _limit(manifest, report, source.limit)
    texts = None
    if source.text_column or source.template:
        texts = texts_for(annotations, manifest.ids, id_column=id_column,
                          template=None if source.text_column else source.template,
                          column=source.text_column)  # fmt: skip
    counts = {
        "rows": labelled + bad_rows,
        "bad_rows": bad_rows,
        "rows_without_image": int((~found).sum()),
        "images_without_label": len(unlabelled),
        "kept": len(manifest),
    }
    return SourceResult(manifest, texts, report, counts)


def _header(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        return next(csv.reader(f), [])


def _read_skips(path: Path, where: str) -> list[tuple[str, str, str]]:
    """The reader's skip report (row,id,reason) as report rows."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    path.unlink()
    return [
        (f"{where}: line {r['row']}" if r["row"].isdigit() else r["row"], r["id"], r["reason"]) for r in rows
    ]


def _limit(manifest: Manifest, report, limit: int | None):
    if limit is None or len(manifest) <= limit:
        return manifest, report
    return manifest.subset(np.arange(limit)), report

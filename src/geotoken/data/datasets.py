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
from typing import Any

import numpy as np

from geotoken.data.images import IMAGE_EXTENSIONS, archive_members, is_zip, read_shard_index, split_ref
from geotoken.data.manifest import (
    COLUMN_ALIASES,
    detect_columns,
    image_source,
    manifest_from_shards,
    normalize_column,
    read_annotations,
    read_header,
    read_manifest,
)
from geotoken.data.table import Manifest
from geotoken.errors import GeoTokenError
from geotoken.io import atomic_open

BY_NAME_LISTED = 20  # rows matched by file name only (in another folder) that a result lists
FORMATS = ("mp16", "mp16-pro", "im2gps3k", "yfcc4k", "osv5m", "csv", "shards")
ARCHIVES = (".tar", ".zip")
# the place-name text of each row, from MP16-Pro's city, state and country columns (`fill_template`: empty
# parts dropped, a part repeating an earlier one dropped). G3's own text differs ("A street view photo taken
# in " + the parts, repeats kept). Other layouts with place columns can use their own template.
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
    # rows whose image was found by file name in another folder than the row names (the first of them)
    matched_by_name: list[tuple[str, str]] = field(default_factory=list)  # (id, image)
    other_files: list[str] = field(default_factory=list)  # files under the images neither images nor archives
    other_count: int = 0


# ---------------------------------------------------------------------------------------------- images
class ImageIndex:
    """The images of a source: relative path (posix) -> reference, with a by-file-name view for layouts
    whose rows name a file but not its folder (OSV-5M's `<id>.jpg`, archives with their own folders).

    other: the first OTHER_LISTED files that are neither images nor archives (other_count: all of them), so
    that a root holding no images can say what it holds instead (e.g. the byte-split chunks of a tar)."""

    OTHER_LISTED = 100

    def __init__(self, refs: dict[str, str], other: list[str] | None = None, other_count: int = 0):
        self.refs = refs
        self.other, self.other_count = other or [], other_count
        self._names: dict[str, str | None] | None = None

    @classmethod
    def scan(cls, source: str | os.PathLike) -> ImageIndex:
        """Every image file under a folder (recursive, following symlinked folders; hidden entries and macOS
        `__MACOSX` folders skipped) and every image member of the archives (.tar / .zip) in it, or of one
        archive."""
        source = os.path.abspath(source)
        refs: dict[str, str] = {}
        if os.path.isfile(source):
            if not source.lower().endswith(ARCHIVES):
                raise GeoTokenError(f"{source}: images must be a folder, a .tar or a .zip archive")
            cls._add_archive(refs, source)
            return cls(refs)
        if not os.path.isdir(source):
            raise GeoTokenError(f"{source}: image folder or archive not found")
        other, other_count = [], 0
        visited: set[str] = set()  # real paths: a symlink back to a parent folder must not loop forever
        for root, dirs, files in os.walk(source, followlinks=True):
            real = os.path.realpath(root)
            if real in visited:
                dirs[:] = []
                continue
            visited.add(real)
            dirs[:] = sorted(d for d in dirs if not _junk(d))
            rel = os.path.relpath(root, source)
            for name in sorted(files):
                if _junk(name):
                    continue
                path = os.path.join(root, name)
                key = name if rel == "." else posixpath.join(Path(rel).as_posix(), name)
                low = name.lower()
                if low.endswith(ARCHIVES):
                    cls._add_archive(refs, path)
                elif os.path.splitext(low)[1] in IMAGE_EXTENSIONS:
                    refs[key] = path
                else:
                    other_count += 1
                    if len(other) < cls.OTHER_LISTED:
                        other.append(key)
        return cls(refs, other, other_count)

    @staticmethod
    def _add_archive(refs: dict[str, str], path: str) -> None:
        members = archive_members(path)
        for m in members:
            if os.path.splitext(m.lower())[1] in IMAGE_EXTENSIONS and not _junk_member(m):
                refs.setdefault(m, f"{path}#{m}")
        if not is_zip(path):  # img2dataset shards: the dataset's id in KEY.json names the image
            for ref in _shard_ids(path, members):
                refs.setdefault(*ref)

    @property
    def names(self) -> dict[str, str | None]:
        """file name -> relative path of the one image with that name; None where several images share it."""
        if self._names is None:
            names: dict[str, str | None] = {}
            for key, ref in self.refs.items():
                name = posixpath.basename(key)
                if name in names and names[name] is not None and self.refs[names[name]] != ref:
                    names[name] = None
                else:
                    names.setdefault(name, key)
            self._names = names
        return self._names

    def find(self, key: str) -> str | None:
        """The reference of the image a row names (see `match`), or None."""
        return self.match(key)[0]

    def match(self, key: str) -> tuple[str | None, bool]:
        """(reference, matched by file name only) of the image a row names: its relative path; else its
        flattened name (some MP16 copies store 8a/4c/1.jpg as 8a_4c_1.jpg) or its file name, when exactly one
        image has that name; an id without an extension (YFCC4k's `6000000000`) also as `ID.jpg` etc.
        "By file name only" means the row names a folder and the image is in another one."""
        candidates = [key]
        if not os.path.splitext(posixpath.basename(key))[1]:
            candidates += [key + ext for ext in IMAGE_EXTENSIONS]
        for k in candidates:
            if k in self.refs:
                return self.refs[k], False
        for k in candidates:
            for name in dict.fromkeys((k.replace("/", "_"), posixpath.basename(k))):
                rel = self.names.get(name)
                if rel is not None:
                    elsewhere = "/" in k and name != k.replace("/", "_") and not rel.endswith("/" + k)
                    return self.refs[rel], elsewhere
        return None, False


def _junk(name: str) -> bool:
    """Hidden files and folders, and the `__MACOSX` resource-fork folder macOS adds to zips."""
    return name.startswith(".") or name == "__MACOSX"


def _junk_member(member: str) -> bool:
    """An archive member under `__MACOSX/` or named `._*` (macOS resource forks) or hidden: not a photo."""
    parts = member.split("/")
    return "__MACOSX" in parts or parts[-1].startswith(".")


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


def read_columns(
    path: str | os.PathLike, names: list[str]
) -> tuple[list[str], dict[str, list[str]], dict[int, tuple[int, str]]]:
    """(header, {normalized name: values}, {data row: (line, why it is short)}) for the named columns of a CSV
    (matched case-insensitively). A row too short to hold them (a download cut off mid-row) gets "" values
    and a reason, so that one bad row does not stop the whole file."""
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
        short: dict[int, tuple[int, str]] = {}
        line = reader.line_num + 1
        for row in reader:
            if row:  # blank lines are not rows
                if len(row) < width:
                    short[len(values[0])] = (line, f"has {len(row)} fields, needs {width}")
                for k, i in enumerate(index):
                    values[k].append(row[i] if i < len(row) else "")
            line = reader.line_num + 1
    return header, {normalize_column(n): v for n, v in zip(names, values)}, short


def texts_for(
    path: str | os.PathLike, ids, *, id_column: str, template: str | None = None, column: str | None = None
) -> list[str]:
    """One text per id (in the order of `ids`) from an annotation CSV: its `column`, or `template` filled
    from its columns. An id the file does not have, or whose row is too short -> GeoTokenError."""
    texts, bad = _texts(path, ids, id_column, template, column)
    if bad:
        line, reason = next(iter(bad.values()))
        raise GeoTokenError(f"{path}: {f'line {line}: ' if line else ''}{reason}")
    return texts


def _texts(path, ids, id_column: str, template: str | None, column: str | None):
    """(texts, {position in ids: (line or None, reason)}) for `texts_for`; rows with a reason get ""."""
    if (template is None) == (column is None):
        raise GeoTokenError("texts: give a template or a column (one of them)")
    names = [column] if column else list(dict.fromkeys(_FIELD.findall(template)))
    _, cols, short = read_columns(path, [id_column, *names])
    row_of: dict[str, int] = {}
    for i, s in enumerate(cols[normalize_column(id_column)]):
        row_of.setdefault(s, i)  # a duplicated id: its first row, the one the manifest keeps
    texts, bad = [], {}
    for k, s in enumerate(np.asarray(ids).tolist()):
        i = row_of.get(s)
        if i is None or i in short:
            bad[k] = (None, f"no row with {id_column} {s!r}") if i is None else short[i]
            texts.append("")
        elif column:
            texts.append(cols[normalize_column(column)][i])
        else:
            texts.append(fill_template(template, {n: cols[normalize_column(n)][i] for n in names}))
    return texts, bad


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
def guess_format(path: str | os.PathLike, header: list[str]) -> str | None:
    """The format whose reader finds the images of an annotation file that names them by id (IMG_ID, or
    OSV-5M's id), from its columns and file name; None when its images are not named by id."""
    kind = image_source(header, detect_columns(header, path))
    if kind == "osv5m":
        return "osv5m"
    if kind != "img_id":
        return None
    name = normalize_column(Path(path).name)
    norm = {normalize_column(h) for h in header}
    if "mp16_pro" in name or {"city", "state", "country"} <= norm:
        return "mp16-pro"
    return next((f for f in ("im2gps3k", "yfcc4k") if f[:4] in name), "mp16")


def images_named_by_id(path: str | os.PathLike) -> tuple[str, str] | None:
    """(format, column) when `path` is an annotation CSV whose images are named by an id column (MP16's
    IMG_ID, OSV-5M's id): joined to an image root those paths miss images in archives, sub-folders or no
    longer there; the dataset reader (`--format`) finds each image and reports the rows without one."""
    path = Path(path)
    if path.is_dir() or path.suffix == ".tar" or not path.is_file():
        return None  # shards, or an input error the reader reports
    fmt = guess_format(path, read_header(path))
    return None if fmt is None else (fmt, "id" if fmt == "osv5m" else "IMG_ID")


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
        report = read_skip_report(skips, source.images)
        manifest, _ = _limit(manifest, None, source.limit)
        return SourceResult(manifest, None, report, {"rows": len(manifest) + len(report),
                                                     "kept": len(manifest), "left_out": len(report)})  # fmt: skip
    annotations = Path(source.annotations)
    if not annotations.is_file():
        raise GeoTokenError(f"{annotations}: annotation file not found (source {source.split!r})")
    images = source.images or str(annotations.parent)
    # every row first (coordinates, ids checked; images resolved below), then the images it names
    manifest = read_manifest(annotations, image_root=images, on_error="skip", skip_report=skips)
    report = read_skip_report(skips, str(annotations))
    bad_rows = len(report)
    header = read_header(annotations)
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
    by_name: list[tuple[str, str]] = []  # (row's id, image found by its file name in another folder)
    other, other_count = [], 0
    if keys is None:
        refs = manifest.images.tolist()
        found = np.array([os.path.isfile(split_ref(r)[0]) for r in refs], dtype=bool)
        unlabelled: list[str] = []
    else:
        index = ImageIndex.scan(images)
        other, other_count = index.other, index.other_count
        refs = []
        for s, k in zip(manifest.ids.tolist(), keys):
            ref, elsewhere = index.match(k)
            refs.append(ref or "")
            if elsewhere:
                by_name.append((s, ref))
        found = np.array([bool(r) for r in refs], dtype=bool)
        used = {r for r in refs if r} | {r for r in map(index.find, bad_ids) if r}
        unlabelled = sorted(key for key, r in index.refs.items() if r not in used)
        manifest = Manifest(manifest.ids, manifest.lat, manifest.lon, refs, manifest.source)
    report += [
        (str(annotations), s, f"no image {k} under {images}" if k else "its image field is empty")
        for s, k in zip(manifest.ids[~found].tolist(), np.asarray(keys or refs)[~found].tolist())
    ]
    report += [(images, key, "image without a label in the annotations") for key in unlabelled]
    manifest = manifest.subset(np.flatnonzero(found))
    rows = labelled + bad_rows
    texts = None
    if source.text_column or source.template:
        template = None if source.text_column else source.template
        texts, short = _texts(annotations, manifest.ids, id_column, template, source.text_column)
        if short:  # rows cut short before their place columns: bad rows like any other
            ids = manifest.ids.tolist()
            report += [(f"{annotations}: line {line}" if line else str(annotations), ids[k], reason)
                       for k, (line, reason) in short.items()]  # fmt: skip
            bad_rows += len(short)
            keep = np.setdiff1d(np.arange(len(manifest)), list(short))
            manifest, texts = manifest.subset(keep), [texts[k] for k in keep.tolist()]
    manifest, texts = _limit(manifest, texts, source.limit)
    counts = {
        "rows": rows,
        "bad_rows": bad_rows,
        "rows_without_image": int((~found).sum()),
        "images_without_label": len(unlabelled),
        "matched_by_file_name": len(by_name),
        "kept": len(manifest),
    }
    return SourceResult(manifest, texts, report, counts, by_name[:BY_NAME_LISTED], other, other_count)


def describe_left_out(counts: dict) -> str:
    """What a dataset split left out, by kind: bad rows apart from rows whose image is missing."""
    kinds = {"bad_rows": "bad rows (values out of range or unreadable, duplicate ids, short rows)",
             "rows_without_image": "rows without an image", "images_without_label": "images without a row",
             "left_out": "bad samples"}  # fmt: skip
    if "bad_rows" in counts:  # annotation formats count by kind; shards only in all
        kinds.pop("left_out")
    return (
        ", ".join(f"{text}: {counts[key]:,}" for key, text in kinds.items() if counts.get(key)) or "nothing"
    )


def read_skip_report(path: Path, where: str) -> list[tuple[str, str, str]]:
    """A reader's skip report (`row,id,reason`, `read_manifest`'s) as report rows (where, id, reason), where
    "FILE: line N"; the file is removed (its rows live on in the report)."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    path.unlink()
    return [
        (f"{where}: line {r['row']}" if r["row"].isdigit() else r["row"], r["id"], r["reason"]) for r in rows
    ]


def report_path(out: str | os.PathLike) -> Path:
    """Where a command lists the rows it left out: OUT's name + .report.csv (as a dataset's SPLIT.report.csv)."""
    out = Path(out)
    return out.with_name(f"{out.stem}.report.csv")


def read_leaving_out_bad_rows(
    inputs: list[str], report: Path, **options: Any
) -> tuple[Manifest, list[tuple[str, str, str]]]:
    """`read_annotations(inputs, **options)` with every bad row left out and listed in `report`
    (where,id,reason): the manifest of the good rows and the report's rows."""
    skips = report.with_name(f".{report.name}.rows")  # the reader's own (row,id,reason), made a report below
    manifest = read_annotations(inputs, on_error="skip", skip_report=skips, **options)
    left_out = read_skip_report(skips, str(inputs[0]))
    write_report(report, left_out)
    return manifest, left_out


def _limit(manifest: Manifest, texts: list[str] | None, limit: int | None):
    if limit is None or len(manifest) <= limit:
        return manifest, texts
    return manifest.subset(np.arange(limit)), None if texts is None else texts[:limit]

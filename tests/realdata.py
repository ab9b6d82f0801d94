"""Miniature copies of the real datasets, in the layouts users download (for tests/test_datasets.py and the
`geotoken run` end-to-end test). Coordinates are real MP16 photo coordinates (GeoCLIP's gallery); images
are tiny JPEGs whose colour follows the location (so a backbone has something to learn from)."""

from __future__ import annotations

import csv
import io
import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from geotoken import assets

MP16_COLUMNS = ["IMG_ID", "AUTHOR", "LAT", "LON", "S3_Label", "S16_Label", "S365_Label", "Prob_indoor",
                "Prob_natural", "Prob_urban"]  # fmt: skip
PRO_COLUMNS = ["neighbourhood", "city", "county", "state", "region", "country", "country_code", "continent"]
OSV_COLUMNS = ["id", "latitude", "longitude", "thumb_original_url", "country", "sequence", "captured_at",
               "lon_bin", "lat_bin", "cell", "region", "sub-region", "city", "land_cover", "road_index",
               "drive_side", "climate", "soil", "dist_sea", "unique_region", "unique_sub-region",
               "unique_city", "unique_country", "creator_username", "creator_id"]  # fmt: skip
CITIES = [("Paris", "Ile-de-France", "France"), ("", "Texas", "United States"), ("Kyoto", "Kyoto", "Japan")]


def coords(n: int, seed: int = 0) -> np.ndarray:
    """n real MP16 photo coordinates (lat, lon)."""
    all_ = np.loadtxt(assets.mp16_coordinates_csv(), delimiter=",", skiprows=1, max_rows=20000)
    return all_[np.sort(np.random.default_rng(seed).choice(len(all_), n, replace=False))]


def jpeg(lat: float, lon: float, seed: int, size: int = 32) -> bytes:
    """A small JPEG whose mean colour encodes the location, plus noise."""
    rng = np.random.default_rng(seed)
    base = np.array([(lat + 90) / 180, (lon + 180) / 360, 0.5]) * 255
    rgb = np.clip(base + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def mp16_ids(n: int, seed: int = 0) -> list[str]:
    """MP16's IMG_ID: two levels of hex folders, then the Flickr photo id (`8a/4c/1234567890.jpg`)."""
    rng = np.random.default_rng(seed)
    return [
        f"{rng.integers(256):02x}/{rng.integers(256):02x}/{1000000000 + 7919 * i + seed}.jpg"
        for i in range(n)
    ]


def mp16(
    root: Path,
    n: int,
    *,
    pro: bool = False,
    seed: int = 0,
    missing: int = 0,
    layout: str = "folders",
    corrupt=(),
):
    """`mp16_places365.csv` (or MP16-Pro's `MP16_Pro_places365.csv`) + images.

    layout: "folders" (images/8a/4c/ID.jpg), "shards" (img2dataset tar shards whose KEY.json holds the
    IMG_ID), "flat-tar" (one tar of 8a_4c_ID.jpg files, as G3's mp-16-images.tar). The last `missing`
    rows get no image; the rows in `corrupt` (shards) get bytes that do not decode. Returns (csv path, images path, ids)."""
    c, ids = coords(n, seed), mp16_ids(n, seed)
    rows = []
    for i, (img, (lat, lon)) in enumerate(zip(ids, c)):
        row = [
            img,
            f"{12345 + i}@N00",
            repr(float(lat)),
            repr(float(lon)),
            i % 3,
            i % 16,
            i % 365,
            0.1,
            0.6,
            0.3,
        ]
        if pro:
            city, state, country = CITIES[i % len(CITIES)]
            row += ["", city, f"{state} county", state, "", country, country[:2].lower(), "Earth"]
        rows.append(row)
    name = "MP16_Pro_places365.csv" if pro else "mp16_places365.csv"
    path = _write_csv(root / name, MP16_COLUMNS + (PRO_COLUMNS if pro else []), rows)
    present = list(range(n - missing))
    if layout == "folders":
        for i in present:
            f = root / "images" / ids[i]
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(jpeg(*c[i], seed=i))
        return path, root / "images", ids
    if layout == "shards":
        shards = root / "shards"
        shards.mkdir(parents=True, exist_ok=True)
        per = max(1, len(present) // 2 + 1)
        for s in range(0, len(present), per):
            with tarfile.open(shards / f"{s // per:05d}.tar", "w") as tar:
                for k, i in enumerate(present[s : s + per]):
                    key = f"{s // per:05d}{k:04d}"
                    meta = {
                        "IMG_ID": ids[i],
                        "url": f"http://example/{i}.jpg",
                        "key": key,
                        "status": "success",
                    }
                    _add(tar, f"{key}.jpg", b"not a jpeg" if i in corrupt else jpeg(*c[i], seed=i))
                    _add(tar, f"{key}.json", json.dumps(meta).encode())
        return path, shards, ids
    if layout == "flat-tar":
        tar_path = root / "mp-16-images.tar"
        with tarfile.open(tar_path, "w") as tar:
            for i in present:
                _add(tar, "mp-16-images/" + ids[i].replace("/", "_"), jpeg(*c[i], seed=i))
        return path, tar_path, ids
    raise ValueError(layout)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def flickr_ids(n: int, seed: int) -> list[str]:
    """Im2GPS3k / YFCC4k file names: Flickr `PHOTOID_SECRET_SERVER_OWNER.jpg`."""
    return [f"{500000 + 13 * i + seed}_{i:08x}_{1000 + i}_{seed}@N00.jpg" for i in range(n)]


def places365_test_set(
    root: Path,
    name: str,
    n_rows: int,
    n_images: int,
    *,
    extra_images: int = 0,
    seed: int = 1,
    zipped: bool = False,
):
    """A test set as TIBHannover's GeoEstimation ships it: `NAME_places365.csv` (IMG_ID, AUTHOR, LAT, LON,
    scene labels) and an images/ folder. The first `n_images` rows have an image; `extra_images` more
    images have no row (real Im2GPS3k: 3,000 images, 2,997 labels). Returns (csv, images, ids)."""
    c, ids = coords(n_rows + extra_images, seed), flickr_ids(n_rows + extra_images, seed)
    rows = [[ids[i], f"{i}@N00", repr(float(c[i][0])), repr(float(c[i][1])), 0, 1, 2, 0.2, 0.5, 0.3]
            for i in range(n_rows)]  # fmt: skip
    path = _write_csv(root / f"{name}_places365.csv", MP16_COLUMNS, rows)
    have = [*range(n_images), *range(n_rows, n_rows + extra_images)]
    if zipped:  # the archive as downloaded (im2gps3ktest.zip: one folder of the files)
        images = root / "images.zip"
        with zipfile.ZipFile(images, "w") as z:
            for i in have:
                z.writestr(f"im2gps3ktest/{ids[i]}", jpeg(*c[i], seed=100 + i))
        return path, images, ids
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    for i in have:
        (images / ids[i]).write_bytes(jpeg(*c[i], seed=100 + i))
    return path, images, ids


def osv5m(root: Path, split: str, n: int, *, zipped: bool = False, seed: int = 2):
    """OSV-5M as on the Hub: `SPLIT.csv` (id, latitude, longitude, ...) and images/SPLIT/00/<id>.jpg after
    extraction, or the downloaded archives images/SPLIT/00.zip (`zipped`). Returns (csv, images, ids)."""
    c = coords(n, seed)
    ids = [str(3859149887465501 + 7 * i) for i in range(n)]
    rows = [[ids[i], repr(float(c[i][0])), repr(float(c[i][1])), "", "FR", f"seq{i}", "2019-01-01", 1, 2, "(1, 2)",
             "Ile-de-France", "", "Paris", 4, 4.6, 1, 15, 3, 0.1, "R", "", "C", "FR", "user", 11]
            for i in range(n)]  # fmt: skip
    path = _write_csv(root / f"{split}.csv", OSV_COLUMNS, rows)
    images = root / "images" / split
    images.mkdir(parents=True, exist_ok=True)
    half = (n + 1) // 2
    for part, members in (("00", range(half)), ("01", range(half, n))):
        if zipped:
            with zipfile.ZipFile(images / f"{part}.zip", "w") as z:
                for i in members:
                    z.writestr(f"{part}/{ids[i]}.jpg", jpeg(*c[i], seed=200 + i))
        else:
            (images / part).mkdir(exist_ok=True)
            for i in members:
                (images / part / f"{ids[i]}.jpg").write_bytes(jpeg(*c[i], seed=200 + i))
    return path, images, ids

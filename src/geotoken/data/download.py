"""Fetch a user's URL list (MP16, OSV-5M, Im2GPS3k, YFCC4k, ...) into WebDataset shards with img2dataset.

img2dataset does the heavy lifting (process + thread pools, retries, resizing, `KEY.jpg` + `KEY.json` tar
shards, a parquet of every sample's status, resuming finished shards). Around it we add what it lacks:
- the URL list may be GeoEstimation's `mp16_urls.csv` (no header, `image_id,url`, no coordinates): the
  coordinates then come from an annotation file joined by id (`annotations`, `--annotations`);
- the URL list is validated first like any manifest (coordinates, duplicate ids; errors name the line), then
  handed over as parquet with string ids and float64 coordinates, so pandas' type guessing never turns an id
  like "007" into 7 or rounds a coordinate;
- `id`, `lat`, `lon` travel into every sample's json, and the finished shards become `manifest.csv`;
- failures are gathered into one `failed.csv` (id, url, status, error);
- `_geotoken/download.json` records the config and the input's hash: rerunning the same command resumes;
  rerunning with another input or config into the same folder is refused instead of mixing two datasets.

img2dataset is an optional dependency: `pip install 'geotoken[download]'`.
"""

from __future__ import annotations

import csv
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from geotoken.data.manifest import (
    COLUMN_ALIASES,
    Manifest,
    detect_columns,
    finish_manifest,
    manifest_from_shards,
    normalize_column,
    read_header,
    read_manifest,
)
from geotoken.errors import GeoTokenError
from geotoken.io import atomic_open, atomic_path, read_json, sha256_file, write_json

URL_ALIASES = (
    "url",
    "image_url",
    "img_url",
    "photo_url",
    "download_url",
    "flickr_url",
    "thumb_original_url",
    "link",
)
RESIZE_MODES = ("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop")


@dataclass
class DownloadConfig:
    """What img2dataset is told. Defaults keep every photo's aspect ratio with its shorter side at most 512 px:
    enough for 224-336 px backbones plus crop augmentation, without storing full-size originals."""

    image_size: int = 512
    resize_mode: str = "keep_ratio"  # no | border | keep_ratio | keep_ratio_largest | center_crop
    resize_only_if_bigger: bool = True
    encode_format: str = "jpg"
    encode_quality: int = 95
    processes: int = max(1, (os.cpu_count() or 2) // 2)
    threads: int = 64
    samples_per_shard: int = 10_000
    retries: int = 2
    timeout: int = 10  # seconds per request
    user_agent_token: str | None = "geotoken"

    def __post_init__(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise GeoTokenError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        for name in ("image_size", "processes", "threads", "samples_per_shard", "timeout"):
            if int(getattr(self, name)) < 1:
                raise GeoTokenError(f"{name} must be at least 1, got {getattr(self, name)!r}")
        if self.retries < 0:
            raise GeoTokenError(f"retries must be >= 0, got {self.retries!r}")


@dataclass
class DownloadResult:
    manifest: Manifest  # the downloaded images, in shard order
    manifest_csv: Path
    failed_csv: Path  # id,url,status,error for every URL that did not give an image
    requested: int
    downloaded: int
    failed: int


def find_url_column(path: str | os.PathLike) -> str:
    """The header name of the URL column (case-insensitive, from URL_ALIASES)."""
    header = read_header(Path(path))
    names = [normalize_column(h) for h in header]
    for alias in URL_ALIASES:
        if alias in names:
            return header[names.index(alias)]
    raise GeoTokenError(f"{path}: line 1: no URL column in header {header}; expected one of {URL_ALIASES}")


def _is_url(value: str) -> bool:
    return value.strip().lower().startswith(("http://", "https://"))


def read_url_list(
    path: str | os.PathLike,
    *,
    annotations: str | os.PathLike | None = None,
    on_error: str = "raise",
    skip_report: str | os.PathLike | None = None,
) -> Manifest:
    """The rows to download, validated: ids, coordinates and, as images, the URLs.

    The list is a CSV with a URL column and lat/lon (+ id) columns, or GeoEstimation's `mp16_urls.csv`: no
    header, two columns `image_id,url`, no coordinates. annotations: a CSV (e.g. `mp16_places365.csv`) whose
    coordinates are joined to the list by id, for lists without them; a list row whose id it lacks is a bad
    row (see `read_manifest` for on_error and skip_report)."""
    path = Path(path)
    first = read_header(path)
    headerless = any(_is_url(v) for v in first)
    if headerless and (len(first) != 2 or not _is_url(first[1])):
        raise GeoTokenError(
            f"{path}: line 1 is a row, not a header; a URL list without a header must have two columns, "
            f"image_id,url (GeoEstimation's mp16_urls.csv); got {len(first)} fields"
        )
    names = [normalize_column(h) for h in first]
    has_coords = not headerless and any(a in names for a in COLUMN_ALIASES["lat"])
    if annotations is None:
        if not has_coords:
            raise GeoTokenError(
                f"{path}: {'no header: ' if headerless else ''}the URL list has no latitude/longitude; "
                f"pass --annotations CSV (library: annotations=) to take them from an annotation file with "
                f"the same ids, e.g. mp16_places365.csv for mp16_urls.csv"
            )
        url_column = find_url_column(path)
        return read_manifest(path, image_column=url_column, on_error=on_error, skip_report=skip_report)
    if has_coords:
        raise GeoTokenError(
            f"{path}: line 1: the URL list has its own coordinates; --annotations is for lists without them"
        )
    ids, urls, lines = _ids_and_urls(path, first, headerless)
    coords, why = _coordinates(Path(annotations), on_error)
    problems, lat, lon = {}, [], []
    for i, s in enumerate(ids):
        c = coords.get(s)
        if c is None:
            problems[i] = why.get(s, f"no row with id {s!r} in {annotations}")
        lat.append("" if c is None else c[0])
        lon.append("" if c is None else c[1])

    def locate(rows: np.ndarray) -> list[tuple[str, int]]:
        return [(f"{path}: line {lines[i]}", lines[i]) for i in rows.tolist()]

    return finish_manifest(
        ids, lat, lon, urls, source=str(path), locations=locate, problems=problems, on_error=on_error,
        skip_report=skip_report,
    )  # fmt: skip


def _ids_and_urls(path: Path, first: list[str], headerless: bool):
    """(ids, urls, file line of each row) of a URL list: its id and URL columns, or the headerless two."""
    if headerless:
        id_at, url_at = 0, 1
    else:
        names = [normalize_column(h) for h in first]
        url_at = names.index(normalize_column(find_url_column(path)))
        id_at = next((names.index(a) for a in COLUMN_ALIASES["id"] if a in names), None)
        if id_at is None:
            raise GeoTokenError(
                f"{path}: line 1: no id column in header {first} to join --annotations by; expected one of "
                f"{COLUMN_ALIASES['id']}"
            )
    ids, urls, lines = [], [], []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        if not headerless:
            next(reader)
        line = reader.line_num + 1
        for row in reader:
            if row:
                if len(row) <= max(id_at, url_at):
                    raise GeoTokenError(
                        f"{path}: line {line}: has {len(row)} fields, needs {max(id_at, url_at) + 1}"
                    )
                ids.append(row[id_at].strip())
                urls.append(row[url_at].strip())
                lines.append(line)
            line = reader.line_num + 1
    return ids, urls, lines


def _coordinates(annotations: Path, on_error: str) -> tuple[dict[str, tuple[float, float]], dict[str, str]]:
    """id -> (lat, lon) of an annotation file, and id -> why, for its bad rows (on_error="skip")."""
    if "id" not in detect_columns(read_header(annotations), annotations):
        raise GeoTokenError(
            f"{annotations}: line 1: no id column to join the URL list by; "
            f"expected one of {COLUMN_ALIASES['id']}"
        )
    why: dict[str, str] = {}
    if on_error != "skip":
        m = read_manifest(annotations)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            report = Path(tmp) / "skipped.csv"
            m = read_manifest(annotations, on_error="skip", skip_report=report)
            with open(report, newline="", encoding="utf-8") as f:
                why = {r["id"]: f"{annotations}: line {r['row']}: {r['reason']}" for r in csv.DictReader(f)}
    return dict(zip(m.ids.tolist(), zip(m.lat.tolist(), m.lon.tolist()))), why


def _require_img2dataset():
    try:
        import img2dataset
    except ImportError as exc:
        raise GeoTokenError(
            f"geotoken data download needs img2dataset ({exc}); install it with: pip install 'geotoken[download]'"
        ) from None
    return img2dataset


# Config fields that change what lands on disk: a resumed run must use the same ones (speed knobs may change).
_OUTPUT_FIELDS = (
    "image_size",
    "resize_mode",
    "resize_only_if_bigger",
    "encode_format",
    "encode_quality",
    "samples_per_shard",
)


def download(
    urls_csv: str | os.PathLike,
    output_dir: str | os.PathLike,
    config: DownloadConfig | None = None,
    *,
    on_error: str = "raise",
    annotations: str | os.PathLike | None = None,
) -> DownloadResult:
    """Download every URL of `urls_csv` (columns: url + lat/lon (+ id), detected by name; or `image_id,url`
    without a header and coordinates joined by id from `annotations`: `read_url_list`) into `output_dir`.

    Writes `NNNNN.tar` shards (+ img2dataset's per-shard parquet and stats), `manifest.csv`, `failed.csv`, and
    `_geotoken/` (the validated URL list as parquet; `download.json`: config, input hash, counts).
    on_error="skip" drops invalid rows of the URL list (listed in `output_dir/skipped_rows.csv`) instead of
    refusing the whole list. Rerunning resumes: finished shards are kept, a finished job is not redone."""
    config = config or DownloadConfig()
    urls_csv, output_dir = Path(urls_csv), Path(output_dir)
    if not urls_csv.is_file():
        raise GeoTokenError(f"{urls_csv}: URL list not found")
    if annotations is not None and not Path(annotations).is_file():
        raise GeoTokenError(f"{annotations}: annotation file not found")
    state = {
        "input": str(urls_csv.resolve()),
        "input_sha256": sha256_file(urls_csv),
        "annotations_sha256": sha256_file(annotations) if annotations is not None else None,
        "output": {k: getattr(config, k) for k in _OUTPUT_FIELDS},
    }
    # img2dataset takes every *.json in its output folder for a shard's stats, so our state lives in a sub-folder
    state_json = output_dir / "_geotoken" / "download.json"
    old = read_json(state_json) if state_json.exists() else None
    same = ("input_sha256", "annotations_sha256", "output")
    if old is not None and {k: old.get(k) for k in same} != {k: state[k] for k in same}:
        raise GeoTokenError(
            f"{output_dir}: holds a download of another input or config (see {state_json}); "
            f"use a new output folder, or the same URL list and options to resume"
        )
    if old is not None and old.get("finished"):
        manifest = read_manifest(output_dir / "manifest.csv")
        return DownloadResult(
            manifest,
            output_dir / "manifest.csv",
            output_dir / "failed.csv",
            old["requested"],
            len(manifest),
            old["failed"],
        )

    skipped = output_dir / "skipped_rows.csv" if on_error == "skip" else None
    urls = read_url_list(urls_csv, annotations=annotations, on_error=on_error, skip_report=skipped)
    if len(urls) == 0:
        raise GeoTokenError(f"{urls_csv}: no rows to download")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no network check when img2dataset imports it
    img2dataset = _require_img2dataset()
    import pyarrow as pa  # an img2dataset dependency
    import pyarrow.parquet as pq

    write_json(state_json, {**state, "config": asdict(config), "finished": False})
    table = pa.table(
        {
            "url": pa.array(urls.images.tolist(), pa.string()),
            "id": pa.array(urls.ids.tolist(), pa.string()),
            "lat": pa.array(urls.lat, pa.float64()),
            "lon": pa.array(urls.lon, pa.float64()),
        }
    )
    input_parquet = output_dir / "_geotoken" / "urls.parquet"
    with atomic_path(input_parquet) as tmp:
        pq.write_table(table, tmp)

    img2dataset.download(
        url_list=str(input_parquet),
        input_format="parquet",
        url_col="url",
        save_additional_columns=["id", "lat", "lon"],
        output_folder=str(output_dir),
        output_format="webdataset",
        image_size=config.image_size,
        resize_mode=config.resize_mode,
        resize_only_if_bigger=config.resize_only_if_bigger,
        encode_format=config.encode_format,
        encode_quality=config.encode_quality,
        processes_count=config.processes,
        thread_count=config.threads,
        number_sample_per_shard=config.samples_per_shard,
        retries=config.retries,
        timeout=config.timeout,
        user_agent_token=config.user_agent_token,
        incremental_mode="incremental",
        enable_wandb=False,
        distributor="multiprocessing",
    )

    failed_csv = output_dir / "failed.csv"
    failed = _collect_failures(output_dir, failed_csv, pq)
    shards = sorted(output_dir.glob("[0-9]*.tar"))
    manifest = manifest_from_shards(shards) if shards else None
    if manifest is None or len(manifest) == 0:  # offline, blocked, a wrong URL column: nothing to keep
        for leftover in [*shards, *output_dir.glob("[0-9]*.parquet"), *output_dir.glob("[0-9]*_stats.json")]:
            leftover.unlink()  # img2dataset would take these shards as done and never fetch them again
        first = _first_error(failed_csv)
        raise GeoTokenError(
            f"{output_dir}: none of the {len(urls):,} images could be downloaded (first: {first}; all in "
            f"{failed_csv}); nothing is kept as done, so the same command retries them all (the network?)"
        )
    manifest_csv = output_dir / "manifest.csv"
    manifest.write_csv(manifest_csv)
    counts = {"requested": len(urls), "downloaded": len(manifest), "failed": failed}
    finished = len(manifest) + failed == len(urls)  # img2dataset gives up on a shard after max_shard_retry
    write_json(state_json, {**state, "config": asdict(config), "finished": finished, **counts})
    return DownloadResult(manifest, manifest_csv, failed_csv, **counts)


def _first_error(failed_csv: Path) -> str:
    """The first failure `_collect_failures` listed, as "URL: error" (or a placeholder)."""
    with open(failed_csv, newline="", encoding="utf-8") as f:
        row = next(csv.DictReader(f), None)
    return f"{row['url']}: {row['error'] or row['status']}" if row else "no failure recorded"


def _collect_failures(output_dir: Path, failed_csv: Path, pq) -> int:
    """Gather the non-success rows of img2dataset's per-shard parquets into one CSV; returns their count."""
    count = 0
    with atomic_open(failed_csv, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["id", "url", "status", "error"])
        for part in sorted(output_dir.glob("[0-9]*.parquet")):
            t = pq.read_table(part, columns=["id", "url", "status", "error_message"]).to_pydict()
            bad = np.flatnonzero(np.asarray(t["status"], dtype=object) != "success")
            count += len(bad)
            writer.writerows(
                (t["id"][i], t["url"][i], t["status"][i], t["error_message"][i]) for i in bad.tolist()
            )
    return count

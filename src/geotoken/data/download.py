"""Fetch a user's URL list (MP16, OSV-5M, Im2GPS3k, YFCC4k, ...) into WebDataset shards with img2dataset.

img2dataset does the heavy lifting (process + thread pools, retries, resizing, `KEY.jpg` + `KEY.json` tar
shards, a parquet of every sample's status, resuming finished shards). Around it we add what it lacks:
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
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from geotoken.data.manifest import Manifest, manifest_from_shards, normalize_column, read_manifest
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
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f), [])
    except OSError as exc:
        raise GeoTokenError(f"{path}: cannot read URL list: {exc.strerror or exc}") from None
    names = [normalize_column(h) for h in header]
    for alias in URL_ALIASES:
        if alias in names:
            return header[names.index(alias)]
    raise GeoTokenError(f"{path}: line 1: no URL column in header {header}; expected one of {URL_ALIASES}")


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
) -> DownloadResult:
    """Download every URL of `urls_csv` (columns: url + lat/lon (+ id), detected by name) into `output_dir`.

    Writes `NNNNN.tar` shards (+ img2dataset's per-shard parquet and stats), `manifest.csv`, `failed.csv`, and
    `_geotoken/` (the validated URL list as parquet; `download.json`: config, input hash, counts).
    on_error="skip" drops invalid rows of the URL list (listed in `output_dir/skipped_rows.csv`) instead of
    refusing the whole list. Rerunning resumes: finished shards are kept, a finished job is not redone."""
    config = config or DownloadConfig()
    urls_csv, output_dir = Path(urls_csv), Path(output_dir)
    url_column = find_url_column(urls_csv)
    state = {
        "input": str(urls_csv.resolve()),
        "input_sha256": sha256_file(urls_csv),
        "output": {k: getattr(config, k) for k in _OUTPUT_FIELDS},
    }
    # img2dataset takes every *.json in its output folder for a shard's stats, so our state lives in a sub-folder
    state_json = output_dir / "_geotoken" / "download.json"
    old = read_json(state_json) if state_json.exists() else None
    if old is not None and {k: old.get(k) for k in ("input_sha256", "output")} != {
        k: state[k] for k in ("input_sha256", "output")
    }:
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
    urls = read_manifest(urls_csv, image_column=url_column, on_error=on_error, skip_report=skipped)
    if len(urls) == 0:
        raise GeoTokenError(f"{urls_csv}: no rows to download")
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

    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no network check on import
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
    if not shards:
        raise GeoTokenError(f"{output_dir}: no image could be downloaded; see {failed_csv}")
    manifest = manifest_from_shards(shards)
    manifest_csv = output_dir / "manifest.csv"
    manifest.write_csv(manifest_csv)
    counts = {"requested": len(urls), "downloaded": len(manifest), "failed": failed}
    finished = len(manifest) + failed == len(urls)  # img2dataset gives up on a shard after max_shard_retry
    write_json(state_json, {**state, "config": asdict(config), "finished": finished, **counts})
    return DownloadResult(manifest, manifest_csv, failed_csv, **counts)


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

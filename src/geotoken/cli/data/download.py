"""`geotoken data download URLS.csv -o SHARDS/`: a URL list with coordinates -> WebDataset shards + manifest."""

from __future__ import annotations

from geotoken.data.download import RESIZE_MODES, DownloadConfig, download

HELP = "download images of a URL list (MP16, OSV-5M, Im2GPS3k, YFCC4k, ...) into WebDataset shards"


def register(subparsers) -> None:
    d = DownloadConfig()
    p = subparsers.add_parser(
        "download",
        help=HELP,
        description=HELP
        + ". Wraps img2dataset (pip install 'geotoken[download]'). The CSV needs a URL column "
        "(url, image_url, thumb_original_url, ...) and lat/lon columns; an id column (IMG_ID, id, ...) is kept. "
        "A list without coordinates (GeoEstimation's mp16_urls.csv: no header, image_id,url) takes them from "
        "--annotations (mp16_places365.csv), joined by id. "
        "Writes NNNNN.tar shards, manifest.csv (id,lat,lon,image), failed.csv and _geotoken/download.json to the output "
        "folder. Rerun the same command to resume.",
    )
    p.add_argument("urls", help="CSV with url + lat/lon (+ id) columns, or headerless image_id,url rows")
    p.add_argument(
        "--annotations",
        help="annotation CSV whose lat/lon are joined to the URL list by id (for lists without coordinates, "
        "e.g. mp16_places365.csv for mp16_urls.csv)",
    )
    p.add_argument("-o", "--out", required=True, help="output folder for the shards")
    p.add_argument(
        "--image-size", type=int, default=d.image_size, help="target size in pixels (default %(default)s)"
    )
    p.add_argument("--resize-mode", choices=RESIZE_MODES, default=d.resize_mode, help="default %(default)s")
    p.add_argument(
        "--processes", type=int, default=d.processes, help="download processes (default %(default)s)"
    )
    p.add_argument(
        "--threads-per-process",
        type=int,
        default=d.threads,
        help="download threads per process (default %(default)s)",
    )
    p.add_argument("--samples-per-shard", type=int, default=d.samples_per_shard, help="default %(default)s")
    p.add_argument("--retries", type=int, default=d.retries, help="retries per URL (default %(default)s)")
    p.add_argument("--timeout", type=int, default=d.timeout, help="seconds per request (default %(default)s)")
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="drop invalid rows of the URL list (written to OUT/skipped_rows.csv) instead of stopping",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    config = DownloadConfig(
        image_size=args.image_size,
        resize_mode=args.resize_mode,
        processes=args.processes,
        threads=args.threads_per_process,
        samples_per_shard=args.samples_per_shard,
        retries=args.retries,
        timeout=args.timeout,
    )
    r = download(
        args.urls,
        args.out,
        config,
        on_error="skip" if args.skip_bad else "raise",
        annotations=args.annotations,
    )
    print(
        f"downloaded {r.downloaded} of {r.requested} images into {args.out}; {r.failed} failed (see {r.failed_csv})"
    )
    print(f"manifest: {r.manifest_csv}")
    return 0

"""`geotoken manifest INPUT -o manifest.csv`: validate an annotation file (or WebDataset shards) into the
standard `id,lat,lon,image` CSV that every later command reads."""

from __future__ import annotations

HELP = "validate an annotation CSV or WebDataset shards and write the standard manifest CSV"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "manifest",
        help=HELP,
        description=HELP
        + ". Reads MP16 / MP16-Pro, Im2GPS3k, YFCC4k, OSV-5M, plain id,lat,lon,image CSVs and "
        "LAT,LON lists (columns detected by name), or a folder / list of img2dataset .tar shards. Bad rows stop "
        "the command with the file, line and value, unless --skip-report is given.",
    )
    p.add_argument("inputs", nargs="+", help="annotation CSV, or .tar shards / a folder of them")
    p.add_argument("-o", "--output", required=True, help="manifest CSV to write (id,lat,lon,image)")
    p.add_argument(
        "--image-root", help="folder relative image paths are resolved against (default: the CSV's)"
    )
    p.add_argument(
        "--check-images",
        choices=["no", "exists", "decode"],
        default="no",
        help="also check that every image exists, or that it decodes (slow); default %(default)s",
    )
    p.add_argument(
        "--skip-report", help="drop bad rows instead of stopping, and list them (row,id,reason) here"
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from geotoken.data.manifest import manifest_from_shards, read_manifest
    from geotoken.errors import GeoTokenError

    check = False if args.check_images == "no" else args.check_images
    options = dict(
        check_images=check, on_error="skip" if args.skip_report else "raise", skip_report=args.skip_report
    )
    first = Path(args.inputs[0])
    if first.is_dir() or first.suffix == ".tar":
        if args.image_root:
            raise GeoTokenError("--image-root applies to CSV input, not to shards")
        m = manifest_from_shards(
            args.inputs if len(args.inputs) > 1 or first.suffix == ".tar" else first, **options
        )
    elif len(args.inputs) > 1:
        raise GeoTokenError(
            f"give one annotation CSV (got {len(args.inputs)} inputs), or several .tar shards"
        )
    else:
        m = read_manifest(first, image_root=args.image_root, **options)
    m.write_csv(args.output)
    skipped = ""
    if args.skip_report:
        with open(args.skip_report, encoding="utf-8") as f:
            skipped = f"; {sum(1 for _ in f) - 1} bad rows skipped (see {args.skip_report})"
    print(f"wrote {len(m)} rows to {args.output}{skipped}")
    return 0

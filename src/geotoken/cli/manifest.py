"""`geotoken manifest INPUT -o manifest.csv`: validate an annotation file (or WebDataset shards) into the
standard `id,lat,lon,image` CSV that every later command reads."""

from __future__ import annotations

from geotoken.data.manifest import read_annotations

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
    p.add_argument("-o", "--out", required=True, help="manifest CSV to write (id,lat,lon,image)")
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
    m = read_annotations(
        args.inputs,
        image_root=args.image_root,
        check_images=False if args.check_images == "no" else args.check_images,
        on_error="skip" if args.skip_report else "raise",
        skip_report=args.skip_report,
    )
    m.write_csv(args.out)
    skipped = ""
    if args.skip_report:
        with open(args.skip_report, encoding="utf-8") as f:
            skipped = f"; {sum(1 for _ in f) - 1} bad rows skipped (see {args.skip_report})"
    print(f"wrote {len(m)} rows to {args.out}{skipped}")
    return 0

"""`geotoken manifest INPUT -o manifest.csv`: validate an annotation file (or WebDataset shards) into the
standard `id,lat,lon,image` CSV that every later command reads."""

from __future__ import annotations

from pathlib import Path

from geotoken.data.datasets import FORMATS, DatasetSource, read_source, write_report, write_texts
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
        "--format",
        choices=FORMATS,
        help="a real dataset's layout (docs/datasets.md): images found under --image-root (a folder, .tar / "
        ".zip archives), rows without an image and images without a row left out and listed in the skip "
        "report (default OUT's name + .report.csv), place texts (mp16-pro) written to OUT's name + .texts.csv",
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


def run_format(args) -> int:
    """A real dataset layout through `geotoken.data.datasets` (what the `dataset` stage of `geotoken run` does)."""
    out = Path(args.out)
    stem = out.with_suffix("")
    annotations, images = (
        (None, args.inputs[0]) if args.format == "shards" else (args.inputs[0], args.image_root)
    )
    result = read_source(DatasetSource(stem.name, args.format, annotations, images), out.parent)
    result.manifest.write_csv(out)
    report = Path(args.skip_report) if args.skip_report else Path(f"{stem}.report.csv")
    write_report(report, result.report)
    print(
        f"wrote {len(result.manifest)} rows to {out}; {len(result.report)} rows / images left out (see {report})"
    )
    if result.texts is not None:
        write_texts(f"{stem}.texts.csv", result.manifest.ids, result.texts)
        print(f"wrote the place texts to {stem}.texts.csv (geotoken align train --texts)")
    return 0


def run(args) -> int:
    if args.format:
        return run_format(args)
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

"""`geotoken manifest INPUT -o manifest.csv`: validate an annotation file (or WebDataset shards) into the
standard `id,lat,lon,image` CSV that every later command reads."""

from __future__ import annotations

from pathlib import Path

from geotoken.data.datasets import (
    FORMATS,
    DatasetSource,
    guess_format,
    images_named_by_id,
    read_leaving_out_bad_rows,
    report_path,
)
from geotoken.data.manifest import read_annotations, read_header
from geotoken.errors import GeoTokenError
from geotoken.io import check_outputs_spare_inputs
from geotoken.stages import DatasetStageConfig, HoldoutConfig, read_datasets

HELP = "validate an annotation CSV or WebDataset shards and write the standard manifest CSV"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "manifest",
        help=HELP,
        description=HELP
        + ". Reads plain id,lat,lon,image CSVs and LAT,LON lists (columns detected by name), MP16 / "
        "MP16-Pro, Im2GPS3k, YFCC4k and OSV-5M (their images are named by id: with --format), or a folder / "
        "list of img2dataset .tar shards. Bad rows (coordinates out of range or unreadable, duplicate ids, short "
        "rows) stop the command with the file, line and value, unless --skip-bad is given; with --format "
        "they are left out, as with --skip-bad. The rows left out are listed in OUT's name + .report.csv "
        "(where,id,reason), with --format beside the rows whose image is missing, counted apart.",
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
        ".zip archives); bad rows, rows without an image and images without a row left out and listed in "
        "the report (OUT's name + .report.csv); place texts (mp16-pro) written to OUT's name + .texts.csv",
    )
    p.add_argument(
        "--holdout",
        type=int,
        default=0,
        help="with --format: move N seeded random rows into a held-out split",
    )
    p.add_argument("--holdout-name", default="val", help="the held-out split's name (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out rows (default %(default)s)")
    p.add_argument(
        "--check-images",
        choices=["no", "exists", "decode"],
        default="no",
        help="also check that every image exists, or that it decodes (slow); default %(default)s",
    )
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="leave bad rows out instead of stopping, each listed in OUT's name + .report.csv (always so "
        "with --format)",
    )
    p.set_defaults(func=run)


def run_format(args) -> int:
    """A real dataset layout, exactly as the `dataset` stage of `geotoken run` reads it (one source)."""
    out = Path(args.out)
    if out.suffix != ".csv":
        raise GeoTokenError(f"-o {out}: with --format, -o names SPLIT.csv (the report is SPLIT.report.csv)")
    if args.check_images != "no":
        raise GeoTokenError(
            "--check-images is for plain annotation files: with --format every row's image is found in the "
            "layout (rows without one are in the report), and `geotoken embed --skip-bad` reports images that "
            "do not decode"
        )
    annotations, images = (
        (None, args.inputs[0]) if args.format == "shards" else (args.inputs[0], args.image_root)
    )
    source = DatasetSource(out.stem, args.format, annotations, images)
    holdout = HoldoutConfig(args.holdout_name, out.stem, args.holdout, args.seed) if args.holdout else None
    info_name = f"{out.stem}.dataset.json"  # one per call: manifests of several splits share a folder
    splits = [out.stem] + ([holdout.split] if holdout else [])  # (the held-out split's files beside -o)
    written = [out.parent / f"{s}{end}" for s in splits for end in (".csv", ".report.csv", ".texts.csv")]
    check_outputs_spare_inputs([*args.inputs, args.image_root], *written, out.parent / info_name)
    out.parent.mkdir(parents=True, exist_ok=True)
    info = read_datasets(DatasetStageConfig((source,), holdout), out.parent, info_name)
    for split, n in info["sizes"].items():  # the stage logged what each split left out, by kind
        texts = f", {split}.texts.csv" if info["sources"][split]["texts"] else ""
        print(f"wrote {n:,} rows to {out.parent / split}.csv{texts}; every row or image left out is in "
              f"{split}.report.csv")  # fmt: skip
    print(f"sizes, counts and hashes: {out.parent / info_name}")
    if args.format == "mp16" and guess_format(annotations, read_header(annotations)) == "mp16-pro":
        print("hint: this file has MP16-Pro's place columns (city, state, country); --format mp16-pro also "
              "writes them as place texts (SPLIT.texts.csv) for the text-aligned head")  # fmt: skip
    return 0


def check_images_named_by_id(inputs: list[str]) -> None:
    """Refuse an annotation CSV whose images are named by its id column without --format (see
    `images_named_by_id`): the manifest would list every image at a path that is not there."""
    named = images_named_by_id(inputs[0]) if len(inputs) == 1 else None
    if named is not None:
        fmt, column = named
        raise GeoTokenError(
            f"{inputs[0]}: line 1: its images are named by the {column} column; pass --format {fmt} (with "
            f"--image-root: the images folder, or its .tar / .zip archives), which finds each row's image "
            f"and reports the rows without one"
        )


def run(args) -> int:
    report = report_path(args.out)
    check_outputs_spare_inputs(args.inputs, args.out, report if args.skip_bad or args.format else None)
    if args.format:
        return run_format(args)
    if args.holdout:
        raise GeoTokenError(
            "--holdout needs --format (a real dataset's layout, read as the dataset stage does)"
        )
    check_images_named_by_id(args.inputs)
    options = dict(
        image_root=args.image_root, check_images=False if args.check_images == "no" else args.check_images
    )
    if args.skip_bad:
        m, left_out = read_leaving_out_bad_rows(args.inputs, report, **options)
    else:
        m, left_out = read_annotations(args.inputs, **options), []
    if not len(m):  # every later stage would choke on it, far from here
        left = f" (every row was bad: {report})" if args.skip_bad else ""
        raise GeoTokenError(f"{', '.join(map(str, args.inputs))}: no rows to write{left}")
    m.write_csv(args.out)
    skipped = f"; {len(left_out):,} bad rows left out (listed in {report})" if args.skip_bad else ""
    print(f"wrote {len(m):,} rows to {args.out}{skipped}")
    return 0

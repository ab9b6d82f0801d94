"""`geotoken report RUN_DIR`: one self-contained HTML file (tables, plots, maps, examples, config)."""

from __future__ import annotations

from geotoken.report import write_report


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "report",
        help="write a self-contained HTML report of a run or evaluation folder",
        description="Write one HTML file that opens offline (CSS, plots and maps inlined; nothing from a CDN): "
        "the accuracy table at 1/25/200/750/2500 km with median errors per method and strategy, the error "
        "CDF, a world map of predictions vs truth on Blue Marble, example photos with their top-k candidates "
        "and per-level confidence, and the run's configuration and timings. RUN_DIR is a `geotoken demo` or `geotoken run` "
        "run folder (run.json) or a `geotoken evaluate` output folder (metrics.json). Missing optional "
        "parts are listed in the report; malformed files are an error.",
    )
    p.add_argument(
        "run_dir", metavar="RUN_DIR", help="run folder (run.json) or evaluation folder (metrics.json)"
    )
    p.add_argument("-o", "--out", metavar="HTML", help="output file (default RUN_DIR/report.html)")
    p.set_defaults(func=run)


def run(args) -> int:
    path = write_report(args.run_dir, args.out)
    print(f"report: {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0

"""One self-contained HTML file from a run folder's files (`geotoken report RUN_DIR`).

Input: a demo run folder (run.json and the evaluation folders it names) or a `geotoken evaluate` output
folder (metrics.json, predictions.csv and plots); `geotoken.report.read` reads and checks them,
`geotoken.report.render` turns what was read into HTML.

Output: report.html with everything inlined (CSS, PNG/JPEG data URIs, inline SVG); no URL outside the file,
so it opens offline and can be mailed. The report is a pure function of the folder's files: optional parts
that are absent are listed under "Missing"; a file that is present but malformed is an error naming the
file, row and field (a report that silently drops half a table is worse than none).
"""

from __future__ import annotations

import os
from pathlib import Path

from geotoken.errors import GeoTokenError
from geotoken.io import atomic_open
from geotoken.report.read import read_run
from geotoken.report.render import render_report


def build_report(run_dir: str | os.PathLike) -> str:
    """The report's HTML text for a demo run folder (run.json) or an evaluation folder (metrics.json)."""
    return render_report(read_run(run_dir))


def write_report(run_dir: str | os.PathLike, output: str | os.PathLike | None = None) -> Path:
    """Write the report (default RUN_DIR/report.html) atomically; return its path."""
    out = Path(output) if output is not None else Path(run_dir) / "report.html"
    if out.suffix.lower() not in (".html", ".htm"):  # not e.g. the metrics.json it was built from
        raise GeoTokenError(f"{out}: the report is one HTML file; name it NAME.html")
    text = build_report(run_dir)
    with atomic_open(out, "w", encoding="utf-8") as f:
        f.write(text)
    return out

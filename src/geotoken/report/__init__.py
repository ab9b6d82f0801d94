"""`geotoken report`: one self-contained HTML file from a run or evaluation folder.

`read_run` (geotoken.report.read) reads and checks the folder's files, `render_report`
(geotoken.report.render) turns what it read into HTML; `build_report` is the two together.
"""

from geotoken.report.read import RunFolder, read_run
from geotoken.report.render import render_report
from geotoken.report.report import build_report, write_report

__all__ = ["RunFolder", "build_report", "read_run", "render_report", "write_report"]

"""`geotoken report`: one self-contained HTML file from a run or evaluation folder."""

from geotoken.report.report import build_report, write_report

__all__ = ["build_report", "write_report"]

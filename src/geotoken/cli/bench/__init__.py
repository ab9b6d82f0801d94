"""`geotoken bench ...`: speed benchmarks with machine-readable output (one module per benchmark)."""

import sys

from geotoken.cli import register_group


def register(subparsers) -> None:
    register_group(subparsers, "bench", "speed benchmarks (JSON with --json)", sys.modules[__name__])

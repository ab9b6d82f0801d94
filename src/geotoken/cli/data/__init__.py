"""`geotoken data ...`: build or fetch datasets (one module per sub-command)."""

import sys

from geotoken.cli import register_group


def register(subparsers) -> None:
    register_group(subparsers, "data", "build or download datasets", sys.modules[__name__])

"""Tokenization speed beside s2geometry and s2sphere: the same as `geotoken bench tokens`.

python benchmarks/bench_tokens.py --points 1000000 --json
"""

import sys

from geotoken.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "tokens", *sys.argv[1:]]))

"""Decoding speed, cached vs uncached, beside the reference figures: the same as `geotoken bench decode`.

python benchmarks/bench_decode.py --preset small --batch-size 16 --threads 2 --json
"""

import sys

from geotoken.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "decode", *sys.argv[1:]]))

"""Feature-extraction images/s per backbone and input size, forward alone and end to end: `geotoken bench extract`.

python benchmarks/bench_extract.py --sizes 224 128 64 --threads 2
python benchmarks/bench_extract.py --clip openai/clip-vit-large-patch14 --device cuda --batch-size 256
"""

import sys

from geotoken.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "extract", *sys.argv[1:]]))

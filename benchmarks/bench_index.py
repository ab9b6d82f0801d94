"""FAISS index kinds side by side (build time, index size, queries/s, recall@15): the same as `geotoken bench index`.

python benchmarks/bench_index.py --rows 100000 --threads 2          # 100K x 768 random unit vectors
python benchmarks/bench_index.py --rows 4700000 --kinds ivfpq hnsw  # MP16 scale
"""

import sys

from geotoken.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "index", *sys.argv[1:]]))

"""Training speed of GeoToken beside a re-implementation of the authors' step, in one run.

    python benchmarks/bench_train.py --threads 2       # small b32 and paper b16, 2 threads, fp32
    python benchmarks/bench_train.py --threads 2 --dtype bf16 --iters 10
    python benchmarks/bench_train.py --threads 2 --dtype bf16 --compile   # torch.compile ours (the reference stays eager)

Both steps run on the same random paper-shaped inputs (three 768-d embeddings, k 15, level 20, g 2,
20,000-row gallery) in the same process, alternating, so machine load hits both alike. Prints one JSON
object per preset with the side-by-side ratio and the ratio to the published reference figure. The body is
`geotoken.bench.train.side_by_side`; the reference-style step is `geotoken.bench.reference`.
"""

from __future__ import annotations

import argparse
import json

from geotoken import DTYPES
from geotoken.bench.common import set_threads
from geotoken.bench.train import matmul_peaks, side_by_side


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="small:32,paper:16", help="preset:batch-size pairs")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default 0: torch's choice)")
    p.add_argument("--dtype", default="fp32", choices=DTYPES)
    p.add_argument("--compile", action="store_true", help="torch.compile our model")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2, help="alternations of ours / reference")
    args = p.parse_args()
    set_threads(args.threads)
    peaks = matmul_peaks()
    for item in args.runs.split(","):
        name, batch_size = item.split(":")
        out = side_by_side(name, int(batch_size), args.threads, args.dtype, args.compile, args.iters,
                           args.rounds, peaks)  # fmt: skip
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()

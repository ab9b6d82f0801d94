"""Training speed of GeoToken beside a re-implementation of the authors' step, in one run.

    python benchmarks/bench_train.py                   # small b32 and paper b16, 2 threads, fp32
    python benchmarks/bench_train.py --dtype bf16 --iters 10
    python benchmarks/bench_train.py --dtype bf16 --compile     # torch.compile ours (the reference stays eager)

Both steps run on the same random paper-shaped inputs (three 768-d embeddings, k 15, level 20, g 2,
20,000-row gallery) in the same process, alternating, so machine load hits both alike. Prints one JSON
object per preset with the side-by-side ratio and the ratio to the published reference figure.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from geotoken import DTYPES  # noqa: E402
from geotoken.train.bench import REFERENCE_SAMPLES_PER_S, bench_ours, matmul_gflops  # noqa: E402
from reference_train import bench_reference  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="small:32,paper:16", help="preset:batch pairs")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="fp32", choices=DTYPES)
    p.add_argument("--compile", action="store_true", help="torch.compile our model")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2, help="alternations of ours / reference")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    peak = {"fp32": matmul_gflops(torch.float32), "bf16": matmul_gflops(torch.bfloat16, min_seconds=0.2)}
    for item in args.runs.split(","):
        name, batch = item.split(":")
        batch = int(batch)
        ours, ref = [], []
        for _ in range(args.rounds):
            ours.append(bench_ours(name, batch, args.dtype, args.iters, warmup=1, compile=args.compile))
            ref.append(bench_reference(name, batch, args.iters, warmup=1)["train_samples_per_s"])
        best = max(ours, key=lambda r: r["train_samples_per_s"])
        published = REFERENCE_SAMPLES_PER_S.get((name, batch))
        out = {
            "preset": name,
            "batch": batch,
            "threads": args.threads,
            "dtype": args.dtype,
            "compile": args.compile,
            "train_samples_per_s": best["train_samples_per_s"],
            "reference_samples_per_s": max(ref),
            "ratio_side_by_side": best["train_samples_per_s"] / max(ref),
            "ratio_to_published": best["train_samples_per_s"] / published if published else None,
            "matmul_gflops_fp32": peak["fp32"],
            "matmul_gflops_bf16": peak["bf16"],
            "share_of_matmul_peak": best["flops_per_step"]
            * best["train_samples_per_s"]
            / batch
            / 1e9
            / peak[args.dtype],
        }
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()

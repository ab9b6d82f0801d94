"""`geotoken bench train`: training samples/s, peak memory and share of the matmul peak, beside the reference."""

from __future__ import annotations

import argparse
import json

from geotoken import DTYPES
from geotoken.bench.common import GALLERY_ROWS
from geotoken.bench.train import bench_train
from geotoken.cli import THREADS_HELP, count
from geotoken.devices import retain_freed_memory
from geotoken.model import ARCHS, PRESETS


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="training-step speed on random paper-shaped inputs",
        description=(
            "Time one forward + backward + AdamW step per iteration on random inputs shaped like the paper's "
            "(three 768-d embeddings, k 15, level 20, g 2, 20,000-row gallery). Prints the machine's 2048x2048 "
            "matmul GFLOP/s (fp32, bf16), the achieved share of it, and the ratio to the authors' code: the "
            "published figure, and with --reference a re-implementation of its structure timed in the same run "
            "(geotoken.bench.reference)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--preset", default="small", choices=sorted(PRESETS))
    p.add_argument("--arch", default="ours", choices=ARCHS, help="model layers (authors: the paper's)")
    p.add_argument(
        "--compare-archs",
        action="store_true",
        help="also time every layer design side by side (ours, authors)",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=count, default=0, help=THREADS_HELP)
    p.add_argument("--dtype", default="fp32", choices=DTYPES, help="bf16: CPU autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile our model (warm-up compiles it)")
    p.add_argument("--iters", type=int, default=5, help="timed iterations")
    p.add_argument("--warmup", type=count, default=1, help="untimed steps first (default %(default)s)")
    p.add_argument("--gallery-rows", type=int, default=GALLERY_ROWS, help="rows of the random gallery")
    p.add_argument("--reference", action="store_true", help="also time the reference-style step")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args) -> int:
    retained = retain_freed_memory()  # a training job: keep freed activations' memory (see there)
    res = bench_train(
        args.preset,
        args.batch_size,
        args.threads,
        args.dtype,
        args.compile,
        args.iters,
        args.warmup,
        rows=args.gallery_rows,
        reference=args.reference,
        arch=args.arch,
        compare_archs=args.compare_archs,
    )
    res["malloc_retains_freed_memory"] = retained  # both steps ran under it
    if args.json:
        print(json.dumps(res))
        return 0
    print(
        f"matmul 2048x2048: {res['matmul_gflops_fp32']:.1f} GFLOP/s fp32, {res['matmul_gflops_bf16']:.1f} bf16"
    )
    print(
        f"geotoken {res['preset']} ({res['arch']}) batch {res['batch']} {res['dtype']}{' compiled' * res['compile']} "
        f"{res['threads']} threads: "
        f"{res['train_samples_per_s']:.2f} samples/s, {res['achieved_gflops']:.1f} GFLOP/s "
        f"({100 * res['share_of_matmul_peak']:.0f}% of matmul peak), peak RSS {res['peak_rss_mb']:.0f} MB"
    )
    low, high = res["share_of_matmul_peak_range"]
    print(
        f"share of peak: median of each step against the probe right after it ({100 * low:.0f}-{100 * high:.0f}% "
        f"over the steps); against the run's fastest probe {100 * res['share_of_best_probe']:.0f}%"
    )
    print(
        f"attention alone (forward + backward, the step's shapes): {1e3 * res['attention_seconds_per_step']:.0f} ms, "
        f"{100 * res['attention_share_of_step']:.0f}% of the step; with it as is and every other FLOP at the "
        f"matmul peak the step would reach {100 * res['share_of_matmul_peak_bound']:.0f}% of the peak (the bound)"
    )
    if args.reference:
        print(
            f"reference-style step, same run, {res['reference_dtype']}: {res['reference_samples_per_s']:.2f} "
            f"samples/s -> ratio {res['ratio_side_by_side']:.2f}x"
        )
    context = res["published_context"]
    if context:
        print(
            f"context (not measured here): the authors' published {context['samples_per_s']} samples/s, fp32, "
            f"on the issue's machine; ours is {context['ours_over_published']:.2f}x that"
        )
    if args.compare_archs:
        figures = ", ".join(f"{a} {v:.2f}" for a, v in res["arch_samples_per_s"].items())
        print(
            f"layer designs, same run: {figures} samples/s -> authors / ours {res['ratio_authors_to_ours']:.2f}x"
        )
    return 0

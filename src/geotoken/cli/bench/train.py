"""`geotoken bench train`: training samples/s, peak memory and share of the matmul peak, beside the reference."""

from __future__ import annotations

import argparse
import json

from geotoken import DTYPES


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="training-step speed on random paper-shaped inputs",
        description=(
            "Time one forward + backward + AdamW step per iteration on random inputs shaped like the paper's "
            "(three 768-d embeddings, k 15, level 20, g 2, 20,000-row gallery). Prints the machine's 2048x2048 "
            "matmul GFLOP/s (fp32, bf16), the achieved share of it, and the ratio to the authors' code: the "
            "published figure, and with --reference a re-implementation of its structure timed in the same run "
            "(benchmarks/reference_train.py, only in a source checkout)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--preset", default="small", choices=["tiny", "small", "paper"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="fp32", choices=DTYPES, help="bf16: CPU autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile our model (warm-up compiles it)")
    p.add_argument("--iters", type=int, default=5, help="timed iterations")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--gallery-rows", type=int, default=20_000, help="rows of the random gallery")
    p.add_argument(
        "--reference", action="store_true", help="also time the reference-style step (source checkout)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def _reference_module():
    """benchmarks/reference_train.py of the source checkout this package runs from, or None."""
    import importlib.util
    from pathlib import Path

    import geotoken

    path = Path(geotoken.__file__).resolve().parents[2] / "benchmarks" / "reference_train.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("geotoken_reference_train", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(args) -> int:
    import platform

    import torch

    from geotoken.errors import GeoTokenError
    from geotoken.train.bench import REFERENCE_SAMPLES_PER_S, bench_ours, matmul_gflops, peak_rss_mb

    if min(args.batch, args.iters, args.threads, args.gallery_rows) < 1:
        raise GeoTokenError("--batch, --iters, --threads and --gallery-rows must be >= 1")
    torch.set_num_threads(args.threads)
    res = {"preset": args.preset, "batch": args.batch, "threads": args.threads, "dtype": args.dtype}
    res["compile"] = args.compile
    res["gallery_rows"] = args.gallery_rows
    res["torch"], res["cpu"] = torch.__version__, platform.processor() or platform.machine()
    res["matmul_gflops_fp32"] = matmul_gflops(torch.float32)
    res["matmul_gflops_bf16"] = matmul_gflops(torch.bfloat16, min_seconds=0.2)
    ours = bench_ours(
        args.preset,
        args.batch,
        args.dtype,
        args.iters,
        args.warmup,
        rows=args.gallery_rows,
        compile=args.compile,
    )
    res.update(ours)
    res["peak_rss_mb"] = peak_rss_mb()  # before the reference runs in this process
    peak = res["matmul_gflops_bf16" if args.dtype == "bf16" else "matmul_gflops_fp32"]
    res["achieved_gflops"] = ours["flops_per_step"] / ours["seconds_per_step"] / 1e9
    res["share_of_matmul_peak"] = res["achieved_gflops"] / peak
    published = REFERENCE_SAMPLES_PER_S.get((args.preset, args.batch))
    res["reference_published_samples_per_s"] = published  # authors' code, 2 threads fp32, their machine
    res["ratio_to_published"] = ours["train_samples_per_s"] / published if published else None
    if args.reference:
        module = _reference_module()
        if module is None:
            raise GeoTokenError(
                "--reference needs a source checkout (benchmarks/reference_train.py not found)"
            )
        ref = module.bench_reference(args.preset, args.batch, args.iters, args.warmup, rows=args.gallery_rows)
        res["reference_samples_per_s"] = ref["train_samples_per_s"]
        res["ratio_side_by_side"] = ours["train_samples_per_s"] / ref["train_samples_per_s"]

    if args.json:
        print(json.dumps(res))
        return 0
    print(
        f"matmul 2048x2048: {res['matmul_gflops_fp32']:.1f} GFLOP/s fp32, {res['matmul_gflops_bf16']:.1f} bf16"
    )
    print(
        f"geotoken {args.preset} batch {args.batch} {args.dtype}{' compiled' * args.compile} "
        f"{args.threads} threads: "
        f"{res['train_samples_per_s']:.2f} samples/s, {res['achieved_gflops']:.1f} GFLOP/s "
        f"({100 * res['share_of_matmul_peak']:.0f}% of matmul peak), peak RSS {res['peak_rss_mb']:.0f} MB"
    )
    if published:
        print(
            f"published reference: {published} samples/s (their machine) -> ratio {res['ratio_to_published']:.2f}x"
        )
    if args.reference:
        print(
            f"reference-style step, same run: {res['reference_samples_per_s']:.2f} samples/s -> "
            f"ratio {res['ratio_side_by_side']:.2f}x"
        )
    return 0

"""`geotoken bench decode`: images/s of greedy, beam-5 and 10-sample decoding, cached vs uncached, in one run.

Random paper-shaped inputs, eval mode, fp32 or bf16 autocast, every figure including the encoder; the body
and its details: `geotoken.bench.decode`.
"""

from __future__ import annotations

import argparse
import json

from geotoken import DTYPES
from geotoken.bench.decode import DECODERS, REFERENCE, bench_decode
from geotoken.cli import THREADS_HELP, count


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "decode",
        help="decoding speed: greedy / beam-5 / 10 samples, cached vs uncached",
        description=__doc__.splitlines()[0].split(": ", 1)[1],
    )
    p.add_argument(
        "--preset", choices=sorted(REFERENCE), default="small", help="model preset (default small)"
    )
    p.add_argument(
        "--batch-size", type=int, help="images per batch (default: the reference's, 16 small / 8 paper)"
    )
    p.add_argument("--threads", type=count, default=0, help=THREADS_HELP)
    p.add_argument("--iters", type=int, default=3, help="timed repetitions per figure; the fastest is kept")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="matmul precision (default fp32)")
    p.add_argument("--no-uncached", action="store_true", help="skip the (slow) uncached path")
    p.add_argument(
        "--reference",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the reference-style model (the authors' structure) in the same run at the same "
        "precision: the only ratio_vs_reference (default on)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    res = bench_decode(
        args.preset,
        args.batch_size,
        args.threads,
        args.iters,
        uncached=not args.no_uncached,
        dtype=args.dtype,
        reference=args.reference,
    )
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(
        f"decode benchmark: preset {res['preset']}, batch {res['batch']}, {res['threads']} threads, "
        f"{res['dtype']} (images/s)"
    )
    ref = res["ratio_vs_reference"]
    line = f"  encoder only (bound) {res['encoder_images_per_s']:9.2f}"
    if ref is not None:
        line += f"   reference-style {res['reference_encoder_images_per_s']:.2f}"
    print(line)
    for n in DECODERS:
        line = f"  {n:<20} {res[f'{n}_images_per_s']:9.2f}"
        if ref is not None:
            line += f"   reference-style {res[f'reference_{n}_images_per_s']:<8.2f} x{ref[n]:.1f}"
        line += f"   {100 * res['share_of_fp32_matmul_peak'][n]:.0f}% of fp32 matmul peak"
        if "ratio_vs_uncached" in res:
            line += f"   uncached {res[f'uncached_{n}_images_per_s']:.2f} (cached x{res['ratio_vs_uncached'][n]:.1f})"
        print(line)
    context = res["published_context"]
    print(
        "  context (not measured here): the authors' published figures, fp32, batch "
        f"{context['batch']}: " + ", ".join(f"{n} {context['images_per_s'][n]}" for n in DECODERS)
    )
    if "outputs_identical" in res:
        print(f"  cached and uncached tokens identical: {res['outputs_identical']}")
    if "fp32_sequence_agreement" in res:
        agree = ", ".join(f"{n} {x:.1%}" for n, x in res["fp32_sequence_agreement"].items())
        print(f"  sequences equal to fp32's: {agree}")
    return 0

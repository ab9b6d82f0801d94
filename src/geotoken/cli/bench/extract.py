"""`geotoken bench extract`: images/s of feature extraction per backbone and input size, in one run."""

from __future__ import annotations

import json

from geotoken.bench.extract import bench_extract
from geotoken.cli import THREADS_HELP, count


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "extract",
        help="images/s of each backbone: forward pass alone and end to end (decode + forward + store)",
        description="Images/s of feature extraction for each backbone at the sizes used: the forward pass on a "
        "ready batch, and `embed` end to end over JPEG files (decode in DataLoader workers, float16 writes).",
    )
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 128, 64],
                   help="efficientnet-lite0 input sizes (default 224 128 64)")  # fmt: skip
    p.add_argument("--clip", help="also measure the clip backbone from this local folder / hub id")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    p.add_argument(
        "--images", type=int, default=256, help="JPEG files for the end-to-end figure (default 256)"
    )
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (default 2)")
    p.add_argument("--threads", type=count, default=0, help=THREADS_HELP)
    p.add_argument("--iters", type=int, default=3, help="timed forward passes; the median is kept")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args) -> int:
    backbones = [("efficientnet-lite0", {"image_size": s}) for s in args.sizes]
    if args.clip:
        backbones.append(("clip", {"clip": args.clip}))
    result = bench_extract(
        backbones, args.batch_size, args.images, args.workers, args.threads, args.iters, args.device
    )
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"batch {result['batch_size']}, {result['images']} JPEGs, {result['workers']} workers, "
          f"{result['threads']} threads, {result['device']}")  # fmt: skip
    print(f"{'backbone':<34}{'forward img/s':>15}{'end-to-end img/s':>18}{'ratio':>8}")
    for label, r in result["backbones"].items():
        print(f"{label:<34}{r['forward_images_per_s']:>15.1f}{r['end_to_end_images_per_s']:>18.1f}"
              f"{r['end_to_end_over_forward']:>8.2f}")  # fmt: skip
    print("ratio: end-to-end / forward images/s, measured in this run (1.0: decoding JPEGs costs nothing beside "
          "the forward pass; lower: the input pipeline is the bound, add --workers)")  # fmt: skip
    return 0

"""`geotoken bench predict --model geoclip`: images/s of the GeoCLIP path against GeoCLIP's own predict."""

from __future__ import annotations

import json

from geotoken.bench.geoclip import bench_predict_geoclip
from geotoken.predict import BUILTIN_MODELS


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "predict",
        help="images/s of predict at real size (random CLIP ViT-L/14 from its config), beside GeoCLIP's own",
        description="Images/s of GeoCLIP through geotoken (gallery embeddings cached once) at each batch size, "
        "next to the geoclip package's own `GeoCLIP.predict` (which re-encodes its 100K-coordinate gallery for "
        "every image) on the same random CLIP ViT-L/14 weights, images and threads, in the same run; both must "
        "give the same top-1. Nothing is downloaded.",
    )
    p.add_argument("--model", choices=BUILTIN_MODELS, default="geoclip", help="model (default geoclip)")
    p.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[1, 16], help="our batch sizes (default 1 16)"
    )
    p.add_argument("--images", type=int, default=16, help="images timed on our path (default 16)")
    p.add_argument(
        "--reference-images", type=int, default=2, help="images timed on GeoCLIP's path (default 2)"
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (default 0: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args) -> int:
    result = bench_predict_geoclip(
        tuple(args.batch_sizes), args.threads, args.images, args.reference_images, seed=args.seed
    )
    if args.json:
        print(json.dumps(result))
        return 0
    print(json.dumps(result, indent=2))
    return 0

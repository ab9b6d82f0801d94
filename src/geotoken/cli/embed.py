"""`geotoken embed`: backbone features of every image of a manifest into a feature store (resumable)."""

from __future__ import annotations

import argparse
import time

from geotoken.cli import DEVICE_HELP, THREADS_HELP, count, first_process, use_threads
from geotoken.data.datasets import images_named_by_id
from geotoken.data.manifest import read_manifest
from geotoken.encoders import BACKBONES, check_backbone_options, load_backbone
from geotoken.errors import GeoTokenError
from geotoken.features import embed

HELP = "embed the images of a manifest with an image backbone into a feature store (float16 memmaps)"

EPILOG = """\
The store folder gets store.json (backbone, dims, ids in manifest order, manifest hash), features.npy
(float16, N x F) and coords.npy. Killed halfway, the same command continues where it stopped; the result
is byte-identical to an uninterrupted run (keep the same --batch-size, and --threads on a CPU: another
thread count rounds a few values otherwise). Under torchrun, every process embeds its share of the rows
into the same store (one thread each, as torchrun sets):

  geotoken embed data/gallery.csv -o runs/demo/gallery --backbone efficientnet-lite0 --image-size 160
  torchrun --nproc-per-node 8 -m geotoken embed mp16.csv -o mp16_store --backbone clip \\
      --clip openai/clip-vit-large-patch14 --batch-size 256 --workers 8
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "embed",
        help=HELP,
        description=HELP,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "manifest",
        help="manifest CSV (id,lat,lon,image, as `geotoken manifest` writes; an MP16 / OSV-5M annotation "
        "file goes through `geotoken manifest --format` first)",
    )
    p.add_argument("-o", "--out", required=True, help="feature store folder (created, or resumed if present)")
    p.add_argument(
        "--backbone",
        choices=list(BACKBONES),
        help="image backbone (default clip with --clip, else efficientnet-lite0)",
    )
    p.add_argument("--image-size", type=int, help="efficientnet-lite0: input side in pixels (default 224)")
    p.add_argument("--clip", help="clip: local folder or hub id of the CLIP model (as in predict and serve)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader processes decoding images (default 2)")
    p.add_argument("--skip-bad", action="store_true",
                   help="record unreadable images (store.json, skipped.csv) and continue, instead of stopping")  # fmt: skip
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--threads", type=count, default=0, help=THREADS_HELP)
    p.set_defaults(func=run)


def run(args) -> int:
    named = images_named_by_id(args.manifest)
    if named is not None:  # MP16's or OSV-5M's own annotation file: its images are not at the paths it gives
        fmt, column = named
        raise GeoTokenError(
            f"{args.manifest}: line 1: its images are named by the {column} column, not at paths; write a "
            f"manifest first: geotoken manifest {args.manifest} --format {fmt} --image-root IMAGES -o SPLIT.csv"
        )
    use_threads(args.threads)
    name = args.backbone or ("clip" if args.clip else "efficientnet-lite0")
    check_backbone_options(name, args.clip, args.image_size)
    options = {"image_size": args.image_size, "clip": args.clip}
    backbone = load_backbone(name, **{k: v for k, v in options.items() if v is not None})
    manifest = read_manifest(args.manifest)
    t0 = time.perf_counter()
    store = embed(manifest, backbone, args.out, args.batch_size, args.workers, args.skip_bad, args.device)
    seconds = time.perf_counter() - t0
    if first_process():  # under torchrun, one summary
        print(f"{store.root}: {store.rows} rows x {store.dims['features']} ({name}), "
              f"{len(store.skipped)} skipped, {seconds:.1f} s")  # fmt: skip
        if store.skipped:
            print(f"unreadable images are listed in {store.root / 'skipped.csv'}")
    return 0

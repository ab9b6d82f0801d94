"""`geotoken align train|apply`: geo-alignment heads on a feature store."""

from __future__ import annotations

import argparse

import numpy as np

from geotoken.align import GPS_HEADS, AlignConfig, AlignHeads, HeadsConfig, apply_heads, train_heads
from geotoken.cli import DEVICE_HELP, THREADS_HELP, count, use_threads
from geotoken.data.datasets import read_texts
from geotoken.data.manifest import read_manifest
from geotoken.devices import resolve_device, retain_freed_memory
from geotoken.encoders.text import TEXT_ENCODERS
from geotoken.features import FeatureStore

HELP = "train alignment heads (visual / GPS / text embeddings) on a feature store, or apply them to one"

EPILOG = """\
examples:
  geotoken align train runs/demo/gallery -o runs/demo/align --epochs 20
  geotoken align train runs/clip/gallery -o runs/clip/align --gps-head geoclip
  geotoken align train feats/mp16 -o align/ --texts MP16_Pro_places365.csv   # MP16-Pro's place names
  geotoken align apply runs/demo/align runs/demo/gallery
  geotoken align apply runs/demo/align runs/demo/test

`train` holds out --val-fraction of the store's rows and reports, on them, image->GPS retrieval accuracy
over a GPS gallery (default: GeoCLIP's 100K MP16 coordinates) and 1-NN geolocation among the training
images with each embedding; the numbers go to OUT/metrics.json. `apply` writes visual.npy, gps.npy and
text.npy (float16, L2-normalised) into the store.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "align",
        help=HELP,
        description=HELP,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="align_command", required=True, metavar="COMMAND")

    t = sub.add_parser(
        "train",
        help="train heads on a store's features and coordinates",
        description="Train the alignment heads contrastively on a feature store's backbone features and "
        "coordinates (GPS head) and place texts (text head); writes OUT (weights, config, metrics.json) and "
        "resumes a killed run from its last whole epoch. Apply them with `geotoken align apply`.",
    )
    t.add_argument("store", help="feature store with `features` (from geotoken embed)")
    t.add_argument(
        "-o",
        "--out",
        required=True,
        help="heads folder (model.safetensors, config.json, metrics.json); "
        "killed, the same command goes on from the last whole epoch (OUT/checkpoint)",
    )
    c, h = AlignConfig, HeadsConfig
    t.add_argument(
        "--epochs", type=int, default=c.epochs, help="passes over the training rows (default %(default)s)"
    )
    t.add_argument(
        "--batch-size", type=int, default=c.batch_size, help="contrastive batch size (default %(default)s)"
    )
    t.add_argument(
        "--lr", type=float, default=c.lr, help="AdamW learning rate, cosine decay (default %(default)s)"
    )
    t.add_argument(
        "--queue-size", type=int, default=c.queue_size, help="extra GPS negatives (default %(default)s)"
    )
    t.add_argument(
        "--text-weight",
        type=float,
        default=c.text_weight,
        help="weight of the image-text loss (default %(default)s)",
    )
    t.add_argument(
        "--val-fraction",
        type=float,
        default=c.val_fraction,
        help="held-out share of rows (default %(default)s)",
    )
    t.add_argument(
        "--visual-dim",
        type=int,
        default=h.visual_dim,
        help="PCA dimension of the visual embedding (default %(default)s)",
    )
    t.add_argument(
        "--hidden",
        type=int,
        default=h.hidden,
        help="hidden width of the GPS and text heads (default %(default)s)",
    )
    t.add_argument(
        "--gps-head",
        choices=list(GPS_HEADS),
        default=h.gps_head,
        help="GPS head: train one from scratch, or (768-d clip stores) GeoCLIP's pretrained image head, "
        "frozen (geoclip) or fine-tuned (geoclip-finetune) (default %(default)s)",
    )
    t.add_argument(
        "--text-encoder",
        choices=list(TEXT_ENCODERS),
        help="text encoder of place descriptions (default: clip for a clip backbone, else minilm)",
    )
    t.add_argument(
        "--texts",
        help="the text-aligned targets: an id,text CSV (geotoken manifest --format mp16-pro writes one) or "
        "MP16-Pro's annotation file (city, state, country columns); default: offline place names",
    )
    t.add_argument(
        "--gallery", help="CSV with LAT,LON columns: GPS gallery for the metric (default: MP16 100K)"
    )
    t.add_argument("--seed", type=int, default=c.seed)
    t.add_argument("--device", default="auto", help=DEVICE_HELP)
    t.add_argument("--threads", type=count, default=0, help=THREADS_HELP)
    t.add_argument("--overwrite", action="store_true", help="train again over heads already in --out")
    t.set_defaults(func=run_train)

    a = sub.add_parser(
        "apply",
        help="write visual/gps/text arrays into a store",
        description="Run trained alignment heads over a store's features and write its visual, gps and text "
        "arrays, each marked with the heads' fingerprint: the gallery and every query store must be aligned "
        "by the same heads, and the commands that meet two stores check it.",
    )
    a.add_argument("heads", help="heads folder written by `geotoken align train`")
    a.add_argument("store", help="feature store with `features` from the same backbone")
    a.add_argument("--batch-size", type=int, default=8192, help="rows per step (default 8192)")
    a.add_argument("--device", default="auto", help=DEVICE_HELP)
    a.add_argument("--threads", type=count, default=0, help=THREADS_HELP)
    a.set_defaults(func=run_apply)


def _print_metrics(metrics: dict) -> None:
    def row(name: str, m: dict) -> str:
        accs = "  ".join(f"{100 * m[f'acc_{t}km']:5.1f}" for t in (1, 25, 200, 750, 2500))
        return f"{name:<24}{accs}  {m['median_km']:9.0f}"

    print(f"held-out rows: {metrics['rows']['val']}, training rows: {metrics['rows']['train']}")
    print(f"{'% within km':<24}{'1':>5}  {'25':>5}  {'200':>5}  {'750':>5}  {'2500':>5}  {'median km':>9}")
    print(row(f"image->GPS ({metrics['gallery_size']})", metrics["image_to_gps"]))
    for name, m in metrics["nn_1"].items():
        print(row(f"1-NN {name}", m))


def run_train(args) -> int:
    retain_freed_memory()  # a training job: keep freed activations' memory (see there)
    use_threads(args.threads)
    store = FeatureStore.open(args.store)
    gallery = None
    if args.gallery:
        m = read_manifest(args.gallery)
        gallery = np.stack([m.lat, m.lon], axis=1)
    heads_config = {"visual_dim": args.visual_dim, "hidden": args.hidden, "gps_head": args.gps_head}
    if args.text_encoder:
        heads_config["text_encoder"] = args.text_encoder
    config = AlignConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        queue_size=args.queue_size,
        text_weight=args.text_weight,
        val_fraction=args.val_fraction,
        seed=args.seed,
    )
    texts = read_texts(args.texts, store.ids) if args.texts else None
    _, metrics = train_heads(
        store, args.out, config, heads_config, gallery_coords=gallery, device=args.device, texts=texts,
        overwrite=args.overwrite,
    )  # fmt: skip
    _print_metrics(metrics)
    print(f"heads and metrics.json written to {args.out}")
    return 0


def run_apply(args) -> int:
    use_threads(args.threads)
    store = apply_heads(
        AlignHeads.load(args.heads, resolve_device(args.device)),
        FeatureStore.open(args.store),
        args.batch_size,
    )
    print(store)
    return 0

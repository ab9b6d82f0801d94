"""`geotoken demo`: the whole method on the built-in offline dataset, in one command."""

from __future__ import annotations

import argparse

from geotoken import DTYPES
from geotoken.cli import THREADS_HELP, count
from geotoken.devices import retain_freed_memory
from geotoken.errors import GeoTokenError
from geotoken.model import ARCHS
from geotoken.model import PRESETS as MODEL_PRESETS
from geotoken.pipeline import PRESETS, demo_config, print_summary, run_demo
from geotoken.train.recipes import RECIPES

HELP = "run the whole method offline: dataset, features, alignment, retrieval, training, search, evaluation"

EPILOG = """\
stages are content-hashed folders under --run-dir: a second run reuses every finished stage, and a
changed option redoes only what depends on it. `--fast` is a ~1-minute smoke version (2 cores).

examples:
  geotoken demo
  geotoken demo --fast --run-dir runs/smoke
  geotoken demo --epochs 20 --model-preset small --dataset-size 50000
  geotoken demo --recipe paper --arch authors   # the paper's layers and training recipe, demo sizes
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help=HELP,
        description=HELP,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run-dir", default="runs/demo", help="run folder (default runs/demo)")
    p.add_argument("--fast", action="store_true", help="tiny sizes: a smoke run of every stage")
    p.add_argument("--preset", choices=list(PRESETS), help="named sizes (default demo; --fast = fast)")
    p.add_argument("--dataset-size", type=int, help="EarthViews gallery views")
    p.add_argument("--n-test", type=int, help="views per val / test split")
    p.add_argument("--image-size", type=int, help="EarthViews pixels per side")
    p.add_argument(
        "--train-views",
        type=int,
        help="photo-like training queries per gallery place (default 2; 0: train on gallery views, as on MP16)",
    )
    p.add_argument("--model-preset", choices=list(MODEL_PRESETS), help="GeoToken model size")
    p.add_argument(
        "--arch",
        choices=ARCHS,
        help="model layers: ours (default) or authors (the paper's nn.Transformer layers)",
    )
    p.add_argument(
        "--recipe",
        help=f"training recipe ({', '.join(RECIPES)}, or a YAML file); --epochs, --batch-size (the micro-batch) "
        "and --dtype still apply",
    )
    p.add_argument("--epochs", type=int, help="training epochs")
    p.add_argument("--batch-size", type=int, help="training batch size")
    p.add_argument("--dtype", choices=DTYPES, help="training precision (bf16: autocast; default fp32)")
    p.add_argument("-k", "--k", type=int, help="retrieved neighbours per image")
    p.add_argument("--label-smoothing", type=float, help="training: label smoothing over sibling cells")
    p.add_argument("--drop-near-km", type=float,
                   help="training: a share of queries lose their neighbours within this many km (0: none)")  # fmt: skip
    p.add_argument("--drop-near-share", type=float, help="training: the share of queries --drop-near-km hits")
    p.add_argument("--seed", type=int, help="seed of every random choice (dataset, training, bootstrap)")
    p.add_argument("--threads", type=count, default=0, help=THREADS_HELP)
    p.add_argument("--workers", type=int, help="image-decoding / rendering processes")
    p.add_argument("--no-report", action="store_true", help="skip the HTML report")
    p.set_defaults(func=run)


def run(args) -> int:
    retain_freed_memory()  # a training job: keep freed activations' memory (see there)
    if args.fast and args.preset not in (None, "fast"):
        raise GeoTokenError(
            f"--fast is --preset fast; it contradicts --preset {args.preset} (give one of them)"
        )
    name = args.preset or ("fast" if args.fast else "demo")
    cfg = demo_config(
        name,
        dataset_size=args.dataset_size,
        n_test=args.n_test,
        image_size=args.image_size,
        train_views=args.train_views,
        model_preset=args.model_preset,
        arch=args.arch,
        recipe=args.recipe,
        epochs=args.epochs,
        batch_size=args.batch_size,
        dtype=args.dtype,
        k=args.k,
        label_smoothing=args.label_smoothing,
        drop_near_km=args.drop_near_km,
        drop_near_share=args.drop_near_share,
        seed=args.seed,
        threads=args.threads,
        workers=args.workers,
    )
    summary = run_demo(cfg, args.run_dir, report=not args.no_report)
    print_summary(summary)
    return 0

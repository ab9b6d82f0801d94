"""`geotoken train`: train a GeoToken model on an aligned feature store and its neighbour table."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import warnings
from pathlib import Path

import numpy as np

from geotoken import DTYPES
from geotoken.cli import DEVICE_HELP, THREADS_HELP, count, first_process, use_threads
from geotoken.devices import retain_freed_memory
from geotoken.errors import GeoTokenError
from geotoken.features import FeatureStore
from geotoken.io import read_json
from geotoken.model import ARCHS, PRESETS, ModelConfig, preset
from geotoken.train import SCHEDULES, WEIGHT_DECAY_ON, TrainConfig, TrainData, holdout_rows, train
from geotoken.train.recipes import RECIPES, resolve_train_config

# the training options a recipe may set: flags default to None ("not given") so that defaults < recipe < flags
RECIPE_FLAGS = (
    "epochs", "max_steps", "batch_size", "grad_accum", "effective_batch_size", "lr", "betas", "warmup_steps",
    "schedule", "weight_decay", "weight_decay_on", "grad_clip", "label_smoothing", "drop_near_km",
    "drop_near_share", "dtype", "seed", "checkpoint_every", "val_every", "val_constrain",
)  # fmt: skip


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None: a training flag left out takes the recipe's value or the library's."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a GeoToken model (resumable; DDP under torchrun)",
        description=(
            "Train the retrieval-conditioned encoder-decoder on aligned embeddings (visual/gps/text arrays of a "
            "feature store), a neighbour table and S2 target tokens made from the store's coordinates. "
            "Writes OUT/last (resume point), OUT/best (best validation), OUT/log.jsonl and OUT/tb. "
            "Run several processes with `torchrun --nproc-per-node N -m geotoken train ...`. "
            "Training options: the library's defaults, then --recipe (e.g. paper: the authors' optimizer, schedule "
            "and batch 2048), then the flags given; --print-config shows the result as JSON."
        ),
        formatter_class=_Formatter,
    )
    p.add_argument("--features", help="feature store of the training queries (required to train)")
    p.add_argument(
        "--neighbours", help="neighbour folder of the training queries (index.npy; required to train)"
    )
    p.add_argument(
        "--gallery", help="feature store of the gallery the neighbour rows point into (default: --features)"
    )
    p.add_argument(
        "--val-features", help="feature store of validation queries (default: hold out --val-fraction)"
    )
    p.add_argument(
        "--val-neighbours", help="neighbour folder of the validation queries (into the same gallery)"
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        help="share of training rows held out for validation (default 0.05; not with --val-features). Rows, not "
        "places: where a place has several photos (MP16), the others train, so validation reads high; a split of "
        "other places (--val-features) measures what a test set will",
    )
    p.add_argument("--val-max", type=count, default=2000, help="validate on at most this many rows")
    p.add_argument("-o", "--out", help="output folder (required to train)")
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved model and training configuration as JSON and exit (modalities' dims from "
        "--features if given, else the model's defaults)",
    )
    p.add_argument("--resume", action="store_true", help="continue from OUT/last exactly")
    p.add_argument("--stop-at", type=int, help="end this run after this step (resume later with --resume)")

    mc, tc = ModelConfig, TrainConfig
    m = p.add_argument_group("model")
    m.add_argument("--preset", default="small", choices=list(PRESETS), help="model size")
    m.add_argument("--modalities", default="visual,gps,text", help="comma-separated store arrays to use")
    m.add_argument("-k", "--k", type=int, default=mc.k, help="neighbours per query (0 = no retrieval)")
    m.add_argument("--level", type=int, default=mc.level, help="S2 level of the target cell")
    m.add_argument("--group-size", type=int, default=mc.group, help="child tokens per token (vocabulary 4^g)")
    m.add_argument("--dropout", type=float, help="override the preset's dropout")
    m.add_argument(
        "--arch",
        default=mc.arch,
        choices=ARCHS,
        help="layer design: ours (pre-LN, GELU) or authors (the paper's nn.Transformer layers: post-LN, ReLU, "
        "attention dropout, sinusoidal decoder positions)",
    )
    m.add_argument(
        "--no-neighbour-tokens", action="store_true", help="ablation: neighbours without their tokens"
    )
    m.add_argument("--no-neighbour-embeddings", action="store_true", help="ablation: neighbours' tokens only")

    t = p.add_argument_group("training (defaults: the library's, or the recipe's)")
    t.add_argument(
        "--recipe",
        help=f"named training recipe ({', '.join(RECIPES)}) or a YAML file of TrainConfig fields; flags override it",
    )
    t.add_argument("--epochs", type=int, help=f"default {tc.epochs}")
    t.add_argument(
        "--max-steps", type=int, help="> 0: stop after this many optimizer steps (overrides --epochs)"
    )
    t.add_argument("--batch-size", type=int, help=f"per process and micro-batch (default {tc.batch_size})")
    t.add_argument(
        "--grad-accum",
        type=int,
        help="micro-batches per optimizer step: N give the update of one N times larger",
    )
    t.add_argument(
        "--effective-batch-size",
        type=int,
        help="global batch per optimizer step (batch-size x grad-accum x processes); derives --grad-accum",
    )
    t.add_argument("--lr", type=float, help=f"default {tc.lr}")
    t.add_argument("--betas", type=float, nargs=2, metavar=("B1", "B2"), help=f"AdamW's (default {tc.betas})")
    t.add_argument("--warmup-steps", type=int, help="default: min(100, training steps / 10)")
    t.add_argument("--schedule", choices=SCHEDULES, help="cosine (default) or step: x0.9 per epoch (paper)")
    t.add_argument("--weight-decay", type=float, help=f"default {tc.weight_decay}")
    t.add_argument(
        "--weight-decay-on",
        choices=WEIGHT_DECAY_ON,
        help="decayed parameters: matrices (default) or all (paper)",
    )
    t.add_argument("--grad-clip", type=float, help=f"max gradient norm, 0: off (default {tc.grad_clip})")
    t.add_argument("--label-smoothing", type=float, help=f"default {tc.label_smoothing}")
    t.add_argument("--drop-near-km", type=float,
                   help="> 0: a share of queries lose their neighbours within this many km of their place (the "
                   "spatially disjoint condition); give a deeper --neighbours table than -k (default 0: off)")  # fmt: skip
    t.add_argument("--drop-near-share", type=float,
                   help="the share of queries --drop-near-km applies to (default 0.5)")  # fmt: skip
    t.add_argument("--dtype", choices=DTYPES, help="fp32 (default) or bf16 autocast (GPU or CPU)")
    t.add_argument("--compile", action="store_true", help="torch.compile the model")
    t.add_argument("--seed", type=int, help=f"default {tc.seed}")
    t.add_argument("--checkpoint-every", type=int, help=f"steps (default {tc.checkpoint_every})")
    t.add_argument("--val-every", type=int, help=f"epochs, 0: never (default {tc.val_every})")
    t.add_argument("--val-constrain", action=argparse.BooleanOptionalAction,
                   help="validate with the gallery-constrained greedy decoder (evaluate's +gallery rows; "
                   "default: free greedy, the authors' decoder)")  # fmt: skip
    t.add_argument("--threads", type=count, default=0, help=THREADS_HELP)
    t.add_argument("--device", default="auto", help=DEVICE_HELP)
    t.add_argument("--no-tensorboard", action="store_true")
    p.set_defaults(func=run)


def resolve(args, dims: dict[str, int] | None = None) -> tuple[ModelConfig, TrainConfig]:
    """The model and training configs of a command line: defaults < --recipe < flags."""
    names = [s for s in args.modalities.split(",") if s]
    modalities = dims or {m: ModelConfig().modalities.get(m, 768) for m in names}
    overrides = dict(modalities=modalities, k=args.k, level=args.level, group=args.group_size, arch=args.arch)
    overrides.update(use_neighbour_tokens=not args.no_neighbour_tokens)
    overrides.update(use_neighbour_embeddings=not args.no_neighbour_embeddings)
    if args.dropout is not None:
        overrides["dropout"] = args.dropout
    model_cfg = preset(args.preset, **overrides)
    given = {name: getattr(args, name) for name in RECIPE_FLAGS}
    cfg = resolve_train_config(
        args.recipe, **given, compile=args.compile, tensorboard=not args.no_tensorboard
    )
    return model_cfg, cfg


def run(args) -> int:
    retain_freed_memory()  # a training job: keep freed activations' memory (see there)
    if args.print_config:
        dims = None
        if args.features:
            store = FeatureStore.open(args.features)
            names = [m for m in args.modalities.split(",") if m]
            absent = [m for m in names if m not in store.dims]
            if absent:
                raise GeoTokenError(f"{args.features}: no array(s) {absent} (has {sorted(store.dims)})")
            dims = {m: store.dims[m] for m in names}
        model_cfg, cfg = resolve(args, dims)
        print(
            json.dumps(
                {"model": model_cfg.to_dict(), "train": dataclasses.asdict(cfg), "recipe": args.recipe}
            )
        )
        if dims is None:
            print("modalities' dims are the model's defaults: give --features to read them", file=sys.stderr)
        return 0
    missing = [f"--{n}" for n in ("features", "neighbours", "out") if getattr(args, n) is None]
    if missing:
        raise GeoTokenError(f"training needs {', '.join(missing)} (or --print-config)")
    if args.resume and not (Path(args.out) / "last").exists():
        raise GeoTokenError(f"--resume: {Path(args.out) / 'last'} does not exist (drop --resume to start)")
    use_threads(args.threads)
    names = [s for s in args.modalities.split(",") if s]
    level, group = args.level, args.group_size
    data = TrainData.load(args.features, args.neighbours, args.gallery, names, level, group)
    model_cfg, cfg = resolve(args, {m: data.query[m].shape[1] for m in names})

    if args.val_neighbours and not args.val_features:
        raise GeoTokenError("--val-neighbours is the table of --val-features (give both, or neither)")
    if args.val_features:
        if not args.val_neighbours:
            raise GeoTokenError(
                "--val-features needs --val-neighbours (its neighbour folder into the gallery)"
            )
        if args.val_fraction is not None:
            raise GeoTokenError(
                "--val-fraction holds out training rows; --val-features validates on another store"
            )
        if Path(args.val_features).resolve() == Path(args.features).resolve():
            warnings.warn(
                f"--val-features {args.val_features} is the training store: validation measures memorisation, and "
                "best/ is chosen by it",
                stacklevel=1,
            )
        val = TrainData.load(args.val_features, args.val_neighbours, data.gallery, names, level, group)
        train_rows, val_rows = np.arange(data.rows), np.arange(min(val.rows, args.val_max))
    else:
        val = data
        fraction = 0.05 if args.val_fraction is None else args.val_fraction
        train_rows, val_rows = holdout_rows(data.rows, fraction, args.val_max, cfg.seed)

    sources = {
        "features": args.features,
        "neighbours": args.neighbours,
        "gallery": args.gallery or args.features,
    }
    sources.update(val_features=args.val_features, val_neighbours=args.val_neighbours)
    train(
        model_cfg,
        cfg,
        data,
        args.out,
        train_rows,
        val,
        val_rows,
        args.resume,
        args.device,
        sources,
        args.stop_at,
    )
    if first_process():  # under torchrun, one summary
        print(training_summary(Path(args.out)))
    return 0


def training_summary(out: Path) -> str:
    """What a run left: finished, or stopped early (--stop-at) with where it resumes; the best checkpoint."""
    state = read_json(out / "last" / "state.json")
    step, total, best = state["step"], state.get("total_steps", state["step"]), state.get("best_step")
    kept = f"{out / 'best'} (best validation, step {best})" if best is not None else "no validation yet"
    if step < total:
        return (
            f"stopped at step {step:,} of {total:,}: {kept}; rerun with --resume to go on from {out / 'last'}"
        )
    return f"trained model: {kept} and {out / 'last'} (step {step:,}, the resume point)"

"""`geotoken train`: train a GeoToken model on an aligned feature store and its neighbour table."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from geotoken import DTYPES
from geotoken.errors import GeoTokenError
from geotoken.model import PRESETS, ModelConfig, preset
from geotoken.train import SCHEDULES, TrainConfig, TrainData, holdout_rows, train


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a GeoToken model (resumable; DDP under torchrun)",
        description=(
            "Train the retrieval-conditioned encoder-decoder on aligned embeddings (visual/gps/text arrays of a "
            "feature store), a neighbour table and S2 target tokens made from the store's coordinates. "
            "Writes OUT/last (resume point), OUT/best (best validation), OUT/log.jsonl and OUT/tb. "
            "Run several processes with `torchrun --nproc-per-node N -m geotoken train ...`."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--features", required=True, help="feature store of the training queries")
    p.add_argument("--neighbours", required=True, help="neighbour folder of the training queries (index.npy)")
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
        "--val-fraction", type=float, default=0.05, help="share of training rows held out for validation"
    )
    p.add_argument("--val-max", type=int, default=2000, help="validate on at most this many rows")
    p.add_argument("-o", "--out", required=True, help="output folder")
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
        "--no-neighbour-tokens", action="store_true", help="ablation: neighbours without their tokens"
    )
    m.add_argument("--no-neighbour-embeddings", action="store_true", help="ablation: neighbours' tokens only")

    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, default=tc.epochs)
    t.add_argument(
        "--max-steps",
        type=int,
        default=tc.max_steps,
        help="> 0: stop after this many steps (overrides --epochs)",
    )
    t.add_argument("--batch-size", type=int, default=tc.batch_size, help="per process")
    t.add_argument("--lr", type=float, default=tc.lr)
    t.add_argument("--warmup-steps", type=int, default=tc.warmup_steps)
    t.add_argument("--schedule", default=tc.schedule, choices=SCHEDULES, help="step: x0.9 per epoch (paper)")
    t.add_argument("--weight-decay", type=float, default=tc.weight_decay)
    t.add_argument("--grad-clip", type=float, default=tc.grad_clip)
    t.add_argument("--label-smoothing", type=float, default=tc.label_smoothing)
    t.add_argument("--drop-near-km", type=float, default=tc.drop_near_km,
                   help="> 0: a share of queries lose their neighbours within this many km of their place (the "
                   "spatially disjoint condition); give a deeper --neighbours table than -k")  # fmt: skip
    t.add_argument("--drop-near-share", type=float, default=tc.drop_near_share,
                   help="the share of queries --drop-near-km applies to")  # fmt: skip
    t.add_argument("--dtype", default=tc.dtype, choices=DTYPES, help="bf16 autocast (GPU or CPU)")
    t.add_argument("--compile", action="store_true", help="torch.compile the model")
    t.add_argument("--seed", type=int, default=tc.seed)
    t.add_argument("--checkpoint-every", type=int, default=tc.checkpoint_every, help="steps")
    t.add_argument("--val-every", type=int, default=tc.val_every, help="epochs (0: never)")
    t.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's choice)")
    t.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    t.add_argument("--no-tensorboard", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.resume and not (Path(args.out) / "last").exists():
        raise GeoTokenError(f"--resume: {Path(args.out) / 'last'} does not exist (drop --resume to start)")
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [s for s in args.modalities.split(",") if s]
    level, group = args.level, args.group_size
    data = TrainData.load(args.features, args.neighbours, args.gallery, names, level, group)
    dims = {m: data.query[m].shape[1] for m in names}
    overrides = dict(modalities=dims, k=args.k, level=level, group=group)
    overrides.update(use_neighbour_tokens=not args.no_neighbour_tokens)
    overrides.update(use_neighbour_embeddings=not args.no_neighbour_embeddings)
    if args.dropout is not None:
        overrides["dropout"] = args.dropout
    model_cfg = preset(args.preset, **overrides)
    cfg = TrainConfig(
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        schedule=args.schedule,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        batch_size=args.batch_size,
        epochs=args.epochs,
        max_steps=args.max_steps,
        label_smoothing=args.label_smoothing,
        drop_near_km=args.drop_near_km,
        drop_near_share=args.drop_near_share,
        dtype=args.dtype,
        compile=args.compile,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        val_every=args.val_every,
        tensorboard=not args.no_tensorboard,
    )

    if args.val_features:
        if not args.val_neighbours:
            raise GeoTokenError(
                "--val-features needs --val-neighbours (its neighbour folder into the gallery)"
            )
        val = TrainData.load(args.val_features, args.val_neighbours, data.gallery, names, level, group)
        train_rows, val_rows = np.arange(data.rows), np.arange(min(val.rows, args.val_max))
    else:
        val = data
        train_rows, val_rows = holdout_rows(data.rows, args.val_fraction, args.val_max, args.seed)

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
    print(f"trained model: {args.out}/best (best validation) and {args.out}/last (resume point)")
    return 0

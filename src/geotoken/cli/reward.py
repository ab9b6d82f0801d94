"""`geotoken train-reward`: train the reward scorer of a bundle on its training images."""

from __future__ import annotations

import argparse
import json

from geotoken.cli import DEVICE_HELP, THREADS_HELP, count, use_threads
from geotoken.devices import retain_freed_memory
from geotoken.fit import train_bundle_reward
from geotoken.predict import Geolocator
from geotoken.search.options import sampling_temperature
from geotoken.search.reward import REWARD_KINDS, RewardConfig


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train-reward",
        help="train the learned candidate scorer (select=reward) of a bundle",
        description="Train the reward scorer: the bundle's GeoToken memory + a candidate's tokens -> "
        "P(candidate within --radius-km), by a head over the frozen model (--reward-kind head) or by a "
        "fine-tuned copy of the whole model (--reward-kind decoder, the authors'). Candidates are beams, "
        "samples and retrieved cells of training images, whose "
        "neighbour table must exclude each image itself (the paper uses the training split; a split the model "
        "was not trained on shows the scorer the model's real mistakes). Writes BUNDLE/reward/ and registers "
        "it in bundle.json; prints held-out accuracy of reward vs logp selection.",
    )
    p.add_argument("--model", required=True, metavar="BUNDLE", help="model bundle folder")
    p.add_argument(
        "--queries", required=True, metavar="STORE", help="feature store of training images (aligned)"
    )
    p.add_argument(
        "--neighbours", required=True, metavar="TABLE", help="their neighbour table (self excluded)"
    )
    p.add_argument(
        "--reward-kind",
        choices=REWARD_KINDS,
        default=RewardConfig.kind,
        help="head: a small head over the frozen model's memory (beams, samples and retrieved cells); "
        "decoder: the authors' scorer, the whole GeoToken model fine-tuned with a 2-bin head on its last "
        "decoder state over a candidate (10 samples at T 0.7); default %(default)s",
    )
    p.add_argument(
        "--radius-km", type=float, default=RewardConfig.radius_km, help="what counts as a good candidate (km)"
    )
    p.add_argument(
        "--epochs", type=int, help="passes over the training images (default: per kind, head 8, decoder 2)"
    )
    p.add_argument("--max-steps", type=int, default=RewardConfig.max_steps,
                   help="optimiser steps at most (default 0: the epochs decide)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=RewardConfig.batch_size, help="images per step")
    p.add_argument("--lr", type=float, help="learning rate (default: per kind, head 1e-3, decoder 5e-5)")
    p.add_argument(
        "--max-images", type=int, default=RewardConfig.max_images, help="random subset of training images"
    )
    p.add_argument("--beam-width", type=int, help="beam candidates per image (default: head 5, decoder 0)")
    p.add_argument("--num-samples", type=int, help="sampled candidates per image (default 10)")
    p.add_argument("--temperature", type=sampling_temperature, metavar="T",
                   help="sampling temperature of the candidates, a number or 'paper' (0.7); default: head 1, "
                   "decoder 0.7")  # fmt: skip
    p.add_argument("--retrieved", type=int,
                   help="retrieved neighbours' cells per image, at most k (default: head 5, decoder 0)")  # fmt: skip
    p.add_argument(
        "--constrain",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="decode the training candidates under the gallery-prefix constraint, or freely with "
        "--no-constrain (default: the bundle's)",
    )
    p.add_argument("--seed", type=int, default=RewardConfig.seed)
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--threads", type=count, default=0, help=THREADS_HELP)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    use_threads(args.threads)
    retain_freed_memory()  # a training job: keep freed activations' memory (see there)
    cfg = RewardConfig(
        kind=args.reward_kind,
        radius_km=args.radius_km,
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        max_images=args.max_images,
        beam_width=args.beam_width,
        num_samples=args.num_samples,
        temperature=args.temperature,
        retrieved=args.retrieved,
        constrain=args.constrain,
        seed=args.seed,
    )
    geo = Geolocator.from_bundle(args.model, device=args.device)
    metrics = train_bundle_reward(geo, args.queries, args.neighbours, cfg)
    print(json.dumps(metrics, indent=2))
    return 0

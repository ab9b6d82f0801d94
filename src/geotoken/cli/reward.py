"""`geotoken train-reward`: train the reward scorer of a bundle on its training images."""

from __future__ import annotations

import argparse
import json

from geotoken.fit import train_bundle_reward
from geotoken.predict import Geolocator
from geotoken.search.reward import RewardConfig


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train-reward",
        help="train the learned candidate scorer (select=reward) of a bundle",
        description="Train the reward scorer: the bundle's frozen GeoToken memory + a candidate's tokens -> "
        "P(candidate within --radius-km). Candidates are beams and samples of training images, whose "
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
        "--radius-km", type=float, default=RewardConfig.radius_km, help="what counts as a good candidate (km)"
    )
    p.add_argument("--epochs", type=int, default=RewardConfig.epochs)
    p.add_argument(
        "--max-images", type=int, default=RewardConfig.max_images, help="random subset of training images"
    )
    p.add_argument(
        "--beam-width", type=int, default=RewardConfig.beam_width, help="beam candidates per image"
    )
    p.add_argument(
        "--num-samples", type=int, default=RewardConfig.num_samples, help="sampled candidates per image"
    )
    p.add_argument(
        "--retrieved",
        type=int,
        default=RewardConfig.retrieved,
        help="retrieved neighbours' cells per image (at most k)",
    )
    p.add_argument("--seed", type=int, default=RewardConfig.seed)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = RewardConfig(
        radius_km=args.radius_km,
        epochs=args.epochs,
        max_images=args.max_images,
        beam_width=args.beam_width,
        num_samples=args.num_samples,
        retrieved=args.retrieved,
        seed=args.seed,
    )
    geo = Geolocator.from_bundle(args.model, device=args.device)
    metrics = train_bundle_reward(geo, args.queries, args.neighbours, cfg)
    print(json.dumps(metrics, indent=2))
    return 0

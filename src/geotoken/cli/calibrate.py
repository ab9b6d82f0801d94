"""`geotoken calibrate`: fit the confidence temperatures of a bundle on a validation split."""

from __future__ import annotations

import argparse
import json

from geotoken.cli import DEVICE_HELP, THREADS_HELP, count, use_threads
from geotoken.fit import CALIBRATION_SELECTORS, calibrate_bundle
from geotoken.predict import Geolocator
from geotoken.search import LOGP_KINDS, STRATEGIES
from geotoken.search.calibration import RADII_KM
from geotoken.search.options import PAPER_TEMPERATURE, sampling_temperature


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "calibrate",
        help="fit calibrated confidences (within 25/200/750 km, per level) on a validation split",
        description="Decode and select on validation images, fit one temperature per event (answer within "
        "25 / 200 / 750 km, prefix correct at each token level), write BUNDLE/calibration.json, register it "
        "in bundle.json, and print the expected calibration error before and after (on the same images: "
        "report held-out figures with `geotoken evaluate`).",
    )
    p.add_argument("--model", required=True, metavar="BUNDLE", help="model bundle folder")
    p.add_argument(
        "--queries", required=True, metavar="STORE", help="feature store of validation images (aligned)"
    )
    p.add_argument(
        "--neighbours", metavar="TABLE", help="their neighbour table (default: search the gallery index)"
    )
    p.add_argument(
        "--strategy",
        choices=STRATEGIES,
        help="decoding (default: the bundle's)",
    )
    p.add_argument("--select", choices=CALIBRATION_SELECTORS, help="selector (default: the bundle's)")
    p.add_argument(
        "--constrain",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="decode only cells that occur in the gallery, or freely with --no-constrain (default: the bundle's)",
    )
    p.add_argument("--temperature", type=sampling_temperature, metavar="T",
                   help=f"sampling temperature, a number or 'paper' ({PAPER_TEMPERATURE}, the authors'; "
                   "default: the bundle's)")  # fmt: skip
    p.add_argument("--logp-kind", choices=LOGP_KINDS,
                   help="logp selection by the model's own (t1) or the temperature-scaled log-probability "
                   "(scaled, the authors'); default: the bundle's")  # fmt: skip
    p.add_argument("--radii-km", type=float, nargs="+", default=list(RADII_KM), help="the 'within X km' events to calibrate (default 25 200 750); the bundle's probability_within_km, "
                   "the probability predict reports first, is always one of them")  # fmt: skip
    p.add_argument("--plot", metavar="PNG", help="also write a reliability plot here")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--threads", type=count, default=0, help=THREADS_HELP)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    use_threads(args.threads)
    geo = Geolocator.from_bundle(args.model, device=args.device)
    report = calibrate_bundle(
        geo,
        args.queries,
        args.neighbours,
        args.strategy,
        args.select,
        args.radii_km,
        plot=args.plot,
        constrain=args.constrain,
        temperature=args.temperature,
        logp_kind=args.logp_kind,
    )
    print(json.dumps(report, indent=2))
    return 0

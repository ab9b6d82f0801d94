"""`geotoken bundle`: gather a trained model and the stages it reads into one folder for predict / serve."""

from __future__ import annotations

import argparse

from geotoken.bundle import assemble_bundle

HELP = "assemble a model bundle (backbone, alignment heads, gallery + index, model) for predict / serve"

EPILOG = """\
the backbone is the one recorded in the gallery store; the query embedding is the one the index was built
on. Add a reward scorer and calibrated confidences afterwards with `geotoken train-reward` and
`geotoken calibrate`.

example:
  geotoken bundle --model model/best --align align/ --gallery feats/mp16 --index index/ -o bundle/
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bundle",
        help=HELP,
        description=HELP,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="trained model folder (model.safetensors + config.json)")
    p.add_argument("--align", required=True, help="alignment heads folder (`geotoken align train -o`)")
    p.add_argument("--gallery", required=True, help="aligned feature store of the gallery")
    p.add_argument(
        "--index", required=True, help="FAISS index folder over that gallery (`geotoken index build`)"
    )
    p.add_argument("-o", "--out", required=True, help="bundle folder to write")
    p.set_defaults(func=run)


def run(args) -> int:
    out = assemble_bundle(
        args.out, model=args.model, align=args.align, gallery=args.gallery, index=args.index
    )
    print(f"bundle written to {out}")
    return 0

"""`geotoken bundle`: gather a trained model and the stages it reads into one folder for predict / serve."""

from __future__ import annotations

import argparse

from geotoken.bundle import CardInfo, assemble_bundle, push_to_hub

HELP = "assemble a model bundle (backbone, alignment heads, gallery + index, model) for predict / serve"

EPILOG = """\
the backbone is the one recorded in the gallery store; the query embedding is the one the index was built
on. Add a reward scorer and calibrated confidences afterwards with `geotoken train-reward` and
`geotoken calibrate`. The bundle carries its model card (README.md); --push-to-hub uploads the folder to a
Hugging Face Hub model repo (logged in with `hf auth login` or HF_TOKEN), from where
`geotoken predict --model ORG/NAME` and `Geolocator.from_pretrained("ORG/NAME")` load it.

example:
  geotoken bundle --model model/best --align align/ --gallery feats/mp16 --index index/ -o bundle/
  geotoken bundle --model model/best --align align/ --gallery feats/mp16 --index index/ -o b/ --link-gallery
  geotoken bundle ... -o bundle/ --license mit --dataset mp16 --push-to-hub me/geotoken-mp16
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
    p.add_argument(
        "--link-gallery",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="refer to the --gallery store where it is (relative and absolute path) instead of copying it "
        "(MP16's is ~17 GB); such a bundle only works where that store is, and cannot be pushed to the Hub "
        "(default: copy)",
    )
    p.add_argument("--license", default="other", help="the model card's license id (default other)")
    p.add_argument(
        "--dataset",
        action="append",
        default=[],
        help="a dataset it was trained on, for the model card (repeatable)",
    )
    p.add_argument("--evaluation", metavar="MD", help="a Markdown table for the model card (e.g. metrics.md)")
    p.add_argument(
        "--push-to-hub", metavar="REPO", help="then upload it to this Hugging Face Hub repo (ORG/NAME)"
    )
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    p.set_defaults(func=run)


def run(args) -> int:
    evaluation = None
    if args.evaluation:
        with open(args.evaluation, encoding="utf-8") as f:
            evaluation = f.read()
    card = CardInfo(license=args.license, datasets=args.dataset, evaluation=evaluation)
    out = assemble_bundle(
        args.out,
        model=args.model,
        align=args.align,
        gallery=args.gallery,
        index=args.index,
        card=card,
        link_gallery=args.link_gallery,
    )
    print(f"bundle written to {out}")
    if args.push_to_hub:
        url = push_to_hub(out, args.push_to_hub, private=args.private or None)
        print(f"pushed to https://huggingface.co/{args.push_to_hub} ({url})")
    return 0

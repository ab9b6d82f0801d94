"""`geotoken bundle`: gather a trained model and the stages it reads into one folder for predict / serve;
`geotoken bundle push`: upload an existing bundle folder to the Hugging Face Hub."""

from __future__ import annotations

import argparse

from geotoken.bundle import CardInfo, assemble_bundle, check_repo_id, push_to_hub
from geotoken.errors import GeoTokenError

HELP = "assemble a model bundle (backbone, alignment heads, gallery + index, model) for predict / serve"
PUSH_HELP = "upload a bundle folder to a Hugging Face Hub model repo (e.g. after calibrate / train-reward)"

EPILOG = """\
the backbone is the one recorded in the gallery store; the query embedding is the one the index was built
on. Add a reward scorer and calibrated confidences afterwards with `geotoken train-reward` and
`geotoken calibrate`. The bundle carries its model card (README.md); --push-to-hub uploads it to a
Hugging Face Hub model repo (logged in with `hf auth login` or HF_TOKEN), from where
`geotoken predict --model ORG/NAME` and `Geolocator.from_pretrained("ORG/NAME")` load it;
`geotoken bundle push DIR ORG/NAME` uploads a bundle written before (calibrated, with a reward scorer).

example:
  geotoken bundle --model model/best --align align/ --gallery feats/mp16 --index index/ -o bundle/
  geotoken bundle --model model/best --align align/ --gallery feats/mp16 --index index/ -o b/ --link-gallery
  geotoken bundle ... -o bundle/ --license mit --dataset mp16 --push-to-hub me/geotoken-mp16
  geotoken bundle push bundle/ me/geotoken-mp16 --revision dev
"""

USAGE = """
  geotoken bundle --model MODEL --align ALIGN --gallery GALLERY --index INDEX -o OUT [options]
  geotoken bundle push BUNDLE REPO [--revision R] [--private] [--commit-message M]"""
ASSEMBLE = {
    "model": "--model",
    "align": "--align",
    "gallery": "--gallery",
    "index": "--index",
    "out": "-o/--out",
}


def add_push_options(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """`push_to_hub`'s options (`prefix`: the flag that asks for a push, named in their help)."""
    p.add_argument("--revision", help=f"{prefix}the branch to commit to (created if missing; default main)")
    p.add_argument("--private", action="store_true", help=f"{prefix}create the repo private")
    p.add_argument("--commit-message", help=f"{prefix}the commit's message")
    p.add_argument(
        "--allow-local-backbone",
        action="store_true",
        help=f"{prefix}push a bundle whose CLIP backbone is a local folder (its users pass --clip)",
    )


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bundle",
        help=HELP,
        description=HELP,
        usage=USAGE,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # required to assemble, which `geotoken bundle push` does not do (checked in `run`)
    p.add_argument("--model", help="trained model folder (model.safetensors + config.json)")
    p.add_argument("--align", help="alignment heads folder (`geotoken align train -o`)")
    p.add_argument("--gallery", help="aligned feature store of the gallery")
    p.add_argument("--index", help="FAISS index folder over that gallery (`geotoken index build`)")
    p.add_argument("-o", "--out", help="bundle folder to write")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a bundle already in --out (its calibration and reward scorer go with it)")  # fmt: skip
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
    add_push_options(p, "with --push-to-hub: ")
    p.set_defaults(func=run)
    commands = p.add_subparsers(dest="bundle_command", metavar="{push}")
    push = commands.add_parser("push", help=PUSH_HELP, description=PUSH_HELP)
    push.add_argument("bundle", help="bundle folder (has bundle.json)")
    push.add_argument("repo", help="Hugging Face Hub model repo (ORG/NAME), created if missing")
    add_push_options(push)
    push.set_defaults(func=run_push)


def push(folder, repo: str, args) -> None:
    url = push_to_hub(
        folder,
        repo,
        revision=args.revision,
        private=args.private or None,
        commit_message=args.commit_message,
        allow_local_backbone=args.allow_local_backbone,
    )
    print(f"pushed to https://huggingface.co/{repo} ({url})")


def run(args) -> int:
    missing = [flag for dest, flag in ASSEMBLE.items() if getattr(args, dest) is None]
    if missing:
        raise GeoTokenError(
            f"to assemble a bundle pass {', '.join(missing)} (to upload one: geotoken bundle push DIR ORG/NAME)"
        )
    card = CardInfo(license=args.license, datasets=args.dataset)  # checked before any work, like the repo
    if args.push_to_hub:
        check_repo_id(args.push_to_hub)
        if args.link_gallery:
            raise GeoTokenError(
                "--link-gallery with --push-to-hub: a linked gallery stays on this machine and would not be "
                "uploaded; drop --link-gallery (copy the gallery) to push the bundle"
            )
    if args.evaluation:
        with open(args.evaluation, encoding="utf-8") as f:
            card.evaluation = f.read()
    out = assemble_bundle(
        args.out,
        model=args.model,
        align=args.align,
        gallery=args.gallery,
        index=args.index,
        card=card,
        link_gallery=args.link_gallery,
        overwrite=args.overwrite,
    )
    print(f"bundle written to {out}")
    if args.push_to_hub:
        push(out, args.push_to_hub, args)
    return 0


def run_push(args) -> int:
    push(args.bundle, args.repo, args)
    return 0

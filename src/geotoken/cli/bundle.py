"""`geotoken bundle`: gather a trained model and the stages it reads into one folder for predict / serve."""

from __future__ import annotations

import argparse

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
    from geotoken.align import AlignHeads
    from geotoken.errors import GeoTokenError
    from geotoken.features import FeatureStore
    from geotoken.model import GeoToken
    from geotoken.predict import save_bundle
    from geotoken.retrieval import NeighbourIndex

    gallery = FeatureStore.open(args.gallery)
    backbone = gallery.header.get("backbone")
    if not backbone:
        raise GeoTokenError(
            f"{args.gallery}: store.json has no field 'backbone' (was it written by `geotoken embed`?)"
        )
    index = NeighbourIndex.load(args.index)
    embedding = index.meta.get("embedding")
    if not embedding:
        raise GeoTokenError(f"{args.index}: index.json has no field 'embedding'")
    if index.meta.get("gallery_rows") not in (None, gallery.rows):
        raise GeoTokenError(
            f"{args.index}: built over {index.meta['gallery_rows']} gallery rows, {args.gallery} has {gallery.rows}"
        )
    out = save_bundle(
        args.out,
        model=GeoToken.load(args.model),
        backbone_config=backbone,
        heads=AlignHeads.load(args.align),
        gallery_store=gallery,
        index=index,
        query_modalities=embedding.split("+"),
    )
    print(f"bundle written to {out}")
    return 0

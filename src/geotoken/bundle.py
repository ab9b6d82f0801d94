"""The bundle: one folder with everything `Geolocator` loads, and the search options saved with it.

A bundle folder (`save_bundle` writes it, `bundle.json` last so a half-written bundle never loads):

    bundle.json        names everything below, relative to the folder, and the default search options
    backbone.json      the image backbone's config (`geotoken.encoders.load_backbone(**config)`)
    align/             `geotoken.align.AlignHeads`
    gallery/           feature store of the gallery's aligned embeddings + coords.npy + tokens.npy
    gallery/index/     `geotoken.retrieval.NeighbourIndex` over the query modalities of the gallery
    model/             `geotoken.model.GeoToken`
    calibration.json   optional `geotoken.search.calibration.Calibration`
    reward/            optional `geotoken.search.reward.RewardScorer`
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from geotoken.align import AlignHeads
from geotoken.errors import GeoTokenError
from geotoken.features import FeatureStore
from geotoken.io import read_json, write_json
from geotoken.model import GeoToken
from geotoken.retrieval import NeighbourIndex
from geotoken.s2 import latlon_to_tokens
from geotoken.search.mllm import MLLMConfig

BUNDLE_FORMAT = "geotoken.bundle"
BUNDLE_VERSION = 1
_RENAMED = {"width": "beam_width", "samples": "num_samples"}  # search option names before one vocabulary
PARTS = ("backbone", "align", "gallery", "index", "model", "calibration", "reward")


@dataclass
class SearchOptions:
    """How to decode and select. Defaults: beam 5, gallery-constrained, most likely candidate."""

    strategy: str = "beam"  # one of geotoken.search.STRATEGIES
    beam_width: int = 5
    num_samples: int = 10  # samples per image
    retrieved: int = 5  # sample+retrieval: neighbours' cells added to the pool
    temperature: float = 1.0
    sample_top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int = 0
    constrain: bool = True  # only cells that occur in the gallery
    select: str = "logp"  # one of geotoken.search.SELECTORS
    radius_km: float = 200.0  # consensus radius
    medoid: bool = False
    batch_size: int = 32
    dtype: str = "fp32"  # matmul precision of the model; "bf16" is ~2x faster on CPUs with AVX-512 BF16, GPUs
    mllm: MLLMConfig = field(default_factory=MLLMConfig)

    def replace(self, **changes) -> SearchOptions:
        """A copy with `changes` applied; None values are ignored; unknown names are an error."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise GeoTokenError(f"unknown search option(s) {unknown}; known: {sorted(names)}")
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["mllm"] = {k: v for k, v in d["mllm"].items() if k != "api_key"}  # never write secrets
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SearchOptions:
        d = {_RENAMED.get(k, k): v for k, v in d.items()}  # bundles written before the rename
        mllm = MLLMConfig(**d.pop("mllm", {}))
        return cls().replace(**d, mllm=mllm)


def read_bundle(root: str | os.PathLike) -> dict:
    """bundle.json of a bundle folder, checked: its format, required fields, and that every part it names exists."""
    root = Path(root)
    path = root / "bundle.json"
    if not path.is_file():
        raise GeoTokenError(f"{root}: not a model bundle (no bundle.json); `geotoken demo` writes one")
    spec = read_json(path)
    if spec.get("format") != BUNDLE_FORMAT:
        raise GeoTokenError(f"{path}: field 'format' is {spec.get('format')!r}, expected {BUNDLE_FORMAT!r}")
    for key in ("backbone", "align", "gallery", "index", "model", "query_modalities"):
        if key not in spec:
            raise GeoTokenError(f"{path}: missing field {key!r}")
    for key in PARTS:
        if spec.get(key) and not (root / spec[key]).exists():
            raise GeoTokenError(f"{path}: field {key!r} names {spec[key]!r}, which does not exist in {root}")
    return spec


def save_bundle(
    directory: str | os.PathLike,
    *,
    model,
    backbone_config: dict[str, Any],
    heads,
    gallery_store,
    index,
    query_modalities: list[str],
    calibration=None,
    reward=None,
    options: SearchOptions | None = None,
    chunk_rows: int = 65536,
) -> Path:
    """Write a self-contained bundle that `Geolocator.from_bundle` loads.

    gallery_store: a `geotoken.features.FeatureStore` with the gallery's aligned arrays (those the model
    reads are copied) and coordinates; its tokens are computed here at the model's level and group.
    index: a `NeighbourIndex` over `query_modalities` of that gallery (concatenated in this order).
    """
    if index.meta.get("gallery_rows") not in (None, gallery_store.rows):
        raise GeoTokenError(
            f"index built over {index.meta['gallery_rows']} gallery rows, {gallery_store.root} has {gallery_store.rows}"
        )
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    (root / "bundle.json").unlink(missing_ok=True)  # the folder is not a bundle until it is complete
    cfg = model.cfg
    names = [m for m in cfg.modalities if m in gallery_store]
    missing = sorted(set(cfg.modalities) - set(names))
    if missing and cfg.k and cfg.use_neighbour_embeddings:
        raise GeoTokenError(f"{gallery_store.root}: no aligned array(s) {missing} for the model's neighbours")
    coords = np.asarray(gallery_store.coords, dtype=np.float64)
    gallery = FeatureStore.create(
        root / "gallery",
        gallery_store.ids,
        coords,
        {m: gallery_store.dims[m] for m in names},
        source=str(gallery_store.root),
    )
    for m in names:
        src = gallery_store[m]
        with gallery.writer(m) as w:
            for s in range(0, len(src), chunk_rows):
                w.write(s, np.asarray(src[s : s + chunk_rows]))
        gallery.mark_complete(m)
    tokens = latlon_to_tokens(coords[:, 0], coords[:, 1], cfg.level, cfg.group)
    np.save(root / "gallery" / "tokens.npy", tokens)
    index.save(root / "gallery" / "index")
    heads.save(root / "align")
    model.save(root / "model")
    write_json(root / "backbone.json", backbone_config)
    spec = {
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        "backbone": "backbone.json",
        "align": "align",
        "gallery": "gallery",
        "index": "gallery/index",
        "model": "model",
        "query_modalities": list(query_modalities),
        "calibration": None,
        "reward": None,
        "probability_radius_km": 200.0,
        "search": (options or SearchOptions()).to_dict(),
    }
    if calibration is not None:
        calibration.save(root / "calibration.json")
        spec["calibration"] = "calibration.json"
    if reward is not None:
        reward.save(root / "reward")
        spec["reward"] = "reward"
    write_json(root / "bundle.json", spec)
    return root


def assemble_bundle(
    directory: str | os.PathLike,
    *,
    model: str | os.PathLike,
    align: str | os.PathLike,
    gallery: str | os.PathLike,
    index: str | os.PathLike,
    options: SearchOptions | None = None,
) -> Path:
    """`save_bundle` from the folders the stages wrote: a model, alignment heads, the gallery's aligned
    store (its backbone is the one recorded there) and the index over it (its query embedding is the one
    the index was built on)."""
    store = FeatureStore.open(gallery)
    backbone = store.header.get("backbone")
    if not backbone:
        raise GeoTokenError(
            f"{gallery}: store.json has no field 'backbone' (was it written by `geotoken embed`?)"
        )
    idx = NeighbourIndex.load(index)
    embedding = idx.meta.get("embedding")
    if not embedding:
        raise GeoTokenError(f"{index}: index.json has no field 'embedding'")
    return save_bundle(
        directory,
        model=GeoToken.load(model),
        backbone_config=backbone,
        heads=AlignHeads.load(align),
        gallery_store=store,
        index=idx,
        query_modalities=embedding.split("+"),
        options=options,
    )


def set_bundle_part(directory: str | os.PathLike, key: str, relative_path: str | None) -> None:
    """Point bundle.json's `key` (e.g. "reward", "calibration") at a file or folder inside the bundle."""
    root = Path(directory)
    if key not in PARTS:
        raise GeoTokenError(f"bundle part {key!r}: choose one of {', '.join(PARTS)}")
    spec = read_bundle(root)
    if relative_path is not None and not (root / relative_path).exists():
        raise GeoTokenError(f"{root / relative_path} does not exist")
    spec[key] = relative_path
    write_json(root / "bundle.json", spec)

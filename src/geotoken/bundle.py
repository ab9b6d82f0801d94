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
    README.md          the model card (YAML front matter for the Hugging Face Hub), rewritten whenever bundle.json is

With `link_gallery=True` (`geotoken bundle --link-gallery`) the bundle refers to the gallery's aligned store
where it already is instead of copying it (MP16's is ~17 GB): `gallery` is then that store's path relative
to the bundle folder and `gallery_absolute` its absolute path (used when the relative one does not resolve,
e.g. after the bundle folder alone was moved); the tokens go to `gallery_tokens.npy` and the index to
`index/` in the bundle; loading checks the store still has the rows the bundle was made with. Copying stays
the default: only a copied bundle travels (`push_to_hub` refuses a linked one).

`bundle.json` also records where the image backbone's weights come from (`backbone_source`: a hub id or a
local folder for CLIP, the installed package for EfficientNet-Lite0). Bundles travel through the Hugging Face
Hub: `push_to_hub(directory, repo_id)` uploads one (the files `bundle_files` lists and a card naming the repo),
`hub_snapshot(repo_id)` fetches one into the local hub cache (`huggingface_hub.snapshot_download`: its cache,
`HF_HUB_OFFLINE` honoured). A copied bundle records no path of the machine that built it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from geotoken.align import AlignHeads
from geotoken.encoders.backbones import backbone_source
from geotoken.encoders.base import clip_spelled
from geotoken.errors import GeoTokenError
from geotoken.features import FeatureStore
from geotoken.io import (
    atomic_dir,
    atomic_open,
    atomic_path,
    is_whole,
    read_json,
    write_json,
)
from geotoken.model import GeoToken, ModelConfig
from geotoken.retrieval import NeighbourIndex
from geotoken.s2 import latlon_to_tokens
from geotoken.search.options import SearchOptions, describe_search

BUNDLE_FORMAT = "geotoken.bundle"
BUNDLE_VERSION = 1
PARTS = ("backbone", "align", "gallery", "index", "model", "calibration", "reward")
CARD = "README.md"
CARD_REPO_PLACEHOLDER = "ORG/NAME"  # the card's usage lines; `push_to_hub` fills in the repo id
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # a Hugging Face Hub repo id, ORG/NAME
LICENSE_ID = re.compile(r"[a-z0-9][a-z0-9.+-]*")  # the form of the Hub's license ids (mit, cc-by-4.0, ...)
RUNTIME_KNOBS = ("precision", "runtime", "attention")  # how a backbone runs, not what its features are


@dataclass
class CardInfo:
    """What the model card says beyond what the bundle itself records (`save_bundle(card=...)`)."""

    license: str = "other"  # a Hugging Face license id (mit, apache-2.0, cc-by-4.0, ...)
    datasets: list[str] = field(default_factory=list)  # training / gallery data, e.g. hub dataset ids
    tags: list[str] = field(default_factory=list)  # added to geotoken's own tags
    evaluation: str | None = None  # a Markdown table, e.g. the metrics.md of `geotoken evaluate`
    description: str = ""  # a paragraph under the title

    def __post_init__(self) -> None:
        # the Hub rejects a card with another license at push time, after the bundle was written
        if not LICENSE_ID.fullmatch(str(self.license)):
            raise GeoTokenError(
                f"license {self.license!r}: a Hugging Face license id in lower case, e.g. mit, apache-2.0, "
                "cc-by-4.0, other"
            )


def is_repo_id(name: str) -> bool:
    """Whether `name` has the form of a Hugging Face Hub repo id (ORG/NAME; no path of more parts)."""
    return bool(REPO_ID.fullmatch(str(name))) and ".." not in str(name)


def check_repo_id(repo_id: str) -> None:
    """Refuse a name the Hub would refuse, before any work (a bundle written, files hashed for upload)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise GeoTokenError(f"{repo_id!r} is not a Hugging Face Hub repo id (ORG/NAME): {exc}") from None
    if not is_repo_id(repo_id):
        raise GeoTokenError(f"{repo_id!r} is not a Hugging Face Hub repo id (ORG/NAME)")


def hub_errors() -> tuple[type[Exception], ...]:
    """What huggingface_hub raises when the Hub refuses or cannot be reached: its HTTP errors, offline
    mode and network failures (OSError), bad names, and its HTTP library's own errors (httpx's connection
    errors are no OSError; `huggingface_hub.errors.HTTPError` is that library's base class)."""
    from huggingface_hub import errors

    return (errors.HfHubHTTPError, errors.HFValidationError, errors.HTTPError, OSError)


def bundle_backbone_config(root: str | os.PathLike, spec: dict, clip: str | None = None) -> dict[str, Any]:
    """The backbone config to load a bundle with: a CLIP folder recorded at save time is found by its
    absolute path (from any working directory); `clip` (a folder or hub id) replaces the recorded one."""
    root = Path(root)
    config = read_json(root / spec["backbone"])
    if not isinstance(config, dict) or "name" not in config:
        raise GeoTokenError(
            f"{root / spec['backbone']}: a backbone description is a JSON object with 'name' (and its options)"
        )
    if clip is not None:
        if config.get("name") != "clip":
            raise GeoTokenError(
                f"{root}: its backbone is {config.get('name')!r}, not clip; drop the clip option"
            )
        return {**clip_spelled(config), "clip": str(clip)}
    config = clip_spelled(config)
    source = spec.get("backbone_source") or {}
    if source.get("kind") == "folder" and not Path(config.get("clip", "")).is_dir():
        if not Path(source["path"]).is_dir():
            raise GeoTokenError(
                f"{root}: its CLIP backbone is the local folder {source['path']}, which does not exist here; "
                "pass the CLIP folder or hub id it was built with (clip=..., --clip)"
            )
        config = {**config, "clip": source["path"]}
    return config


def _yaml_list(values) -> list[str]:
    return list(dict.fromkeys(str(v) for v in values if str(v)))  # unique, in order


def model_card(
    spec: dict,
    backbone_config: dict[str, Any],
    model_cfg,
    gallery_rows: int,
    card: CardInfo,
    repo_id: str = CARD_REPO_PLACEHOLDER,
) -> str:
    """README.md of a bundle: YAML front matter for the Hub, then what it is, how to use it (loading
    `repo_id`), its evaluation."""
    source = backbone_source(backbone_config)
    meta: dict[str, Any] = {
        "library_name": "geotoken",
        "license": card.license,
        "pipeline_tag": "other",  # the Hub has no geolocation task
        "tags": _yaml_list(["geotoken", "image-geolocalization", "geolocation", "s2-cells", *card.tags]),
    }
    if card.datasets:
        meta["datasets"] = _yaml_list(card.datasets)
    if source["kind"] == "hub":
        meta["base_model"] = source["repo_id"]
    where = {"hub": f"hub: {source.get('repo_id')}", "folder": "a local folder", "package": "its pip package"}
    search = spec.get("search", {})
    rows = [
        ("image backbone", f"{backbone_config.get('name')} ({where[source['kind']]})"),
        ("query embedding", " + ".join(spec["query_modalities"])),
        ("gallery", f"{gallery_rows:,} located images"),
        (
            "model",
            f"S2 level {model_cfg.level}, {model_cfg.group} levels per token, {model_cfg.k} neighbours",
        ),
        (
            "default search",
            f"{describe_search(search)}, select {search.get('select')}",
        ),  # fmt: skip
        ("calibrated", "yes" if spec.get("calibration") else "no"),
        ("reward scorer", "yes" if spec.get("reward") else "no"),
    ]
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(),
        "---",
        "",
        "# GeoToken model bundle",
        "",
        *([card.description.strip(), ""] if card.description.strip() else []),
        "A [GeoToken](https://arxiv.org/abs/2511.01082) geolocator: where on Earth was a photo taken? The "
        "photo's geo-aligned embeddings and its retrieved gallery neighbours go into a transformer that "
        "predicts the location's S2-cell tokens, coarse to fine; a search and a selection step pick the answer.",
        "",
        "## Use",
        "",
        "```bash",
        "pip install geotoken",
        f"geotoken predict photo.jpg --model {repo_id} --top-k 5",
        "```",
        "",
        "```python",
        "from geotoken.predict import Geolocator",
        "",
        f'geo = Geolocator.from_pretrained("{repo_id}")',
        'best = geo.predict(["photo.jpg"], top_k=5)[0].candidates[0]  # lat, lon, probability, cell, place',
        "```",
        "",
        "## What is inside",
        "",
        "| part | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in rows),
        "",
    ]
    if card.evaluation:
        # its own headings (metrics.md opens with "# Evaluation") under the card's: level 3 and below
        lines += ["## Evaluation", "", re.sub(r"^#{1,2} ", "### ", card.evaluation.strip(), flags=re.M), ""]
    return "\n".join(lines)


def card_info(root: str | os.PathLike, spec: dict) -> CardInfo:
    """What a bundle's card says beyond the bundle: saved in bundle.json; for a bundle saved before that,
    the license, datasets and evaluation its README.md holds (so rewriting the card keeps them)."""
    if isinstance(spec.get("card"), dict):
        return CardInfo(**spec["card"])
    path = Path(root) / CARD
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    meta = yaml.safe_load(text.split("---\n")[1]) if text.startswith("---\n") else None
    meta = meta if isinstance(meta, dict) else {}
    evaluation = text.split("## Evaluation\n", 1)[1].strip() if "## Evaluation\n" in text else None
    return CardInfo(
        license=meta.get("license", "other"), datasets=meta.get("datasets", []), evaluation=evaluation
    )


def bundle_card(root: str | os.PathLike, spec: dict, repo_id: str = CARD_REPO_PLACEHOLDER) -> str:
    """The model card of the bundle as it is now (calibrated? a reward scorer?), loading `repo_id`."""
    root = Path(root)
    model_cfg = ModelConfig.from_dict(read_json(root / spec["model"] / "config.json"))
    rows = read_json(gallery_dir(root, spec) / "store.json")["rows"]
    backbone = read_json(root / spec["backbone"])
    return model_card(spec, backbone, model_cfg, rows, card_info(root, spec), repo_id)


def read_bundle(root: str | os.PathLike) -> dict:
    """bundle.json of a bundle folder, checked: its format, required fields, and that every part it names exists."""
    root = Path(root)
    path = root / "bundle.json"
    if not path.is_file():
        raise GeoTokenError(f"{root}: not a model bundle (no bundle.json); `geotoken demo` writes one")
    spec = read_json(path)
    if not isinstance(spec, dict):
        raise GeoTokenError(f"{path}: not a bundle description (a JSON object), got {type(spec).__name__}")
    if spec.get("format") != BUNDLE_FORMAT:
        raise GeoTokenError(f"{path}: field 'format' is {spec.get('format')!r}, expected {BUNDLE_FORMAT!r}")
    version = spec.get("version", BUNDLE_VERSION)
    if not is_whole(version):
        raise GeoTokenError(f"{path}: field 'version' is {version!r}, expected a whole number >= 1")
    if version > BUNDLE_VERSION:  # a newer layout: read as this one, it would load wrong or half
        raise GeoTokenError(
            f"{path}: bundle version {version} is newer than this geotoken reads ({BUNDLE_VERSION}); "
            "upgrade geotoken (pip install -U geotoken)"
        )
    if "probability_radius_km" in spec:  # bundles written before one name for it (a Candidate's)
        spec.setdefault("probability_within_km", spec.pop("probability_radius_km"))
    radius = spec.get("probability_within_km", 200.0)
    if (
        isinstance(radius, bool)
        or not isinstance(radius, int | float)
        or not (radius > 0 and math.isfinite(radius))
    ):
        raise GeoTokenError(
            f"{path}: field 'probability_within_km' is {radius!r}, expected a number of km > 0"
        )
    for key in ("backbone", "align", "gallery", "index", "model", "query_modalities"):
        if key not in spec:
            raise GeoTokenError(f"{path}: missing field {key!r}")
    for key in PARTS:
        if key != "gallery" and spec.get(key) and not (root / spec[key]).exists():
            raise GeoTokenError(f"{path}: field {key!r} names {spec[key]!r}, which does not exist in {root}")
    gallery_dir(root, spec)  # raises unless the gallery store (copied or linked) is there
    tokens = gallery_tokens_path(root, spec)
    if not tokens.is_file():
        raise GeoTokenError(f"{path}: the gallery's tokens {tokens} do not exist")
    return spec


def bundle_state(root: str | os.PathLike) -> dict[str, list[int]]:
    """{file: [bytes, modification time in ns]} of every file a bundle reads (`bundle_files`, and a linked
    gallery store's): what changes when it is recalibrated, given a reward scorer or new weights in place,
    without hashing gigabytes."""
    root = Path(root)
    spec = read_bundle(root)
    paths = [root / name for name in bundle_files(root, spec)]
    if spec.get("gallery_link"):
        paths += sorted(p for p in gallery_dir(root, spec).rglob("*") if p.is_file())
    stats = {str(p): p.stat() for p in paths}
    return {name: [st.st_size, st.st_mtime_ns] for name, st in stats.items()}


def gallery_dir(root: str | os.PathLike, spec: dict) -> Path:
    """The gallery's feature store of a bundle: its own `gallery/`, or the store a linked bundle refers to
    (by its relative path, else its absolute one), checked to hold the rows it was linked with."""
    root = Path(root)
    tried = [root / spec["gallery"]] + (
        [Path(spec["gallery_absolute"])] if spec.get("gallery_absolute") else []
    )
    found = next((p for p in tried if (p / "store.json").is_file()), None)
    if found is None:
        raise GeoTokenError(
            f"{root / 'bundle.json'}: field 'gallery' names {spec['gallery']!r}, which is not a feature store"
            + (f" (nor is {spec['gallery_absolute']})" if spec.get("gallery_absolute") else f" in {root}")
        )
    linked = spec.get("gallery_link")
    if linked:
        have = read_json(found / "store.json")
        rows, want_rows = have.get("rows"), linked.get("rows")
        if rows != want_rows or have.get("manifest_hash") != linked.get("manifest_hash"):
            raise GeoTokenError(
                f"{root / 'bundle.json'}: the linked gallery store {found} has {rows} rows and manifest_hash "
                f"{have.get('manifest_hash')!r}; the bundle was made with {want_rows} rows and "
                f"{linked.get('manifest_hash')!r}"
            )
    return found


def gallery_tokens_path(root: str | os.PathLike, spec: dict) -> Path:
    """The gallery's location tokens (N, T) at the model's level: in the bundle either way."""
    return Path(root) / spec.get("gallery_tokens", f"{spec['gallery']}/tokens.npy")


def default_search(k: int) -> SearchOptions:
    """The search a new bundle is written with: what won on all three EarthViews test splits
    (`benchmarks/selection.py`, README "Three test splits"): the greedy answer, 10 samples and the
    neighbours' cells, chosen by `gate`; a model without retrieval (k 0): greedy."""
    if k == 0:
        return SearchOptions(strategy="greedy")
    return SearchOptions(strategy="greedy+sample+retrieval", select="gate", retrieved=k)


def check_bundle_target(root: Path, *inputs: str | os.PathLike, overwrite: bool = False) -> None:
    """A bundle replaces its folder whole: refuse one that holds other things, a bundle unless `overwrite`
    (its calibration and reward scorer, fitted into it later, would go too), or an input it links to."""
    if root.is_file() or (root.is_dir() and any(root.iterdir()) and not (root / "bundle.json").is_file()):
        raise GeoTokenError(
            f"{root}: exists and is not a model bundle; write the bundle to a new or empty folder"
        )
    if (root / "bundle.json").is_file() and not overwrite:
        spec = read_json(root / "bundle.json")
        fitted = [part for part in ("calibration", "reward") if spec.get(part)]
        lost = f" with its {' and '.join(fitted)}" if fitted else ""
        raise GeoTokenError(
            f"{root}: holds a model bundle already; replacing it would drop it whole{lost}: write to a new "
            "folder, or pass --overwrite (overwrite=True)"
        )
    target = root.resolve()
    for p in inputs:
        src = Path(p).resolve()
        if src == target or target in src.parents:
            raise GeoTokenError(f"{root}: holds the bundle's input {p}; write the bundle to another folder")


def check_query(heads, index, query_modalities: list[str]) -> None:
    """The index must hold the heads' `query_modalities` joined, or every search would fail or mislead."""
    query_dim = heads.joined_dim(query_modalities)
    if index is not None and index.dim != query_dim:
        raise GeoTokenError(
            f"the index holds {index.dim}-d vectors, the heads' {'+'.join(query_modalities)} is {query_dim}-d"
        )


def _bare(backbone_config: dict) -> dict:
    return {k: v for k, v in clip_spelled(backbone_config).items() if k not in RUNTIME_KNOBS}


def check_bundle_parts(
    model,
    backbone_config,
    heads,
    gallery_store,
    index,
    query_modalities,
    files: tuple[str, str] | None = None,
) -> None:
    """Refuse parts that were not made for each other: such a bundle would load and answer nonsense (or
    fail on the first photo, far from the command that built it). Run when a bundle is saved and loaded.

    backbone_config: None skips comparing it with the heads' (a backbone chosen at load time);
    files: the heads' and the backbone config's files, named in that error (a bundle's).
    """
    if index.meta.get("gallery_rows") not in (None, gallery_store.rows):
        raise GeoTokenError(
            f"index built over {index.meta['gallery_rows']} gallery rows, {gallery_store.root} has {gallery_store.rows}"
        )
    trained_on = heads.config.backbone
    if trained_on and backbone_config is not None and _bare(trained_on) != _bare(backbone_config):
        if files:
            raise GeoTokenError(
                f"the alignment heads ({files[0]}) were trained on backbone {trained_on}, {files[1]} says "
                f"{backbone_config}; they must match"
            )
        raise GeoTokenError(
            f"the alignment heads were trained on backbone {trained_on}, the gallery was embedded with "
            f"{backbone_config}: embed the gallery with the heads' backbone"
        )
    check_query(heads, index, query_modalities)
    if gallery_store.heads:  # (hashing the heads' weights only when there is a fingerprint to meet)
        gallery_store.check_heads(
            heads.fingerprint(), f"the bundle's alignment heads{f' ({files[0]})' if files else ''}"
        )
    head_dims = heads.dims
    for m, dim in model.cfg.modalities.items():
        sources = {
            "alignment heads": head_dims.get(m),
            f"gallery {gallery_store.root}": gallery_store.dims.get(m),
        }
        for name, have in sources.items():
            if have is not None and have != dim:
                raise GeoTokenError(f"the model reads a {dim}-d {m!r} embedding, the {name} give {have}-d")


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
    card: CardInfo | None = None,
    link_gallery: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write a self-contained bundle that `Geolocator.from_bundle` loads, with its model card (README.md).

    gallery_store: a `geotoken.features.FeatureStore` with the gallery's aligned arrays (those the model
    reads are copied) and coordinates; its tokens are computed here at the model's level and group.
    index: a `NeighbourIndex` over `query_modalities` of that gallery (concatenated in this order).
    link_gallery: refer to `gallery_store` where it is instead of copying it (see the module docstring).
    overwrite: replace a bundle already in `directory` (else refused, naming what it would lose).
    """
    check_bundle_parts(model, backbone_config, heads, gallery_store, index, query_modalities)
    root = Path(directory)
    check_bundle_target(root, *([gallery_store.root] if link_gallery else []), overwrite=overwrite)
    with atomic_dir(root) as out:  # written beside, then swapped in: a failure leaves an old bundle whole
        cfg = model.cfg
        names = [m for m in cfg.modalities if m in gallery_store]
        missing = sorted(set(cfg.modalities) - set(names))
        if missing and cfg.k and cfg.use_neighbour_embeddings:
            raise GeoTokenError(
                f"{gallery_store.root}: no aligned array(s) {missing} for the model's neighbours"
            )
        coords = np.asarray(gallery_store.coords, dtype=np.float64)
        if link_gallery:
            target = Path(gallery_store.root).resolve()
            paths = {
                "gallery": os.path.relpath(target, root.resolve()),
                "gallery_absolute": str(target),
                "gallery_link": {
                    "rows": gallery_store.rows,
                    "manifest_hash": gallery_store.header.get("manifest_hash"),
                },
                "gallery_tokens": "gallery_tokens.npy",
                "index": "index",
            }
        else:
            paths = {"gallery": "gallery", "index": "gallery/index"}
            gallery = FeatureStore.create(
                out / "gallery",
                gallery_store.ids,
                coords,
                {m: gallery_store.dims[m] for m in names},
            )
            for m in names:
                src = gallery_store[m]
                with gallery.writer(m) as w:
                    for s in range(0, len(src), chunk_rows):
                        w.write(s, np.asarray(src[s : s + chunk_rows]))
                made_by = gallery_store.header["arrays"][m].get("heads")
                if made_by:  # the copy keeps the record of which heads wrote it
                    gallery.header["arrays"][m]["heads"] = made_by
                gallery.mark_complete(m)
        tokens = latlon_to_tokens(coords[:, 0], coords[:, 1], cfg.level, cfg.group)
        tokens_path = out / paths.get("gallery_tokens", "gallery/tokens.npy")
        with atomic_path(tokens_path) as tmp, open(tmp, "wb") as f:
            np.save(f, tokens)
        if not link_gallery:  # the copy's index is over the copy: no path to the builder's store
            index = NeighbourIndex(
                index.index, index.config, {k: v for k, v in index.meta.items() if k != "store"}
            )
        index.save(out / paths["index"])
        heads.save(out / "align")
        model.save(out / "model")
        write_json(out / "backbone.json", backbone_config)
        spec = {
            "format": BUNDLE_FORMAT,
            "version": BUNDLE_VERSION,
            "backbone": "backbone.json",
            "align": "align",
            **paths,
            "model": "model",
            "query_modalities": list(query_modalities),
            "calibration": None,
            "reward": None,
            "probability_within_km": 200.0,
            "search": (options or default_search(cfg.k)).to_dict(),
            "backbone_source": backbone_source(backbone_config),
            "card": dataclasses.asdict(card or CardInfo()),  # so the card can be rewritten (`bundle_card`)
        }
        if calibration is not None:
            calibration.save(out / "calibration.json")
            spec["calibration"] = "calibration.json"
        if reward is not None:
            reward.save(out / "reward")
            spec["reward"] = "reward"
        with atomic_open(out / CARD, encoding="utf-8") as f:
            f.write(model_card(spec, backbone_config, cfg, gallery_store.rows, card or CardInfo()))
        write_json(out / "bundle.json", spec)
    return root


def assemble_bundle(
    directory: str | os.PathLike,
    *,
    model: str | os.PathLike,
    align: str | os.PathLike,
    gallery: str | os.PathLike,
    index: str | os.PathLike,
    options: SearchOptions | None = None,
    card: CardInfo | None = None,
    link_gallery: bool = False,
    overwrite: bool = False,
) -> Path:
    """`save_bundle` from the folders the stages wrote: a model, alignment heads, the gallery's aligned
    store (its backbone is the one recorded there) and the index over it (its query embedding is the one
    the index was built on). link_gallery: refer to the gallery store instead of copying it."""
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
        card=card,
        link_gallery=link_gallery,
        overwrite=overwrite,
    )


def set_bundle_part(directory: str | os.PathLike, key: str, relative_path: str | None) -> None:
    """Point bundle.json's `key` (e.g. "reward", "calibration") at a file or folder inside the bundle, and
    rewrite the model card, which says what the bundle holds."""
    root = Path(directory)
    if key not in PARTS:
        raise GeoTokenError(f"bundle part {key!r}: choose one of {', '.join(PARTS)}")
    spec = read_bundle(root)
    if relative_path is not None and not (root / relative_path).exists():
        raise GeoTokenError(f"{root / relative_path} does not exist")
    spec[key] = relative_path
    write_json(root / "bundle.json", spec)
    with atomic_open(root / CARD, encoding="utf-8") as f:
        f.write(bundle_card(root, spec))


def bundle_files(root: str | os.PathLike, spec: dict) -> list[str]:
    """The files a bundle consists of, relative to its folder: bundle.json and the parts it names, without
    hidden files (.DS_Store, a write's leftover .NAME.tmp) or others beside them (a pipeline's stage.json).
    README.md is not among them: `push_to_hub` writes the card afresh. A linked gallery is not inside."""
    root = Path(root)
    keys = [
        k
        for k in (*PARTS, "gallery_tokens")
        if spec.get(k) and not (k == "gallery" and spec.get("gallery_link"))
    ]
    found = {"bundle.json"}
    for key in keys:
        part = root / spec[key]
        for path in [part] if part.is_file() else part.rglob("*"):
            rel = path.relative_to(root)
            if path.is_file() and not any(name.startswith(".") for name in rel.parts):
                found.add(rel.as_posix())
    return sorted(found)


def copy_bundle(
    source: str | os.PathLike,
    directory: str | os.PathLike,
    *,
    search: dict[str, Any],
    probability_within_km: float,
    calibration=None,
    reward=None,
    keep_reward: bool = False,
    overwrite: bool = False,
    hard_links: bool = False,
) -> Path:
    """A copy of the bundle `source` in `directory` with these search defaults, confidence radius,
    calibration (None: none) and reward scorer (`keep_reward`: the source's own folder, with its training
    record; else `reward.save`, None: none): what `Geolocator.save_pretrained` writes.
    `hard_links`: link the files instead of copying them where the file system allows (a bundle's files
    are only ever replaced by renames, never written in place). A linked gallery stays linked."""
    src = Path(source)
    spec = read_bundle(src)
    root = Path(directory)
    if root.resolve() == src.resolve():
        raise GeoTokenError(f"{root}: is the bundle it would copy; write to another folder")
    check_bundle_target(root, overwrite=overwrite)
    fitted = tuple(
        spec[k] for k in ("calibration", "reward") if spec.get(k)
    )  # written below, as they are now
    with atomic_dir(root) as out:
        for name in bundle_files(src, spec):
            if name == "bundle.json" or any(
                name == f or name.startswith(f.rstrip("/") + "/") for f in fitted
            ):
                continue
            target = out / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if hard_links:
                try:
                    os.link(src / name, target)
                    continue
                except OSError:  # another file system: a copy
                    pass
            shutil.copy2(src / name, target)
        spec = {**spec, "search": search, "probability_within_km": float(probability_within_km)}
        if spec.get("gallery_link"):  # the same store, found from the new place
            spec["gallery"] = os.path.relpath(spec["gallery_absolute"], root.resolve())
        spec["calibration"] = None
        if calibration is not None:
            calibration.save(out / "calibration.json")
            spec["calibration"] = "calibration.json"
        had, spec["reward"] = spec.get("reward"), None
        if keep_reward and had:
            shutil.copytree(src / had, out / "reward", copy_function=shutil.copy2)
            spec["reward"] = "reward"
        elif reward is not None:
            reward.save(out / "reward")
            spec["reward"] = "reward"
        write_json(out / "bundle.json", spec)
        with atomic_open(out / CARD, encoding="utf-8") as f:
            f.write(bundle_card(out, spec))
    return root


def push_to_hub(
    directory: str | os.PathLike,
    repo_id: str,
    *,
    revision: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    allow_local_backbone: bool = False,
) -> str:
    """Upload a bundle folder to the Hugging Face Hub model repo `repo_id` (created if missing, and the
    branch `revision` too); returns the commit URL. One commit of `bundle_files` and a model card written
    afresh with `repo_id` in its usage lines; the folder itself is left as it is.

    A bundle whose CLIP backbone is a local folder is refused unless `allow_local_backbone` (its users
    then pass the CLIP weights themselves: `from_pretrained(..., clip=...)`, `--clip`)."""
    from huggingface_hub import CommitOperationAdd, HfApi

    root = Path(directory)
    spec = read_bundle(root)
    check_repo_id(repo_id)
    if (spec.get("backbone_source") or {}).get("kind") == "folder" and not allow_local_backbone:
        raise GeoTokenError(
            f"{root}: its CLIP backbone is the local folder {spec['backbone_source']['path']}, which nobody "
            "else has; save the bundle with a hub id as the CLIP model before pushing it"
        )
    if spec.get("gallery_link"):
        raise GeoTokenError(
            f"{root}: its gallery is a link to {spec.get('gallery_absolute')}, which would not be uploaded; "
            "assemble the bundle again without --link-gallery (a copy) before pushing it"
        )
    card = bundle_card(root, spec, repo_id).encode("utf-8")
    operations = [
        CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(root / f)) for f in bundle_files(root, spec)
    ]
    operations.append(CommitOperationAdd(path_in_repo=CARD, path_or_fileobj=card))
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if revision not in (None, "main"):  # a commit to a branch that does not exist fails
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        info = api.create_commit(
            repo_id,
            operations,
            commit_message=commit_message or "Upload GeoToken bundle",
            repo_type="model",
            revision=revision,
        )
    except hub_errors() as exc:
        raise GeoTokenError(
            f"{repo_id}: pushing {root} to the Hugging Face Hub failed"
            f"{f' (revision {revision})' if revision else ''}: {type(exc).__name__}: {' '.join(str(exc).split())}"
        ) from None
    return str(getattr(info, "commit_url", info))


def hub_snapshot(
    repo_id: str,
    revision: str | None = None,
    *,
    token: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> Path:
    """The local folder of a Hub repo's snapshot (`huggingface_hub.snapshot_download`, which the keywords
    go to: downloaded into its cache once; with HF_HUB_OFFLINE=1, local_files_only or no network, only the
    cache is read)."""
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(
            repo_id, revision=revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only
        )
    except hub_errors() as e:
        reason = " ".join(str(e).split())
        raise GeoTokenError(
            f"{repo_id!r}: not a local folder, and the Hugging Face Hub could not provide it"
            f"{f' (revision {revision})' if revision else ''}: {reason}"
        ) from None
    return Path(folder)

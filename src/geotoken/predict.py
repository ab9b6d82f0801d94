"""Inference: photos in, ranked candidate locations out.

    geo = Geolocator.from_bundle("runs/demo/bundle")
    [pred] = geo.predict([PIL.Image.open("photo.jpg")], top_k=5, strategy="beam", select="consensus")
    pred.lat, pred.lon, pred.candidates[0].place, pred.to_dict()

One call runs the whole method: backbone features -> aligned embeddings (`align/` heads) -> neighbours
from the gallery index -> the GeoToken encoder once -> cached beam search or sampling (optionally only
over cells of the gallery) -> a selector -> for each of the top-k candidates: coordinate, calibrated
probability of being within 200 km (and 25 / 750), its S2 cell (token and polygon), the nearest place
name, and the calibrated confidence of each token level.

`Geolocator.from_pretrained(name)` loads any model by name: "geoclip" (GeoCLIP's pretrained worldwide
geolocator, `GeoCLIPPredictor`: the same `predict` / `info`, the same `Prediction`s), a bundle folder, or a
Hugging Face Hub repo id holding a bundle (fetched through the hub cache). `predict` takes paths, bytes,
PIL images or NumPy arrays, applies EXIF orientation, and works `batch_size` photos at a time.

`Geolocator.search(...)` is the array-level path (already-aligned embeddings and optional neighbour rows
in, candidate pools and selections out) that `geotoken evaluate` runs over whole test sets. The bundle
format is `geotoken.bundle`; fitting a bundle's calibration and reward scorer is `geotoken.fit`.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from geotoken import s2
from geotoken.align import AlignHeads
from geotoken.bundle import (
    bundle_backbone_config,
    check_bundle_parts,
    copy_bundle,
    gallery_dir,
    gallery_tokens_path,
    hub_snapshot,
    is_repo_id,
    read_bundle,
)
from geotoken.bundle import push_to_hub as push_bundle
from geotoken.data.images import as_image, as_image_list, image_key
from geotoken.encoders import load_backbone
from geotoken.encoders.clip import resolve_precision
from geotoken.encoders.ort import RUNTIMES, resolve_runtime
from geotoken.errors import GeoTokenError
from geotoken.features import FeatureStore, load_array
from geotoken.gallery import Gallery
from geotoken.io import read_json
from geotoken.model import Batch, GeoToken
from geotoken.places import place_names
from geotoken.prediction import Candidate, Prediction, check_top_k, resolve_device
from geotoken.pretrained import GeoCLIPPredictor
from geotoken.retrieval import REFINE, NeighbourIndex, StoreEmbeddings, join_embeddings
from geotoken.search.calibration import Calibration, apply_temperature, within_confidence
from geotoken.search.candidates import OWN_ANSWER_FIRST, Candidates, Selection
from geotoken.search.decode import PrefixConstraint, generate
from geotoken.search.options import SearchOptions, describe_search
from geotoken.search.reward import DecoderRewardScorer, RewardScorer, load_reward
from geotoken.search.select import select

BUILTIN_MODELS = ("geoclip",)


def describe_other_search(changed: dict) -> str:
    """The note of a prediction whose search is not the one its bundle's calibration was fitted under."""
    if not changed:
        return ""
    said = ", ".join(f"{k} {now!r} (calibrated: {then!r})" for k, (then, now) in changed.items())
    return f"probabilities not calibrated for this search: {said}; `geotoken calibrate` with it fits them"


@dataclass
class SearchResult:
    """Array-level output for B images: the candidate pool, the selection, neighbour rows (B, k) or None."""

    pool: Candidates
    selection: Selection
    neighbours: np.ndarray | None
    timings_ms: dict[str, float]


def checked_queries(embeddings: dict, neighbours=None) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """A search's inputs as arrays, or an error naming the one that is wrong: not (B, D), rows that differ
    between embeddings or from the neighbour rows, no rows, or a row that is not finite (NaN: an image that
    could not be read; FAISS would give it no neighbours and the error would come from far away)."""
    if not isinstance(embeddings, dict) or not embeddings:
        raise GeoTokenError("query embeddings: a dict {modality: (B, D) array}, e.g. {'visual': ...}")
    arrays = {m: np.asarray(v) for m, v in embeddings.items()}
    for m, a in arrays.items():
        if a.ndim != 2 or not np.issubdtype(a.dtype, np.number):
            raise GeoTokenError(
                f"query embedding {m!r}: {a.dtype} of shape {a.shape}, expected numbers (B, D)"
            )
    rows = {m: len(a) for m, a in arrays.items()}
    if len(set(rows.values())) > 1:
        raise GeoTokenError(f"query embeddings have different numbers of rows: {rows}")
    B = next(iter(rows.values()))
    if B == 0:
        raise GeoTokenError("query embeddings have no rows")
    for m, a in arrays.items():
        bad = np.flatnonzero(~np.isfinite(a).all(axis=1))
        if len(bad):
            raise GeoTokenError(
                f"query embedding {m!r}: row {bad[0]} is not finite (NaN or inf; {len(bad)} such rows): an "
                "image that could not be read? (stores mark those rows skipped)"
            )
    if neighbours is not None:
        neighbours = np.asarray(neighbours)
        if neighbours.ndim != 2 or len(neighbours) != B or not np.issubdtype(neighbours.dtype, np.integer):
            raise GeoTokenError(
                f"neighbours: {neighbours.dtype} of shape {neighbours.shape}, expected integer gallery rows ({B}, k)"
            )
    return arrays, neighbours


class Geolocator:
    """The loaded method. Build with `from_bundle(dir)`, or from parts (tests, notebooks)."""

    def __init__(
        self,
        model: GeoToken,
        gallery: Gallery,
        index: NeighbourIndex | None = None,
        query_modalities: list[str] | None = None,
        backbone=None,
        heads: AlignHeads | None = None,
        calibration: Calibration | None = None,
        reward: RewardScorer | DecoderRewardScorer | None = None,
        options: SearchOptions | None = None,
        probability_within_km: float = 200.0,
        root: str | os.PathLike | None = None,
        gallery_vectors=None,
    ):
        """gallery_vectors: the (G, D) vectors the index holds (e.g. `StoreEmbeddings` of the gallery), with
        which a compressed index re-ranks `REFINE` x k candidates, as the neighbour tables the model was
        trained on do; None: the index's own order."""
        self.model = model.eval()
        self.gallery_vectors = gallery_vectors
        gallery.check(model.cfg)
        self.gallery = gallery
        self.index, self.query_modalities = index, list(query_modalities or ["visual"])
        self.backbone, self.heads = backbone, heads
        self.calibration, self.reward = calibration, reward
        self.options = options or SearchOptions()
        self.probability_within_km = probability_within_km
        self.root = None if root is None else Path(root)
        self.bundle_reward = reward if root is not None else None  # the scorer `root` holds, as loaded
        self.constraint = PrefixConstraint(gallery.tokens, model.cfg.vocab_sizes)

    @cached_property
    def made_by(self) -> str | None:
        """Fingerprint of the alignment heads (None without): stores aligned by other heads are refused."""
        return None if self.heads is None else self.heads.fingerprint()

    # ------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        clip: str | os.PathLike | None = None,
        revision: str | None = None,
        device: str = "auto",
        backbone_precision: str = "auto",
        backbone_runtime: str = "auto",
        token: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
    ) -> Geolocator | GeoCLIPPredictor:
        """A model by name: "geoclip" (built in: GeoCLIP's pretrained weights, `GeoCLIPPredictor`), a bundle
        folder, or a Hugging Face Hub repo id (ORG/NAME) holding a bundle, fetched at `revision` into the hub
        cache (`HF_HUB_OFFLINE=1`: the cache only). An existing folder wins over a repo id of the same name;
        "~" is the home folder.

        clip: the CLIP ViT-L/14 weights (a folder or hub id) of "geoclip" (default
        openai/clip-vit-large-patch14) or of a bundle with a CLIP backbone (default: the one it records).
        device: "auto" (CUDA, then MPS, then CPU), "cpu", "cuda:1", ...
        backbone_precision: how a CLIP backbone runs (`geotoken.encoders.clip.PRECISIONS`; "auto": bf16 on
        CPUs with bf16 units, else fp32, and fp32 under backbone_runtime "onnx"; int8 is an explicit choice).
        backbone_runtime: what runs a CLIP backbone (`geotoken.encoders.ort.RUNTIMES`: torch, onnx = ONNX
        Runtime on the CPU for fp32/int8, exported once into the cache; "auto": onnx on a non-Intel CPU at fp32
        when onnxruntime is installed, else torch).
        token, cache_dir, local_files_only: how a repo id is fetched (`huggingface_hub.snapshot_download`'s
        options: an access token for a private repo, another hub cache, the cache only).
        """
        name = os.path.expanduser(os.fspath(name_or_path))
        if name == "geoclip":
            if revision is not None:
                raise GeoTokenError("revision applies to Hugging Face Hub repos, not to the built-in geoclip")
            return GeoCLIPPredictor.load(
                clip=clip, device=device, precision=backbone_precision, runtime=backbone_runtime
            )
        if Path(name).exists():
            if revision is not None:
                raise GeoTokenError(f"{name}: a local folder has no revision (revision={revision!r})")
            return cls.from_bundle(
                name,
                device=device,
                clip=clip,
                backbone_precision=backbone_precision,
                backbone_runtime=backbone_runtime,
            )
        if not is_repo_id(name):
            raise GeoTokenError(
                f"{name}: no such folder; a model is a bundle folder (has bundle.json), a Hugging Face Hub "
                f"repo id (ORG/NAME) or one of the built-in models {', '.join(BUILTIN_MODELS)}"
            )
        return cls.from_bundle(
            hub_snapshot(name, revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only),
            device=device,
            clip=clip,
            backbone_precision=backbone_precision,
            backbone_runtime=backbone_runtime,
        )

    @classmethod
    def from_bundle(
        cls,
        directory: str | os.PathLike,
        device: str = "auto",
        clip: str | os.PathLike | None = None,
        backbone_precision: str = "auto",
        backbone_runtime: str = "auto",
    ) -> Geolocator:
        """Load everything named by `directory/bundle.json` (`clip`: other CLIP weights for its backbone;
        `backbone_precision`, `backbone_runtime`, `device`: see `from_pretrained`; other backbones run in fp32
        on torch)."""
        root = Path(directory).expanduser()
        spec = read_bundle(root)
        device = resolve_device(device)
        backbone_config = bundle_backbone_config(root, spec, clip)
        if backbone_runtime not in RUNTIMES:  # (a wrong value first, before whether it applies here)
            raise GeoTokenError(
                f"backbone_runtime must be one of {', '.join(RUNTIMES)}, got {backbone_runtime!r}"
            )
        precision = resolve_precision(backbone_precision, device, backbone_runtime)
        if backbone_config.get("name") == "clip":
            backbone_config["precision"] = precision
            dtype = backbone_config.get("dtype", "float32")
            backbone_config["runtime"] = resolve_runtime(backbone_runtime, precision, device, dtype)
        elif backbone_precision not in ("auto", "fp32"):
            raise GeoTokenError(
                f"{root}: backbone_precision {backbone_precision!r} applies to CLIP backbones; this bundle's "
                f"is {backbone_config.get('name')!r} (fp32)"
            )
        elif backbone_runtime not in ("auto", "torch"):
            raise GeoTokenError(
                f"{root}: backbone_runtime {backbone_runtime!r} applies to CLIP backbones; this bundle's "
                f"is {backbone_config.get('name')!r} (torch)"
            )
        model = GeoToken.load(root / spec["model"], device=device)
        store = FeatureStore.open(gallery_dir(root, spec))  # its own copy, or the store it links to
        tokens = load_array(gallery_tokens_path(root, spec), (store.rows, model.cfg.n_tokens))
        names = [m for m in model.cfg.modalities if m in store]
        gallery = Gallery.from_store(store, names, tokens=np.asarray(tokens))
        heads = AlignHeads.load(root / spec["align"]).to(device).eval()
        index = NeighbourIndex.load(root / spec["index"])
        rerank = index.config.kind != "flat" and all(m in store for m in spec["query_modalities"])
        recorded = None if clip is not None else read_json(root / spec["backbone"])  # `clip` replaces it
        files = (str(root / spec["align"]), str(root / spec["backbone"]))
        try:
            check_bundle_parts(model, recorded, heads, store, index, spec["query_modalities"], files)
        except GeoTokenError as exc:
            raise GeoTokenError(f"{root / 'bundle.json'}: {exc}") from None
        return cls(
            model,
            gallery,
            index=index,
            query_modalities=spec["query_modalities"],
            backbone=load_backbone(**backbone_config).to(device),
            heads=heads,
            calibration=Calibration.load(root / spec["calibration"]) if spec.get("calibration") else None,
            reward=load_reward(root / spec["reward"], device=device) if spec.get("reward") else None,
            options=SearchOptions.from_dict(spec.get("search", {})),
            probability_within_km=float(spec.get("probability_within_km", 200.0)),
            root=root,
            gallery_vectors=StoreEmbeddings(store, "+".join(spec["query_modalities"])) if rerank else None,
        )

    # ------------------------------------------------------------------------------------------ saving
    def save_pretrained(self, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write this geolocator as a bundle folder that `from_pretrained` loads: the bundle it was loaded
        from, with its search defaults (`options`), `probability_within_km`, calibration and reward scorer
        as they are now. A geolocator assembled in memory from parts: `geotoken.bundle.save_bundle`."""
        return self._copy(directory, overwrite=overwrite)

    def push_to_hub(self, repo_id: str, **options) -> str:
        """Upload this geolocator (as `save_pretrained` writes it) to the Hugging Face Hub model repo
        `repo_id`; `options`: `geotoken.bundle.push_to_hub`'s (revision, private, token, ...). Returns the
        commit URL."""
        with tempfile.TemporaryDirectory(dir=self.root.parent if self.root else None) as tmp:
            folder = self._copy(Path(tmp) / "bundle", hard_links=True)  # no second copy of the gallery
            return push_bundle(folder, repo_id, **options)

    def _copy(self, directory, overwrite: bool = False, hard_links: bool = False) -> Path:
        if self.root is None:
            raise GeoTokenError(
                "this Geolocator was assembled in memory, not loaded from a bundle: write one from its parts "
                "with geotoken.bundle.save_bundle"
            )
        return copy_bundle(
            self.root, directory, search=self.options.to_dict(), probability_within_km=self.probability_within_km,
            calibration=self.calibration, reward=self.reward,
            keep_reward=self.reward is not None and self.reward is self.bundle_reward,
            overwrite=overwrite, hard_links=hard_links,
        )  # fmt: skip

    def info(self) -> dict:
        """What is loaded (for `geotoken serve` and logs)."""
        cfg = self.model.cfg
        return {
            "bundle": None if self.root is None else str(self.root),
            "backbone": None if self.backbone is None else self.backbone.config(),
            "backbone_precision": getattr(self.backbone, "precision", None),  # CLIP's; None: fp32
            "backbone_runtime": getattr(self.backbone, "runtime", None),  # CLIP's; None: torch
            "model": cfg.to_dict(),
            "parameters": self.model.n_params(),
            "gallery_rows": self.gallery.rows,
            "gallery_cells": len(self.constraint.levels[-1]),
            "query_modalities": self.query_modalities,
            "calibrated": self.calibration is not None,
            "reward_scorer": self.reward is not None,
            "reward_kind": None if self.reward is None else self.reward.kind,
            "search": self.options.to_dict(),
        }

    # ------------------------------------------------------------------------------------------ arrays
    @property
    def device(self):
        return next(self.model.parameters()).device

    def embed(self, images: list, timings_ms: dict | None = None) -> dict[str, np.ndarray]:
        """PIL images -> aligned embeddings {modality: float32 (B, D)}; `timings_ms` (if given) gets the
        milliseconds of "preprocess" (resize, crop, normalise), "backbone" and "heads"."""
        if self.backbone is None or self.heads is None:
            raise GeoTokenError("this Geolocator has no backbone/align heads; use predict_embeddings")
        t0 = time.perf_counter()
        with torch.no_grad():
            x = self.backbone.preprocess_batch(images).to(self.device)
            t1 = time.perf_counter()
            features = self.backbone(x).float()
            t2 = time.perf_counter()
            out = {m: v.float().cpu().numpy() for m, v in self.heads(features).items()}
        if timings_ms is not None:
            t3 = time.perf_counter()
            timings_ms.update(preprocess=1e3 * (t1 - t0), backbone=1e3 * (t2 - t1), heads=1e3 * (t3 - t2))
        return out

    def _check_widths(self, embeddings: dict[str, np.ndarray], searched: bool) -> None:
        """Every modality the model reads (and the index searches, when it will) given at its width, or an
        error naming the modality: otherwise a KeyError or a tensor-size error from deep inside."""
        widths = dict(self.model.cfg.modalities)
        for m in self.query_modalities if searched else ():
            widths.setdefault(
                m, self.gallery.embeddings[m].shape[1] if m in self.gallery.embeddings else None
            )
        for m, width in widths.items():
            if m not in embeddings:
                raise GeoTokenError(
                    f"query embeddings: no {m!r} (this model reads {sorted(widths)}; given {sorted(embeddings)})"
                )
            if width is not None and embeddings[m].shape[1] != width:
                raise GeoTokenError(
                    f"query embedding {m!r} has width {embeddings[m].shape[1]}; this model's is {width}"
                )

    def neighbours(self, embeddings: dict[str, np.ndarray]) -> np.ndarray:
        """(B, k) gallery rows of the nearest neighbours (hits 0..k-1: queries are not in the gallery)."""
        k = self.model.cfg.k
        if self.index is None:
            raise GeoTokenError("this Geolocator has no gallery index; pass neighbour rows explicitly")
        # the same construction as the gallery vectors the index holds (StoreEmbeddings)
        queries = join_embeddings([embeddings[m] for m in self.query_modalities])
        rerank = {} if self.gallery_vectors is None else {"exact": self.gallery_vectors, "refine": REFINE}
        rows, _ = self.index.search(queries, k, **rerank)
        return np.asarray(rows, dtype=np.int64)

    def batch(self, embeddings: dict[str, np.ndarray], neighbours: np.ndarray | None) -> Batch:
        """Model inputs on the model's device: aligned embeddings {m: (B, D)}, neighbour rows (B, k) or None."""
        return self.gallery.batch(embeddings, neighbours, self.model.cfg).to(self.device)

    def search(
        self,
        embeddings: dict[str, np.ndarray],
        neighbours: np.ndarray | None = None,
        images: list | None = None,
        progress: bool = False,
        keys: np.ndarray | None = None,
        **options,
    ) -> SearchResult:
        """Decode and select for B images given aligned embeddings {m: (B, D)}, in batches of `batch_size`.

        neighbours: (B, >=k) gallery rows, or None to search the index. images: only for `select="mllm"`.
        keys: (B,) int64 sampling keys, one per image (`predict`: `image_key` of each photo); None keys
        image b by its row, seed + b. Either way an image's samples do not depend on the batching.
        options: any `SearchOptions` field (strategy, beam_width, num_samples, select, radius_km, ...).
        """
        opt = self.options.replace(**options)
        embeddings, neighbours = checked_queries(embeddings, neighbours)
        self._check_widths(embeddings, searched=neighbours is None and bool(self.model.cfg.k))
        B = len(next(iter(embeddings.values())))
        if neighbours is None and self.model.cfg.k:
            t0 = time.perf_counter()
            neighbours = self.neighbours(embeddings)
            t_retrieve = time.perf_counter() - t0
        else:
            t_retrieve = 0.0
        pools, selections, t_decode, t_select = [], [], 0.0, 0.0
        starts = range(0, B, opt.batch_size)
        for s in tqdm(starts, desc="search", unit="batch", disable=not progress or len(starts) < 2):
            part = slice(s, s + opt.batch_size)
            batch = self.batch(
                {m: v[part] for m, v in embeddings.items()}, None if neighbours is None else neighbours[part]
            )
            t0 = time.perf_counter()
            with torch.no_grad():
                pool, memory = generate(
                    self.model,
                    batch,
                    opt.strategy,
                    beam_width=opt.beam_width,
                    num_samples=opt.num_samples,
                    temperature=opt.temperature,
                    sample_top_k=opt.sample_top_k,
                    top_p=opt.top_p,
                    seed=opt.seed
                    + (s if keys is None else torch.from_numpy(np.asarray(keys[part], np.int64))),
                    constraint=self.constraint if opt.constrain else None,
                    dtype=opt.dtype,
                    retrieved=opt.retrieved,
                )
            t1 = time.perf_counter()
            selections.append(
                select(pool, opt.select, **self._select_args(opt, memory, part, images, neighbours, batch))
            )
            t_decode, t_select = t_decode + t1 - t0, t_select + time.perf_counter() - t1
            pools.append(pool)
        return SearchResult(
            pool=Candidates.join(pools),
            selection=Selection.join(selections),
            neighbours=neighbours,
            timings_ms={"retrieve": 1e3 * t_retrieve, "decode": 1e3 * t_decode, "select": 1e3 * t_select},
        )

    def _select_args(self, opt: SearchOptions, memory, part: slice, images, neighbours, batch=None) -> dict:
        if opt.select == "logp":
            return {"logp_kind": opt.logp_kind}
        if opt.select == "consensus":
            return {"radius_km": opt.radius_km, "medoid": opt.medoid}
        own = 0 if opt.strategy in OWN_ANSWER_FIRST else None  # where the pool holds the model's answer
        if opt.select in ("vote", "gate"):
            nbr = None if neighbours is None else self.gallery.coords[neighbours[part, : self.model.cfg.k]]
            args = {"neighbours_latlon": nbr, "radius_km": opt.radius_km}
            if opt.select == "gate":
                args.update(gate_p=opt.gate_p, gate_tokens=opt.gate_tokens, own_index=own)
            return args
        if opt.select == "reward":
            if self.reward is None:
                raise GeoTokenError(
                    "select='reward' needs a reward scorer in the bundle (geotoken train-reward)"
                )
            return {"scorer": self.reward, "memory": memory, "batch": batch}
        if opt.select == "mllm":
            if images is None:
                raise GeoTokenError("select='mllm' needs the images")
            nbr = None if neighbours is None else self.gallery.coords[neighbours[part]]  # (b, k, 2)
            return {"images": images[part], "config": opt.mllm, "neighbours_latlon": nbr, "best_index": own}
        return {}

    # ------------------------------------------------------------------------------------------ predictions
    def predict(
        self,
        images,
        top_k: int = 5,
        strategy: str | None = None,
        select: str | None = None,
        progress: bool = False,
        **options,
    ) -> list[Prediction]:
        """Photos -> one `Prediction` per photo, candidates best first.

        images: paths (or SHARD.tar#MEMBER), encoded bytes, PIL images or NumPy arrays (one, or a list; see
        `geotoken.data.images.as_image`), EXIF orientation applied; read and run `batch_size` at a time, so
        memory stays bounded however many. Each candidate is a `Candidate`: coordinate, calibrated
        probabilities, cell, place, level confidences. progress: a bar over the batches.
        """
        top_k = check_top_k(top_k)
        items = as_image_list(images)
        opt = self.options.replace(**options)
        preds: list[Prediction] = []
        starts = range(0, len(items), opt.batch_size)
        for s in tqdm(starts, desc="predict", unit="batch", disable=not progress or len(starts) < 2):
            t0 = time.perf_counter()
            chunk = [as_image(x, f"image {s + i}") for i, x in enumerate(items[s : s + opt.batch_size])]
            stages = {"read": 1e3 * (time.perf_counter() - t0)}  # open and decode the image files
            embeddings = self.embed(chunk, stages)
            preds += self.predict_embeddings(
                embeddings,
                None,
                top_k,
                strategy,
                select,
                images=chunk,
                extra_ms=stages,
                keys=np.array([image_key(im) for im in chunk], dtype=np.int64),  # samples follow the photo
                **options,
            )
        return preds

    def predict_embeddings(
        self,
        embeddings: dict[str, np.ndarray],
        neighbours: np.ndarray | None = None,
        top_k: int = 5,
        strategy: str | None = None,
        select: str | None = None,
        images: list | None = None,
        extra_ms: dict | None = None,
        keys: np.ndarray | None = None,
        **options,
    ) -> list[Prediction]:
        """Like `predict`, from aligned embeddings {m: (B, D)} and optional neighbour rows (B, k); `keys` as
        in `search`."""
        top_k = check_top_k(top_k)
        if isinstance(embeddings, dict) and embeddings and all(len(v) == 0 for v in embeddings.values()):
            return []  # as `predict([])`
        res = self.search(
            embeddings, neighbours, images, keys=keys, strategy=strategy, select=select, **options
        )
        opt = self.options.replace(**{**options, "strategy": strategy, "select": select})
        t1 = time.perf_counter()
        preds = self._describe(res, top_k, opt)
        timings = {**(extra_ms or {}), **res.timings_ms, "describe": 1e3 * (time.perf_counter() - t1)}
        timings["total"] = sum(timings.values())
        B = len(preds)
        for p in preds:  # per image: the batch's time shared equally
            p.timings_ms = {k: round(v / B, 3) for k, v in timings.items()}
        return preds

    def _describe(self, res: SearchResult, top_k: int, opt: SearchOptions) -> list[Prediction]:
        """Top-k candidates per image with cells, places and calibrated confidences (vectorized over all)."""
        pool, sel = res.pool, res.selection
        B, N = pool.shape
        cfg = self.model.cfg
        order = np.argsort(-sel.scores, axis=1, kind="stable")  # (B, N), duplicates (-inf) last
        # (a selector may rank its choice +inf: only -inf, repeats and impossible paths, are left out)
        finite = np.take_along_axis((sel.scores > -np.inf) & np.isfinite(pool.logp), order, axis=1)
        free = sel.index < 0  # MLLM free answers go first, outside the pool
        M = min(top_k, N)
        top = pool.take(order[:, :M])  # (B, M)
        keep = finite[:, :M]
        lat, lon = top.lat.copy(), top.lon.copy()
        # the coordinate listed first is the selection's, even when it came from outside the pool
        if free.any():
            lat, lon = np.concatenate([sel.lat[:, None], lat], 1), np.concatenate([sel.lon[:, None], lon], 1)
            keep = np.concatenate([free[:, None], keep], 1)
        cal = self.calibration or Calibration()
        other = describe_other_search(cal.other_search(opt))
        g = cfg.group
        within = {f"{r:g}km": self._within(cal, pool, lat, lon, r, g) for r in cal.radii_km}
        prob_name = f"{self.probability_within_km:g}km"
        if prob_name not in within:
            within[prob_name] = self._within(cal, pool, lat, lon, self.probability_within_km, g)
        levels = cal.level_probs(top.level_probs)  # (B, M, T)
        ids = s2.latlon_to_cell_ids(lat.ravel(), lon.ravel(), cfg.level)
        hexes = np.asarray(s2.cell_ids_to_hex(ids)).reshape(lat.shape)
        polys = np.asarray(s2.cell_vertices(ids)).reshape(*lat.shape, 4, 2)
        places = np.array(place_names(lat.ravel(), lon.ravel()), dtype=object).reshape(lat.shape)
        offset = lat.shape[1] - M  # 1 when a free answer was prepended
        out = []
        for b in range(B):
            cands = []
            for j in np.flatnonzero(keep[b]):
                in_pool = j >= offset
                c = Candidate(
                    lat=float(lat[b, j]),
                    lon=float(lon[b, j]),
                    probability=float(within[prob_name][b, j]),
                    probability_within_km=self.probability_within_km,
                    within={name: float(v[b, j]) for name, v in within.items()},
                    logp=float(top.logp[b, j - offset]) if in_pool else None,
                    cell=str(hexes[b, j]),
                    level=cfg.level,
                    polygon=polys[b, j].round(6).tolist(),
                    place=places[b, j],
                    level_confidence=levels[b, j - offset].round(6).tolist() if in_pool else None,
                    source="pool" if in_pool else "mllm",
                    logp_scaled=float(top.logp_scaled[b, j - offset]) if in_pool else None,
                )
                cands.append(c)
            notes = [sel.notes[b]] if sel.notes[b] else []
            if other:
                notes.append(other)
            if len(cands) < top_k:  # the search's distinct cells, not the request, bound the list
                notes.append(f"{len(cands)} of the {top_k} candidates asked for: the search "
                             f"({describe_search(opt.to_dict())}) found no more distinct cells")  # fmt: skip
            out.append(Prediction(cands[:top_k], {}, opt.strategy, opt.select, "; ".join(notes)))
        return out

    @staticmethod
    def _within(
        cal, pool: Candidates, lat: np.ndarray, lon: np.ndarray, radius_km: float, group: int
    ) -> np.ndarray:
        """(B, M) calibrated P(within radius) of each listed coordinate, from the pool's mass around it."""
        temps = dict(zip(cal.radii_km, cal.within))
        cols = [within_confidence(pool, lat[:, j], lon[:, j], radius_km, group) for j in range(lat.shape[1])]
        return apply_temperature(np.stack(cols, axis=1), temps.get(radius_km, 1.0))


__all__ = [
    "BUILTIN_MODELS",
    "Candidate",
    "GeoCLIPPredictor",
    "Geolocator",
    "Prediction",
    "SearchResult",
    "resolve_device",
]

"""Training the alignment heads on a feature store, evaluating them, and applying them to a store.

Targets are frozen, so they are computed once: GeoCLIP embeddings of the unique coordinates and text
embeddings of the unique place descriptions (many photos share a place), each a table plus a per-row
index. The losses are symmetric InfoNCE, image-vs-GPS with a FIFO queue of recent GPS embeddings as
extra negatives (GeoCLIP's recipe; the queue needs no re-encoding because the GPS encoder is frozen),
and image-vs-text. Two photos of the same coordinates (or the same place description) are never used
as each other's negatives: they are masked out of the softmax rather than counted as wrong.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from geotoken.align.heads import GPS_HEADS, AlignHeads, HeadsConfig
from geotoken.assets import mp16_coordinates_csv
from geotoken.devices import own_random_state, torch_device
from geotoken.encoders import load_gps_encoder, load_text_encoder
from geotoken.encoders.base import clip_spelled, default_cache_dir
from geotoken.encoders.geoclip import (
    CACHE_FORMAT,
    IMAGE_DIM,
    GeoCLIPFiles,
    load_image_head,
    module_key,
    read_cached_gallery,
    write_cached_gallery,
)
from geotoken.errors import GeoTokenError
from geotoken.features import FeatureStore, read_rows
from geotoken.geo import THRESHOLDS_KM, haversine_km
from geotoken.io import (
    atomic_dir,
    is_whole,
    load_optimizer,
    optimizer_tensors,
    read_json,
    read_safetensors,
    sha256_json,
    write_json,
)
from geotoken.places import describe


@dataclass
class AlignConfig:
    """Training options (the heads' shapes are in HeadsConfig)."""

    epochs: int = 20
    batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 1e-4
    queue_size: int = 4096  # extra GPS negatives (GeoCLIP uses 4096)
    text_weight: float = 1.0  # weight of the image-vs-text loss next to image-vs-GPS
    val_fraction: float = 0.1  # held-out rows for the reported accuracy
    pca_rows: int = 50_000  # training rows sampled to fit the standardisation and PCA
    eval_queries: int = 10_000  # held-out rows scored (a sample if there are more)
    eval_gallery: int = 200_000  # training rows searched by the 1-NN metric (a sample if there are more)
    seed: int = 0

    def __post_init__(self) -> None:
        # batch_size 0 divided by zero, a negative queue_size failed inside torch
        least = {"epochs": 0, "batch_size": 1, "queue_size": 0, "pca_rows": 1, "eval_queries": 1,
                 "eval_gallery": 1}  # fmt: skip
        for name, low in least.items():
            value = getattr(self, name)
            if not is_whole(value, low):
                raise GeoTokenError(f"align: {name} must be an integer >= {low}, got {value!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise GeoTokenError(f"align: lr must be a finite number > 0, got {self.lr}")
        if not 0 < self.val_fraction < 1:
            raise GeoTokenError(f"align: val_fraction must be in (0, 1), got {self.val_fraction}")


# ------------------------------------------------------------------------------------------------- targets
def unique_rows(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unique values, inverse (N,) int64): the targets are computed once per distinct value."""
    uniq, inverse = np.unique(values, axis=0 if values.ndim > 1 else None, return_inverse=True)
    return uniq, inverse.reshape(-1).astype(np.int64)


@torch.no_grad()
def _device_of(module) -> torch.device:
    """Where a module's weights live (CPU for one without parameters, or a plain callable)."""
    params = getattr(module, "parameters", None)
    first = next(iter(params()), None) if callable(params) else None
    return first.device if first is not None else torch.device("cpu")


def _move(module, device: torch.device):
    """`module.to(device)` for torch modules; other callables (test doubles) are left as they are."""
    return module.to(device) if isinstance(module, torch.nn.Module) else module


@torch.no_grad()
def gps_table(encoder, coords: np.ndarray, batch: int = 8192, progress: bool = False) -> torch.Tensor:
    """L2-normalised GPS embeddings (M, 512) of coordinates (M, 2) lat/lon degrees, computed (and
    returned) on the encoder's device."""
    device = _device_of(encoder)
    out = []
    for start in tqdm(range(0, len(coords), batch), desc="gps targets", disable=not progress):
        latlon = torch.tensor(np.asarray(coords[start : start + batch]), dtype=torch.float32, device=device)
        out.append(F.normalize(encoder(latlon), dim=-1))
    return torch.cat(out) if out else torch.zeros(0, encoder.dim, device=device)


def gallery_gps_table(encoder, coords: np.ndarray, progress: bool = False) -> torch.Tensor:
    """`gps_table` of the image->GPS metric's gallery, cached under the cache folder by the encoder's weights
    and the coordinates: GeoCLIP's 100K points take ~12 s on 2 CPU cores, on every `align train`. A cached
    table is used only if the encoder gives its first rows again (state outside the weights changes them)."""
    latlon = torch.tensor(np.asarray(coords), dtype=torch.float32)  # (M, 2), what the cache file holds
    points = hashlib.sha256(latlon.numpy().data).hexdigest()
    identity = {"class": type(encoder).__qualname__, "weights": module_key(encoder), "latlon_sha256": points}
    key = sha256_json({"format": CACHE_FORMAT, "gps_table": identity})
    path = default_cache_dir() / "gps-tables" / f"{key[:16]}.safetensors"
    cached = read_cached_gallery(path, key, latlon)
    if cached is not None:
        cached = cached.to(_device_of(encoder))
        probe = gps_table(encoder, coords[:8]).float()
        if torch.allclose(cached[: len(probe)], probe, rtol=0, atol=1e-5):
            return cached
    table = gps_table(encoder, coords, progress=progress)
    try:
        write_cached_gallery(path, key, latlon, table.float().cpu())
    except OSError as e:  # a read-only cache costs time on the next run, not this one
        warnings.warn(f"align: cannot write the GPS table cache {path}: {e}", stacklevel=2)
    return table


def text_targets(
    text_encoder, coords: np.ndarray, template: str, texts: list[str] | None = None
) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """(embeddings of the unique descriptions (U, Dt), inverse (N,), the unique descriptions).

    The descriptions are `texts` (one per row) if given, else offline place names of the coordinates.
    """
    if texts is None:
        texts = describe(coords[:, 0], coords[:, 1], template=template)
    if len(texts) != len(coords):
        raise GeoTokenError(f"{len(texts)} texts for {len(coords)} rows")
    texts, inverse = unique_rows(np.asarray(texts, dtype=np.str_))
    return text_encoder.encode(texts.tolist()).float(), inverse, texts.tolist()


# ------------------------------------------------------------------------------------------------- losses
def info_nce(
    image: torch.Tensor,
    target: torch.Tensor,
    group: torch.Tensor,
    scale: torch.Tensor,
    queue: torch.Tensor | None = None,
    queue_group: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE between image embeddings (B, D) and their targets (B, D), unit vectors.

    group (B,): target identity (same coordinates / same description); other items of the same group
    are masked out of both softmaxes. queue (Q, D), queue_group (Q,): extra negatives for image->target.
    """
    b = len(image)
    bank, bank_group = target, group
    if queue is not None and len(queue):
        bank, bank_group = torch.cat([target, queue]), torch.cat([group, queue_group])
    eye = torch.eye(b, len(bank), dtype=torch.bool, device=image.device)
    logits = scale * image @ bank.T  # (B, B + Q)
    logits = logits.masked_fill((group[:, None] == bank_group[None, :]) & ~eye, float("-inf"))
    labels = torch.arange(b, device=image.device)
    to_image = (scale * target @ image.T).masked_fill(
        (group[:, None] == group[None, :]) & ~eye[:, :b], float("-inf")
    )
    return (F.cross_entropy(logits, labels) + F.cross_entropy(to_image, labels)) / 2


class Queue:
    """FIFO of the most recent target embeddings (Q, D) and their groups, as extra negatives."""

    def __init__(self, size: int, dim: int, device: torch.device):
        self.items = torch.zeros(size, dim, device=device)
        self.groups = torch.full((size,), -1, dtype=torch.int64, device=device)
        self.size, self.ptr, self.filled = size, 0, 0

    def push(self, items: torch.Tensor, groups: torch.Tensor) -> None:
        if self.size == 0:  # queue_size 0: in-batch negatives only
            return
        items, groups = items[-self.size :], groups[-self.size :]
        idx = (self.ptr + torch.arange(len(items), device=items.device)) % self.size
        self.items[idx], self.groups[idx] = items, groups
        self.ptr = (self.ptr + len(items)) % self.size
        self.filled = min(self.size, self.filled + len(items))

    def get(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.items[: self.filled], self.groups[: self.filled]


CHECKPOINT = "checkpoint"  # in the heads folder while training: the state after the last whole epoch


@dataclass
class TrainingState:
    """What an epoch of `train_heads` leaves behind, saved whole after each one (`save`) so that a killed
    run goes on from the last (`resume`) and ends with the heads an unbroken run would have."""

    heads: AlignHeads
    opt: torch.optim.Optimizer
    sched: Any
    queue: Queue
    rng: np.random.Generator
    history: list

    def save(self, folder: Path, identity: dict) -> None:
        with atomic_dir(folder) as tmp:
            tensors = {
                f"heads.{k}": v.detach().cpu().contiguous() for k, v in self.heads.state_dict().items()
            }
            tensors |= optimizer_tensors(self.opt) | {"rng.torch": torch.get_rng_state()}
            tensors |= {"queue.items": self.queue.items.cpu(), "queue.groups": self.queue.groups.cpu()}
            if torch.cuda.is_available():  # dropout on a GPU draws from its own generator
                tensors["rng.cuda"] = torch.cuda.get_rng_state()
            save_file(tensors, str(tmp / "state.safetensors"))
            write_json(tmp / "state.json", {
                "identity": identity, "history": self.history, "param_groups": self.opt.state_dict()["param_groups"],
                "sched": self.sched.state_dict(), "queue": [self.queue.ptr, self.queue.filled],
                "rng": self.rng.bit_generator.state,
            })  # fmt: skip

    def resume(self, folder: Path, identity: dict) -> int:
        """The epoch to start from: the checkpoint's, restored into this state, if it is this run's (same
        options, heads, store, texts and GPS encoder); else 0 (a checkpoint of another run is dropped)."""
        if not (folder / "state.json").is_file():
            return 0
        try:
            state = read_json(folder / "state.json")
            tensors = read_safetensors(folder / "state.safetensors")
        except GeoTokenError:  # a damaged checkpoint: from the start
            return 0
        if state.get("identity") != identity:
            shutil.rmtree(folder, ignore_errors=True)
            return 0
        device = self.queue.items.device
        self.heads.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("heads.")})
        load_optimizer(self.opt, tensors, state["param_groups"])
        self.sched.load_state_dict(state["sched"])
        self.queue.items, self.queue.groups = (
            tensors["queue.items"].to(device),
            tensors["queue.groups"].to(device),
        )
        self.queue.ptr, self.queue.filled = state["queue"]
        torch.set_rng_state(tensors["rng.torch"])
        if "rng.cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["rng.cuda"])
        self.rng.bit_generator.state = state["rng"]
        self.history[:] = state["history"]
        return len(self.history)


# ------------------------------------------------------------------------------------------------- metrics
def accuracy_km(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """Share of rows within each threshold and the median error: pred, true (N, 2) lat/lon degrees."""
    km = haversine_km(pred[:, 0], pred[:, 1], true[:, 0], true[:, 1])
    out = {f"acc_{t}km": float(np.mean(km <= t)) for t in THRESHOLDS_KM}
    return {**out, "median_km": float(np.median(km)), "n": len(km)}


@torch.no_grad()
def top1(queries: torch.Tensor, gallery: torch.Tensor, batch: int = 4096) -> np.ndarray:
    """Row of the most similar gallery vector for each query (cosine; inputs are unit vectors)."""
    return torch.cat([(q @ gallery.T).argmax(1) for q in queries.split(batch)]).cpu().numpy()


@torch.no_grad()
def embed_rows(
    heads: AlignHeads, features: np.ndarray, rows: np.ndarray, batch: int = 8192
) -> dict[str, torch.Tensor]:
    """Heads' outputs plus the normalised raw `features`, for the given store rows."""
    device = heads.mean.device
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(rows), batch):
        x = torch.from_numpy(read_rows(features, rows[start : start + batch])).to(device)
        out = {"features": F.normalize(heads.standardise(x), dim=-1), **heads(x)}
        out["visual+gps"] = torch.cat([out["visual"], out["gps"]], 1) / math.sqrt(2)
        for name, value in out.items():
            parts.setdefault(name, []).append(value)
    return {name: torch.cat(values) for name, values in parts.items()}


def evaluate_heads(
    heads: AlignHeads,
    store: FeatureStore,
    val_rows: np.ndarray,
    train_rows: np.ndarray,
    gallery_gps: torch.Tensor,
    gallery_coords: np.ndarray,
) -> dict[str, Any]:
    """Held-out accuracy of image->GPS retrieval over a GPS gallery, and of 1-NN geolocation among the
    training images with each embedding (which one to index is decided from these numbers)."""
    heads.eval()
    coords = np.asarray(store.coords)
    val = embed_rows(heads, store["features"], val_rows)
    train = embed_rows(heads, store["features"], train_rows)
    pred = gallery_coords[top1(val["gps"], gallery_gps.to(val["gps"].device))]
    nn_1 = {
        name: accuracy_km(coords[train_rows[top1(val[name], train[name])]], coords[val_rows])
        for name in ("features", "visual", "gps", "text", "visual+gps")
    }
    return {
        "image_to_gps": accuracy_km(pred, coords[val_rows]),
        "gallery_size": len(gallery_coords),
        "nn_1": nn_1,
    }


# ------------------------------------------------------------------------------------------------- training
def _sample(rows: np.ndarray, n: int, seed: int) -> np.ndarray:
    """At most n of `rows` (sorted), a seeded draw: bounds evaluation time and memory on huge stores."""
    return rows if len(rows) <= n else np.sort(np.random.default_rng(seed).choice(rows, n, replace=False))


def split_rows(store: FeatureStore, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, held-out rows), both sorted, among the store's valid rows; a fixed seeded draw."""
    rows = np.flatnonzero(store.valid)
    perm = np.random.default_rng(seed).permutation(rows)
    n_val = int(round(len(rows) * val_fraction))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


@own_random_state
def train_heads(
    store: FeatureStore,
    out_dir: str | os.PathLike | None = None,
    config: AlignConfig | None = None,
    heads_config: dict[str, Any] | None = None,
    gallery_coords: np.ndarray | None = None,
    gps_encoder=None,
    text_encoder=None,
    texts: list[str] | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    geoclip_files: GeoCLIPFiles | None = None,
    overwrite: bool = False,
) -> tuple[AlignHeads, dict[str, Any]]:
    """Train AlignHeads on `store["features"]` with the store's coordinates; return (heads, metrics).

    heads_config: HeadsConfig fields to override (visual_dim, hidden, dropout, text_encoder, template,
        gps_head); text_encoder may be a name of TEXT_ENCODERS: "clip" then reads the store's CLIP backbone
        model. gps_head "geoclip" / "geoclip-finetune" (a 768-d clip store only) starts the GPS head from
        GeoCLIP's pretrained image head (`geoclip_files`, default the shipped ones) and keeps it frozen /
        fine-tunes it with the other heads; the weights are saved with the heads like any other.
    texts: one description per store row (e.g. MP16-Pro captions); default: offline place names.
    gallery_coords: (M, 2) GPS gallery for the image->GPS metric (default: GeoCLIP's 100K MP16 points).
    With `out_dir`, the heads are saved there and the metrics written to `metrics.json`; while it trains,
    `out_dir/checkpoint` holds the state after the last whole epoch, and a rerun of the same training goes
    on from there (`TrainingState`) to the heads an unbroken run gives. Finished heads in `out_dir` are not
    replaced unless `overwrite`: the stores aligned with them would be left pointing at other heads.
    """
    done = Path(out_dir) / "config.json" if out_dir is not None else None
    if done is not None and done.is_file() and not overwrite:
        was = read_json(done).get("store", {}).get("root", "?")
        raise GeoTokenError(
            f"{out_dir}: holds trained alignment heads already (of {was}); pass --overwrite (overwrite=True) to "
            "train them again, or write to a new folder"
        )
    config = config or AlignConfig()
    device = torch_device(device)
    torch.manual_seed(config.seed)
    features, coords = store["features"], np.asarray(store.coords)
    train_rows, val_rows = split_rows(store, config.val_fraction, config.seed)
    if len(train_rows) < 2 or len(val_rows) < 1:
        raise GeoTokenError(
            f"{store.root}: {len(train_rows)} training / {len(val_rows)} held-out rows; need more"
        )

    overrides = dict(heads_config or {})
    backbone = clip_spelled(store.header.get("backbone", {}))
    default_text = (
        {"name": "clip", "clip": backbone["clip"]} if backbone.get("name") == "clip" else {"name": "minilm"}
    )
    name = overrides.get("text_encoder")
    if name == "clip":
        if backbone.get("name") != "clip":
            raise GeoTokenError(
                f"{store.root}: the clip text encoder needs a store embedded with the clip backbone"
            )
        overrides["text_encoder"] = default_text
    elif isinstance(name, str):
        overrides["text_encoder"] = {"name": name}
    overrides.setdefault("text_encoder", default_text)
    gps_head = overrides.get("gps_head", "train")
    if gps_head not in GPS_HEADS:
        raise GeoTokenError(f"gps_head must be one of {', '.join(GPS_HEADS)}, got {gps_head!r}")
    if gps_head != "train" and (backbone.get("name") != "clip" or features.shape[1] != IMAGE_DIM):
        raise GeoTokenError(
            f"{store.root}: gps_head {gps_head!r} needs a store of {IMAGE_DIM}-d CLIP ViT-L/14 features "
            f"(backbone 'clip'), got {features.shape[1]}-d features of backbone {backbone.get('name')!r}"
        )
    if text_encoder is None:
        text_encoder = load_text_encoder(**overrides["text_encoder"])
    if gps_encoder is None:
        gps_encoder = load_gps_encoder()
    hc = HeadsConfig(
        in_dim=features.shape[1],
        gps_dim=gps_encoder.dim,
        text_dim=text_encoder.dim,
        backbone=backbone,
        **overrides,
    )
    fits = min(hc.visual_dim, hc.in_dim, len(train_rows))  # the PCA's components: no more than either
    if fits < hc.visual_dim and "visual_dim" in overrides:
        warnings.warn(
            f"align: visual_dim {hc.visual_dim} is more than the {hc.in_dim}-d features or the {len(train_rows):,} "
            f"training rows allow; the visual embedding is {fits}-d",
            stacklevel=2,
        )
    hc.visual_dim = fits
    heads = AlignHeads(hc)
    if gps_head != "train":
        pretrained = load_image_head((geoclip_files or GeoCLIPFiles.shipped()).image_head)
        heads.gps.load_state_dict(pretrained.state_dict(), strict=True)
        heads.gps.requires_grad_(gps_head == "geoclip-finetune")
    sample = np.sort(np.random.default_rng(config.seed).permutation(train_rows)[: config.pca_rows])
    heads.fit_input(read_rows(features, sample))
    heads.to(device)

    # frozen targets, once: unique coordinates and unique descriptions of all valid rows, computed on
    # the training device (4M MP16 coordinates through GeoCLIP's encoder, millions of captions)
    t0 = time.perf_counter()
    gps_encoder, text_encoder = _move(gps_encoder, device), _move(text_encoder, device)
    uniq_coords, coord_group = unique_rows(coords)
    # float16 tables: MP16 has ~4M distinct coordinates, 4 GB in half precision
    gps_targets = gps_table(gps_encoder, uniq_coords, progress=progress).half().to(device)  # (Ug, 512)
    text_emb, text_group, _ = text_targets(text_encoder, coords, hc.template, texts)
    text_emb = text_emb.half().to(device)  # (Ut, Dt)
    coord_group_t, text_group_t = (
        torch.from_numpy(coord_group).to(device),
        torch.from_numpy(text_group).to(device),
    )
    target_seconds = time.perf_counter() - t0

    params = [p for p in heads.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    batch = min(config.batch_size, len(train_rows))
    steps_per_epoch = len(train_rows) // batch
    total = max(1, steps_per_epoch * config.epochs)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )
    queue = Queue(config.queue_size, hc.gps_dim, device)
    rng = np.random.default_rng(config.seed)
    history = []
    run = TrainingState(heads, opt, sched, queue, rng, history)
    checkpoint = None if out_dir is None else Path(out_dir) / CHECKPOINT
    identity = {
        "config": asdict(config), "heads": asdict(hc), "store": store.header.get("manifest_hash"),
        "rows": store.rows, "texts": None if texts is None else sha256_json(list(texts)),
        "gps_encoder": module_key(gps_encoder) if isinstance(gps_encoder, torch.nn.Module) else None,
    }  # fmt: skip
    identity = json.loads(json.dumps(identity, default=str))
    start = run.resume(checkpoint, identity) if checkpoint is not None else 0
    bar = tqdm(total=total, initial=start * steps_per_epoch, desc="align", unit="step", disable=not progress)
    for epoch in range(start, config.epochs):
        heads.train()
        perm = rng.permutation(train_rows)
        losses = []
        for step in range(steps_per_epoch):
            rows = np.sort(perm[step * batch : (step + 1) * batch])
            x = torch.from_numpy(read_rows(features, rows)).to(device)  # (B, F)
            rows_t = torch.from_numpy(rows).to(device)
            g, t = coord_group_t[rows_t], text_group_t[rows_t]  # (B,) target ids
            out = heads(x)
            gps_t, text_t = gps_targets[g].float(), text_emb[t].float()  # (B, 512), (B, Dt)
            loss_gps = info_nce(
                out["gps"], gps_t, g, heads.gps_logit_scale.exp().clamp(max=100), *queue.get()
            )
            loss_text = info_nce(out["text"], text_t, t, heads.text_logit_scale.exp().clamp(max=100))
            loss = loss_gps + config.text_weight * loss_text
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            queue.push(gps_t.detach(), g)
            losses.append([loss_gps.item(), loss_text.item()])
            bar.update()
        mean = np.mean(losses, axis=0) if losses else [float("nan")] * 2
        history.append({"epoch": epoch + 1, "loss_gps": float(mean[0]), "loss_text": float(mean[1])})
        bar.set_postfix(gps=f"{mean[0]:.3f}", text=f"{mean[1]:.3f}")
        if checkpoint is not None and epoch + 1 < config.epochs:  # killed later, a rerun goes on from here
            run.save(checkpoint, identity)
    bar.close()

    if gallery_coords is None:
        gallery_coords = np.loadtxt(mp16_coordinates_csv(), delimiter=",", skiprows=1, dtype=np.float64)
    gallery_coords = np.asarray(gallery_coords, dtype=np.float64)
    gallery_gps = gallery_gps_table(gps_encoder, gallery_coords, progress=progress)
    metrics = {
        "rows": {"train": len(train_rows), "val": len(val_rows), "skipped": int((~store.valid).sum())},
        "targets": {
            "unique_coords": len(uniq_coords),
            "unique_texts": len(text_emb),
            "seconds": target_seconds,
        },
        **evaluate_heads(
            heads,
            store,
            _sample(val_rows, config.eval_queries, config.seed),
            _sample(train_rows, config.eval_gallery, config.seed),
            gallery_gps,
            gallery_coords,
        ),
        "history": history,
        "config": asdict(config),
    }
    heads.eval()
    if out_dir is not None:
        heads.save(
            out_dir, store={"root": str(store.root), "manifest_hash": store.header.get("manifest_hash")}
        )
        write_json(Path(out_dir) / "metrics.json", metrics)
        shutil.rmtree(Path(out_dir) / CHECKPOINT, ignore_errors=True)
    return heads, metrics


# ------------------------------------------------------------------------------------------------- apply
@torch.no_grad()
def apply_heads(
    heads: AlignHeads,
    store: FeatureStore,
    batch_size: int = 8192,
    progress: bool = True,
    out: str | os.PathLike | None = None,
    info: dict[str, Any] | None = None,
) -> FeatureStore:
    """Write `visual`, `gps`, `text` (float16, L2-normalised) into `store`; skipped rows stay NaN.

    With `out`, `store` is only read: the arrays go into a new store folder `out` holding the same ids,
    coordinates, skipped rows, backbone and manifest hash (plus `info` in its header), and no `features`.
    Re-running recomputes everything (the arrays are marked complete only at the end).
    """
    features = store["features"]
    if features.shape[1] != heads.config.in_dim:
        raise GeoTokenError(
            f"{store.root}: features are {features.shape[1]}-d, the heads expect {heads.config.in_dim}"
        )
    if heads.config.backbone and clip_spelled(store.header.get("backbone")) != clip_spelled(
        heads.config.backbone
    ):
        raise GeoTokenError(
            f"{store.root}: field 'backbone' is {store.header.get('backbone')}, the heads were trained on "
            f"{heads.config.backbone}"
        )
    heads.eval()
    device = heads.mean.device
    made_by = heads.fingerprint()  # recorded with each array: bundles refuse a gallery of other heads
    if out is None:
        target = store
        for name, dim in heads.dims.items():
            target.add_array(name, dim, heads=made_by)
    else:
        header = {key: store.header[key] for key in ("backbone", "manifest_hash") if key in store.header}
        target = FeatureStore.create(
            out, store.ids, store.coords, heads.dims, **header, aligned_from=str(store.root), **(info or {})
        )
        target.header["skipped"] = list(store.skipped)
        for name in heads.dims:
            target.header["arrays"][name]["heads"] = made_by
        target.save_header()
    writers = {name: target.writer(name) for name in heads.dims}
    valid = store.valid
    try:
        for start in tqdm(
            range(0, store.rows, batch_size), desc="align apply", unit="batch", disable=not progress
        ):
            stop = min(store.rows, start + batch_size)
            x = torch.from_numpy(np.asarray(features[start:stop], dtype=np.float32)).to(device)
            ok = torch.from_numpy(valid[start:stop]).to(device)
            aligned = heads(torch.where(ok[:, None], x, 0.0))
            for name, value in aligned.items():
                value = value.masked_fill(~ok[:, None], float("nan"))
                writers[name].write(start, value.cpu().numpy().astype(np.float16))
    finally:
        for w in writers.values():
            w.close()
    for name in heads.dims:
        target.mark_complete(name)
    return target.reload()

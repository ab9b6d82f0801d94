"""Batched, resumable, multi-process extraction of backbone features into a feature store.

The rows are cut into fixed chunks of `batch_size` rows (chunk c = rows [c*B, (c+1)*B)); one chunk is
one forward pass. Because the chunk grid is stored in the header and never changes, a resumed or a
multi-process run puts exactly the same images in each batch as a single uninterrupted run, so the
float16 arrays come out byte-identical.

Progress: after a chunk's rows are written, the process's record `progress/rank-R.json` (done chunk
intervals + skipped rows) is replaced atomically. On start every process reads all records, the chunks
not yet done are split between the `world_size` processes, and each continues with its share. When all
are done, rank 0 merges the records into `store.json` and removes `progress/`.
"""

from __future__ import annotations

import csv
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from geotoken.data.images import open_image as default_open_image
from geotoken.devices import distributed, on_cuda, torch_device
from geotoken.encoders.backbones import backbone_source
from geotoken.encoders.base import clip_spelled
from geotoken.errors import GeoTokenError
from geotoken.features.store import SKIPPED, FeatureStore
from geotoken.io import atomic_open, read_json, write_json

PROGRESS = "progress"


# ------------------------------------------------------------------------------------------------- images
class _ImageRows(Dataset):
    """Row r -> (r, preprocessed image (3, H, W) or None, reason it could not be read or None)."""

    def __init__(self, images: Sequence[str], preprocess: Callable, open_image: Callable):
        self.images, self.preprocess, self.open_image = images, preprocess, open_image

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, row: int):
        try:
            with self.open_image(self.images[row]) as image:
                return row, self.preprocess(image.convert("RGB")), None
        except Exception as exc:  # noqa: BLE001 - any decode failure becomes a per-row report
            return row, None, f"{type(exc).__name__}: {exc}".strip()


class _Chunks:
    """Batch sampler: the row lists of the given chunks, made lazily (no 4.7M-row list in memory)."""

    def __init__(self, chunks: np.ndarray, batch_size: int, rows: int):
        self.chunks, self.batch_size, self.rows = chunks, batch_size, rows

    def __len__(self) -> int:
        return len(self.chunks)

    def __iter__(self):
        for c in self.chunks:
            yield list(range(c * self.batch_size, min((c + 1) * self.batch_size, self.rows)))


def _collate(items):
    """-> rows int64 (n,) of readable images, images (n, 3, H, W), [(row, reason)] of unreadable ones."""
    good = [(r, x) for r, x, _ in items if x is not None]
    bad = [(r, why) for r, x, why in items if x is None]
    rows = torch.tensor([r for r, _ in good], dtype=torch.int64)
    images = torch.stack([x for _, x in good]) if good else None
    return rows, images, bad


# ------------------------------------------------------------------------------------------------- progress
def _load_records(store: FeatureStore) -> list[dict[str, Any]]:
    folder = store.root / PROGRESS
    return [read_json(p) for p in sorted(folder.glob("rank-*.json"))] if folder.is_dir() else []


def _done_mask(records: list[dict[str, Any]], n_chunks: int) -> np.ndarray:
    done = np.zeros(n_chunks, dtype=bool)
    for record in records:
        for a, b in record["chunks"]:
            done[a:b] = True
    return done


def _identity(manifest, backbone, batch_size: int) -> dict[str, Any]:
    return {
        "manifest_hash": manifest.content_hash(),
        "backbone": backbone.config(),
        "chunk_rows": int(batch_size),
    }


def _open_or_create(out_dir: Path, manifest, backbone, identity: dict[str, Any]) -> FeatureStore:
    """Rank 0 only: reuse a store whose identity matches (resume), or create a new one."""
    if (out_dir / "store.json").is_file():
        store = FeatureStore.open(out_dir)
        finished = store.header["arrays"].get("features", {}).get("complete")
        embedded = "features" in store.header["arrays"] and "manifest_hash" in store.header  # embed's own
        if embedded and not finished and not any(r["chunks"] for r in _load_records(store)):
            # a run that stopped before its first batch (a wrong image path, say): nothing to keep
            shutil.rmtree(store.root / PROGRESS, ignore_errors=True)
            return _create(out_dir, manifest, backbone, identity)
        for key, want in identity.items():
            have = store.header.get(key)
            if key == "backbone":  # a store written before CLIP's weights were spelled `clip`
                have = clip_spelled(have)
            if have != want and not (finished and key == "chunk_rows"):  # batches matter mid-run only
                hint = (
                    f"resume with --batch-size {have} (it fixes which images share a batch) or use a new output folder"
                    if key == "chunk_rows"
                    else "use a new output folder"
                )
                raise GeoTokenError(
                    f"{out_dir / 'store.json'}: field {key!r} is {have!r}, this run has {want!r}; {hint}"
                )
        return store
    return _create(out_dir, manifest, backbone, identity)


def _create(out_dir: Path, manifest, backbone, identity: dict[str, Any]) -> FeatureStore:
    """A new store for `manifest`'s rows, its header recording `identity` (what a resume must match)."""
    coords = np.stack([np.asarray(manifest.lat, np.float64), np.asarray(manifest.lon, np.float64)], axis=1)
    # where the weights were (a CLIP folder as an absolute path): a relative folder name read from another
    # working directory would pass for a hub id
    source = backbone_source(identity["backbone"])
    return FeatureStore.create(
        out_dir, manifest.ids, coords, {"features": backbone.dim}, **identity, backbone_source=source
    )


def _skipped(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted((s for r in records for s in r["skipped"]), key=lambda s: s["row"])


def _write_skipped(store: FeatureStore, skipped: list[dict[str, Any]], manifest) -> None:
    """skipped.csv, for people: the 1-based manifest row the messages name, the id, the image, the reason
    (store.json's `skipped` keeps the 0-based array rows the code reads)."""
    with atomic_open(store.root / SKIPPED, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["manifest_row", "id", "image", "reason"])
        writer.writerows([s["row"] + 1, s["id"], manifest.images[s["row"]], s["reason"]] for s in skipped)


def _check_some_embedded(store: FeatureStore, manifest, rank: int) -> None:
    """--skip-bad that skipped every row leaves a store of NaNs that every later step would choke on: stop
    here, with the first reason (usually a wrong image root), and list them all in skipped.csv."""
    skipped = _skipped(_load_records(store))
    if not store.rows or len(skipped) < store.rows:
        return
    if rank == 0:
        _write_skipped(store, skipped, manifest)
    first = skipped[0]
    raise GeoTokenError(
        f"{store.root}: every image was unreadable ({store.rows} of {store.rows} skipped, listed in "
        f"{store.root / SKIPPED}); first: manifest row {first['row'] + 1} (id {str(first['id'])!r}): "
        f"{str(manifest.images[first['row']])!r}: {first['reason']}; check the manifest's image paths"
    )


def _finish(store: FeatureStore, n_chunks: int, manifest) -> None:
    """Rank 0 only: check every chunk is done, merge skipped rows into the header, write skipped.csv."""
    records = _load_records(store)
    missing = np.flatnonzero(~_done_mask(records, n_chunks))
    if len(missing):
        raise GeoTokenError(
            f"{store.root}: {len(missing)} chunks not embedded (first: {missing[0]}); rerun to resume"
        )
    skipped = _skipped(records)
    if skipped:
        _write_skipped(store, skipped, manifest)
    store.header["skipped"] = skipped
    store.mark_complete("features")
    for path in (store.root / PROGRESS).glob("*"):
        path.unlink()
    (store.root / PROGRESS).rmdir()


# ------------------------------------------------------------------------------------------------- embed
def embed(
    manifest,
    backbone,
    out_dir: str | os.PathLike,
    batch_size: int = 64,
    num_workers: int = 2,
    skip_bad: bool = False,
    device: str | torch.device | None = None,
    progress: bool = True,
    open_image: Callable | None = None,
) -> FeatureStore:
    """Embed every image of `manifest` with `backbone` into the store at `out_dir` (resumes if present).

    manifest: a `geotoken.data.manifest.Manifest` (ids, lat, lon, image references).
    backbone: `.dim`, `.config()`, `.preprocess(PIL) -> (3, H, W)`, `.forward((B, 3, H, W)) -> (B, dim)`.
    An unreadable image raises GeoTokenError naming its row, id and reason; with `skip_bad=True` it is
    recorded in the header and in `skipped.csv`, and its row is NaN. Under torchrun (or RANK/WORLD_SIZE),
    each process embeds its share of the chunks into the same store, on its own GPU (LOCAL_RANK) when
    `device` is None / "auto".
    """
    if open_image is None:
        open_image = default_open_image
    if batch_size < 1:
        raise GeoTokenError(f"batch size must be >= 1, got {batch_size}")
    if not len(manifest.ids):
        raise GeoTokenError(f"{manifest.source or 'the manifest'}: no rows to embed")
    out_dir = Path(out_dir)
    dist = distributed()  # under torchrun: joins the job, this process on GPU LOCAL_RANK
    device = torch_device(device)
    identity = _identity(manifest, backbone, batch_size)

    if dist.rank == 0:
        store = _open_or_create(out_dir, manifest, backbone, identity)
        if not store.header["arrays"]["features"]["complete"]:
            (out_dir / PROGRESS).mkdir(exist_ok=True)
    dist.barrier()  # the store exists from here on
    store = FeatureStore.open(out_dir)
    if store.header["arrays"]["features"]["complete"]:
        return store

    n_chunks = -(-store.rows // batch_size)
    todo = np.flatnonzero(~_done_mask(_load_records(store), n_chunks))
    mine = np.array_split(todo, dist.world)[dist.rank]
    record_path = out_dir / PROGRESS / f"rank-{dist.rank}.json"
    record = read_json(record_path) if record_path.is_file() else {"chunks": [], "skipped": []}
    dist.barrier()  # everyone has read the records before anyone writes one

    loader = DataLoader(
        _ImageRows(manifest.images, backbone.preprocess, open_image),
        batch_sampler=_Chunks(mine, batch_size, store.rows),
        num_workers=num_workers,
        collate_fn=_collate,
    )
    model = backbone.to(device).eval() if hasattr(backbone, "to") else backbone
    amp = torch.bfloat16 if on_cuda(device) and torch.cuda.is_bf16_supported() else torch.float16
    ids = store.ids
    total = int(sum(min(batch_size, store.rows - c * batch_size) for c in mine))
    desc = f"embed (rank 0's share of {dist.world})" if dist.world > 1 else "embed"  # one bar a terminal
    with (
        store.writer("features") as writer,
        tqdm(total=total, unit="img", desc=desc, disable=not progress or dist.rank > 0) as bar,
        torch.no_grad(),
    ):
        for chunk, (rows, images, bad) in zip(mine, loader):
            if bad and not skip_bad:
                row, why = bad[0]
                raise GeoTokenError(
                    f"manifest row {row + 1} of {store.rows} (id {str(ids[row])!r}): cannot read image {str(manifest.images[row])!r}: "
                    f"{why}"
                    f" (pass --skip-bad to record and skip unreadable images)"
                )
            start = int(chunk) * batch_size
            block = np.full((min(batch_size, store.rows - start), backbone.dim), np.nan, dtype=np.float16)
            if images is not None:
                with torch.autocast(device.type, dtype=amp, enabled=on_cuda(device)):
                    out = model.forward(images.to(device, non_blocking=True))  # (n, dim)
                block[rows.numpy() - start] = out.float().cpu().numpy().astype(np.float16)
            writer.write(start, block)
            writer.sync()
            # commit: this chunk (and its skipped rows) is done
            chunks = record["chunks"]
            if chunks and chunks[-1][1] == chunk:
                chunks[-1][1] = int(chunk) + 1
            else:
                chunks.append([int(chunk), int(chunk) + 1])
            record["skipped"] += [{"id": ids[r], "row": int(r), "reason": why} for r, why in bad]
            write_json(record_path, record)
            bar.update(len(block))

    dist.barrier()  # every record is written: each process sees the same skipped rows
    _check_some_embedded(store, manifest, dist.rank)
    if dist.rank == 0:
        _finish(store, n_chunks, manifest)
    dist.barrier()
    return FeatureStore.open(out_dir)

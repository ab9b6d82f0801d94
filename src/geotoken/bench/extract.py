"""Extraction benchmark: images/s of each backbone at the sizes used, forward pass alone and end to end.

End to end is `embed` over real JPEG files (the shipped sample photo, cropped differently per file):
decode + preprocess in DataLoader workers, forward, float16 write, progress records. Forward alone is
the same batch size on a ready tensor, so the ratio shows how much the data path costs.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from geotoken import assets
from geotoken.bench.common import set_threads
from geotoken.data.manifest import Manifest
from geotoken.devices import resolve_device
from geotoken.encoders import load_backbone
from geotoken.features import embed


def _jpegs(folder: Path, n: int, side: int = 320) -> list[str]:
    """n different JPEGs made from the shipped sample photo (random crops, resized to `side`)."""
    photo = Image.open(assets.sample_image()).convert("RGB")
    rng = np.random.default_rng(0)
    w, h = photo.size
    paths = []
    for i in range(n):
        cw, ch = int(w * rng.uniform(0.5, 1)), int(h * rng.uniform(0.5, 1))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        path = folder / f"{i:05d}.jpg"
        photo.crop((x, y, x + cw, y + ch)).resize((side, side)).save(path, quality=90)
        paths.append(str(path))
    return paths


def bench_extract(
    backbones: list[tuple[str, dict[str, Any]]] | None = None,
    batch_size: int = 32,
    images: int = 256,
    workers: int = 2,
    threads: int = 0,
    iters: int = 3,
    device: str = "cpu",
) -> dict[str, Any]:
    """{batch_size, images, workers, threads, device, backbones: {label: {dim, image_size,
    forward_images_per_s, end_to_end_images_per_s, end_to_end_over_forward}}}, one label per (backbone name,
    options) ("efficientnet-lite0 image_size=224"); backbones None: efficientnet-lite0 at 224, 128 and 64 px.
    threads 0: torch's current setting."""
    threads = set_threads(threads)
    device = resolve_device(device)  # a GPU this machine lacks: said in a line, not torch's assertion
    backbones = backbones or [("efficientnet-lite0", {"image_size": s}) for s in (224, 128, 64)]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = _jpegs(tmp, images)
        manifest = Manifest([f"b{i}" for i in range(images)], np.zeros(images), np.zeros(images), paths)
        for name, options in backbones:
            backbone = load_backbone(name, **options).to(device).eval()
            label = name + "".join(f" {k}={v}" for k, v in options.items())
            x = torch.randn(batch_size, 3, backbone.image_size, backbone.image_size, device=device)
            times = []
            with torch.no_grad():
                backbone.forward(x)  # warm-up
                for _ in range(iters):
                    t0 = time.perf_counter()
                    backbone.forward(x)
                    times.append(time.perf_counter() - t0)
            forward = batch_size / statistics.median(times)
            out = tmp / f"store-{len(results)}"
            t0 = time.perf_counter()
            embed(manifest, backbone, out, batch_size, workers, device=device, progress=False)
            end_to_end = images / (time.perf_counter() - t0)
            results[label] = {
                "dim": backbone.dim,
                "image_size": backbone.image_size,
                "forward_images_per_s": round(forward, 1),
                "end_to_end_images_per_s": round(end_to_end, 1),
                "end_to_end_over_forward": round(end_to_end / forward, 3),
            }
    return {"batch_size": batch_size, "images": images, "workers": workers, "threads": threads,
            "device": device, "backbones": results}  # fmt: skip

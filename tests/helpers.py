"""Builders shared by the test modules: feature stores, tiny models, a small Geolocator, images, ports.

conftest.py wraps them as fixtures; a test imports one directly (`from helpers import ...`) only where a
plain function is clearer: inside a module-scoped fixture, a data recipe, or a worker subprocess. No test
module imports another test module.
"""

from __future__ import annotations

import io
import os
import socket
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from geotoken import s2
from geotoken.features import FeatureStore
from geotoken.gallery import Gallery
from geotoken.model import GeoToken, preset
from geotoken.predict import Geolocator
from geotoken.search.options import SearchOptions

# the modalities of the small models and galleries below (decode, predict, reward tests)
DIMS = {"visual": 16, "gps": 16, "text": 8}


# --------------------------------------------------------------------------------------------- feature stores
def write_store(
    root: str | os.PathLike,
    arrays: Mapping[str, np.ndarray],
    *,
    ids: Sequence[str] | None = None,
    coords: np.ndarray | None = None,
    skipped: Sequence[int] = (),
    **info,
) -> FeatureStore:
    """A complete feature store at `root` holding `arrays` {name: (N, dim)} (stored as float16).

    ids default to g0..g{N-1}, coords to zeros; rows in `skipped` are recorded as skipped (reason 'test');
    `info` goes into the header (e.g. backbone={...}). Returns the store as `FeatureStore.open` reads it.
    """
    n = len(next(iter(arrays.values())))
    ids = [f"g{i}" for i in range(n)] if ids is None else list(ids)
    coords = np.zeros((n, 2)) if coords is None else coords
    store = FeatureStore.create(root, ids, coords, {k: v.shape[1] for k, v in arrays.items()}, **info)
    for name, values in arrays.items():
        with store.writer(name) as w:
            w.write(0, values)
        store.mark_complete(name)
    if skipped:
        store.header["skipped"] = [{"row": r, "id": ids[r], "reason": "test"} for r in skipped]
        store.save_header()
    return FeatureStore.open(root)


# --------------------------------------------------------------------------------------------- models
def tiny_model(
    modalities: Mapping[str, int] = DIMS,
    k: int = 3,
    *,
    head_std: float | None = None,
    seed: int = 0,
    **config,
) -> GeoToken:
    """A `tiny`-preset GeoToken in eval mode, built after `torch.manual_seed(seed)`; `config` overrides
    preset fields (level, group, dropout, ...). The output heads start at zero: `head_std` draws them from
    N(0, head_std) so the token distributions have some shape."""
    torch.manual_seed(seed)
    model = GeoToken(preset("tiny", modalities=modalities, k=k, **config)).eval()
    if head_std is not None:
        with torch.no_grad():
            model.head_w.normal_(0, head_std)
    return model


class TinyBackbone(torch.nn.Module):
    """A deterministic stand-in for an image backbone (same interface as geotoken.encoders)."""

    name = "tiny"
    dim = 24

    def __init__(self, fail_after: int | None = None):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(3, self.dim, 3, stride=2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g))
            self.conv.bias.copy_(torch.randn(self.dim, generator=g))
        self.calls, self.fail_after = 0, fail_after

    def config(self) -> dict:
        return {"name": self.name, "image_size": 16}

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        x = np.asarray(image.resize((16, 16)), dtype=np.float32) / 255.0
        return torch.from_numpy(x).permute(2, 0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("simulated crash")
        return self.conv(x).mean(dim=(2, 3))


class Heads(nn.Module):
    """Stand-in for geotoken.align.AlignHeads: features -> L2-normalised embeddings per modality."""

    def __init__(self, features: int):
        super().__init__()
        self.lin = nn.ModuleDict({m: nn.Linear(features, d) for m, d in DIMS.items()})

    def forward(self, f):
        return {m: F.normalize(lin(f), dim=-1) for m, lin in self.lin.items()}


class DotIndex:
    """Stand-in for geotoken.retrieval.NeighbourIndex: exact inner-product search."""

    def __init__(self, x):
        self.x = x

    def search(self, q, k):
        s = q @ self.x.T
        rows = np.argsort(-s, axis=1, kind="stable")[:, :k]
        return rows, np.take_along_axis(s, rows, 1).astype(np.float32)


def make_geolocator(backbone=None, calibration=None, **options) -> Geolocator:
    """A small real Geolocator from parts: a random tiny model (level 10), 60 random gallery rows over
    DIMS, exact search; with a backbone, stand-in heads map its features to the embeddings."""
    model = tiny_model(DIMS, k=3, head_std=0.5, dropout=0.0, level=10, group=2)
    cfg = model.cfg
    rng = np.random.default_rng(0)
    n = 60
    coords = np.c_[rng.uniform(-60, 60, n), rng.uniform(-180, 180, n)]
    gallery = {m: rng.standard_normal((n, d)).astype(np.float16) for m, d in DIMS.items()}
    tokens = s2.latlon_to_tokens(coords[:, 0], coords[:, 1], cfg.level, cfg.group)
    heads = Heads(backbone.dim).eval() if backbone is not None else None
    return Geolocator(
        model,
        Gallery(gallery, tokens, coords),
        index=DotIndex(gallery["visual"].astype(np.float32)),
        query_modalities=["visual"],
        backbone=backbone,
        heads=heads,
        calibration=calibration,
        options=SearchOptions(**options),
    )


# --------------------------------------------------------------------------------------------- images
def encode(image: Image.Image, format: str, **options) -> bytes:
    """The bytes of `image` saved in `format` ('JPEG', 'PNG') with Pillow's `options` (e.g. quality)."""
    buf = io.BytesIO()
    image.save(buf, format=format, **options)
    return buf.getvalue()


def noise_image(seed: int = 0, size: tuple[int, int] = (24, 16)) -> Image.Image:
    """Uniform RGB noise of size (width, height) from a seeded NumPy generator."""
    rgb = (np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8)
    return Image.fromarray(rgb)


def jpeg_bytes(seed: int = 0, size: tuple[int, int] = (24, 16), quality: int | None = 95) -> bytes:
    """A JPEG of `noise_image(seed, size)`; quality None = the encoder's default."""
    return encode(noise_image(seed, size), "JPEG", **({} if quality is None else {"quality": quality}))


def png_bytes(size: tuple[int, int] = (64, 48), color: tuple[int, int, int] = (20, 120, 200)) -> bytes:
    """A PNG of one solid colour."""
    return encode(Image.new("RGB", size, color), "PNG")


def speckle_image(size: tuple[int, int], sigma: float = 60) -> Image.Image:
    """Pillow's Gaussian noise image (grey-level, as RGB): a photo-sized stand-in with real entropy."""
    return Image.effect_noise(size, sigma).convert("RGB")


# --------------------------------------------------------------------------------------------- network
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

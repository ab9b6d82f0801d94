"""GeoCLIP (Vivanco et al., NeurIPS 2023) as a ready geolocator: photo -> top-k gallery coordinates.

- image: CLIP ViT-L/14 projected image features (768) -> GeoCLIP's image head, Linear(768, 768) + ReLU +
  Linear(768, 512) -> L2-normalised.
- gallery: ~100K MP16 coordinates -> GeoCLIP's location encoder (`geotoken.encoders.gps`) -> L2-normalised.
  Computed once per (location-encoder weights, gallery CSV) and cached as safetensors, never per call.
- logits = exp(logit_scale) * cosine; softmax over the whole gallery; top-k, exactly as GeoCLIP's `predict`.

Every weight comes from the `geoclip` wheel by default (`GeoCLIPFiles.shipped()`), read with
`torch.load(weights_only=True)` and loaded strictly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from geotoken import assets
from geotoken.encoders.backbones import load_backbone
from geotoken.encoders.base import ImageBackbone, default_cache_dir
from geotoken.encoders.clip import PAPER_MODEL, tower_config
from geotoken.encoders.gps import GPSEncoder, check_latlon, load_gps_encoder
from geotoken.errors import GeoTokenError
from geotoken.io import atomic_path, sha256_file, sha256_json

IMAGE_DIM = 768  # CLIP ViT-L/14's projected image features
# the vision tower GeoCLIP's image head was trained behind (PAPER_MODEL's config)
VIT_L14 = {
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "patch_size": 14,
    "image_size": 224,
    "projection_dim": 768,
}
EMBED_DIM = 512  # GeoCLIP's shared image/location space
CACHE_FORMAT = "geotoken/geoclip-gallery/1"  # bump when the cached computation changes
IMAGE_HEAD_KEYS = {"0.weight": (768, 768), "0.bias": (768,), "2.weight": (512, 768), "2.bias": (512,)}


def clip_mismatch(model: str, folder: str | None = None) -> str | None:
    """Why CLIP `model`'s features are not the ones GeoCLIP's image head was trained on (OpenAI's CLIP
    ViT-L/14 at 224 px), or None. Other 768-d towers (ViT-L/14 at 336 px, LAION's ViT-L/14) give features
    of the right shape that the head reads as noise. A hub id must be OpenAI's; a local folder, whose
    weights cannot be told apart, must hold a ViT-L/14 tower at 224 px; a folder that is gone (features
    embedded on another machine) cannot be checked. `folder`: where `model` was found when the features
    were embedded (absolute; a store's `backbone_source`), for a relative folder read from elsewhere."""
    if model == PAPER_MODEL:
        return None
    if not Path(model).is_dir():
        if folder is not None:
            model = folder
        if not Path(model).is_dir():
            if folder is not None or Path(model).is_absolute() or model.startswith("."):
                return None  # a folder of another machine
            return f"it is not {PAPER_MODEL}, the tower GeoCLIP's image head was trained behind"
    try:
        config = tower_config(model, "vision")
    except (OSError, ValueError) as exc:
        return f"its config cannot be read ({one_line(exc)})"
    got = {key: getattr(config, key, None) for key in VIT_L14}
    if got != VIT_L14:
        differ = ", ".join(f"{k} {got[k]} (not {v})" for k, v in VIT_L14.items() if got[k] != v)
        return f"its vision tower has {differ}; GeoCLIP's image head reads ViT-L/14 at 224 px"
    return None


@dataclasses.dataclass(frozen=True)
class GeoCLIPFiles:
    """The four files of a GeoCLIP release (see `shipped()` for the wheel's)."""

    image_head: Path  # state dict {0.weight, 0.bias, 2.weight, 2.bias}
    location_encoder: Path  # state dict LocEnc{0,1,2}.*
    logit_scale: Path  # a scalar tensor
    gallery: Path  # CSV with columns LAT,LON (degrees)

    @classmethod
    def shipped(cls) -> GeoCLIPFiles:
        """The pretrained files inside the installed `geoclip` wheel."""
        return cls(
            image_head=assets.geoclip_file("model", "weights", "image_encoder_mlp_weights.pth"),
            location_encoder=assets.geoclip_location_encoder_weights(),
            logit_scale=assets.geoclip_file("model", "weights", "logit_scale_weights.pth"),
            gallery=assets.mp16_coordinates_csv(),
        )

    def check(self) -> None:
        for field in dataclasses.fields(self):
            path = Path(getattr(self, field.name))
            if not path.is_file():
                raise GeoTokenError(f"GeoCLIP {field.name.replace('_', ' ')} file {path} does not exist")


class GeoCLIPTopK(NamedTuple):
    latlon: torch.Tensor  # (B, k, 2) float32 degrees, best first
    prob: torch.Tensor  # (B, k) softmax probability over the whole gallery
    index: torch.Tensor  # (B, k) int64 gallery rows


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _torch_load(path: Path, what: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise GeoTokenError(f"GeoCLIP {what} weights {path}: cannot be read: {one_line(e)}") from None


def image_head() -> nn.Sequential:
    return nn.Sequential(nn.Linear(IMAGE_DIM, 768), nn.ReLU(), nn.Linear(768, EMBED_DIM))


def load_image_head(path: str | os.PathLike) -> nn.Sequential:
    """GeoCLIP's trained image head, strictly: exactly its four tensors with their shapes."""
    path = Path(path)
    state = _torch_load(path, "image head")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise GeoTokenError(f"GeoCLIP image head weights {path}: expected a state dict of tensors")
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    if shapes != IMAGE_HEAD_KEYS:
        raise GeoTokenError(
            f"GeoCLIP image head weights {path}: expected tensors {IMAGE_HEAD_KEYS}, got {shapes}"
        )
    head = image_head()
    head.load_state_dict(state, strict=True)
    return head.requires_grad_(False).eval()


def load_logit_scale(path: str | os.PathLike) -> torch.Tensor:
    """GeoCLIP's learned temperature (log scale) as a float32 0-d tensor."""
    path = Path(path)
    value = _torch_load(path, "logit scale")
    if not isinstance(value, torch.Tensor) or value.numel() != 1 or not value.is_floating_point():
        raise GeoTokenError(f"GeoCLIP logit scale weights {path}: expected one floating-point number")
    value = value.detach().reshape(()).float()
    if not torch.isfinite(value):
        raise GeoTokenError(f"GeoCLIP logit scale weights {path}: not finite ({value.item()})")
    return value


def load_location_encoder(path: str | os.PathLike) -> GPSEncoder:
    path = Path(path)
    try:
        return load_gps_encoder(str(path))
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise GeoTokenError(f"GeoCLIP location encoder weights {path}: {one_line(e)}") from None


def read_gallery(path: str | os.PathLike) -> torch.Tensor:
    """(N, 2) float32 lat/lon degrees from a CSV with a header naming LAT and LON (any column order)."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            header = f.readline().strip().split(",")
    except (OSError, UnicodeDecodeError) as e:
        raise GeoTokenError(f"GeoCLIP gallery {path}: cannot be read: {one_line(e)}") from None
    if "LAT" not in header or "LON" not in header:
        raise GeoTokenError(f"GeoCLIP gallery {path}: header must name LAT and LON, got {header}")
    cols = (header.index("LAT"), header.index("LON"))
    try:
        values = np.loadtxt(path, delimiter=",", skiprows=1, usecols=cols, dtype=np.float64, ndmin=2)
    except (OSError, ValueError) as e:
        raise GeoTokenError(f"GeoCLIP gallery {path}: cannot be read: {one_line(e)}") from None
    if len(values) == 0:
        raise GeoTokenError(f"GeoCLIP gallery {path}: no rows")
    latlon = torch.from_numpy(values).float()  # float64 -> float32, as GeoCLIP converts its CSV
    try:
        check_latlon(latlon)
    except GeoTokenError as e:
        raise GeoTokenError(f"GeoCLIP gallery {path}: {e}") from None
    return latlon


def gallery_key(files: GeoCLIPFiles) -> str:
    """Identity of the cached gallery embeddings: the format and the SHA-256 of both input files."""
    return sha256_json(
        {
            "format": CACHE_FORMAT,
            "location_encoder_sha256": sha256_file(files.location_encoder),
            "gallery_sha256": sha256_file(files.gallery),
        }
    )


def _digest(embeddings: torch.Tensor) -> str:
    return hashlib.sha256(embeddings.contiguous().numpy().data).hexdigest()


@torch.no_grad()
def encode_gallery(encoder: GPSEncoder, latlon: torch.Tensor, chunk_size: int = 8192) -> torch.Tensor:
    """(N, 2) degrees -> (N, 512) L2-normalised location embeddings, in chunks (same numbers as one pass)."""
    parts = [encoder(latlon[i : i + chunk_size]) for i in range(0, len(latlon), chunk_size)]
    return F.normalize(torch.cat(parts), dim=1)


def read_cached_gallery(path: Path, key: str, latlon: torch.Tensor) -> torch.Tensor | None:
    """The cached embeddings if the file is whole and belongs to `key` and these coordinates, else None."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:  # metadata first: another key's file is not read
            meta = f.metadata() or {}
            if meta.get("format") != CACHE_FORMAT or meta.get("key") != key:
                return None
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (OSError, SafetensorError, ValueError, RuntimeError):
        return None
    emb, cached_latlon = tensors.get("embeddings"), tensors.get("latlon")
    if (
        set(tensors) != {"embeddings", "latlon"}
        or emb.dtype != torch.float32
        or emb.ndim != 2
        or len(emb) != len(latlon)
        or cached_latlon.dtype != torch.float32
        or not torch.equal(cached_latlon, latlon)
        or meta.get("embeddings_sha256") != _digest(emb)
    ):
        return None
    return emb


def module_key(module: nn.Module) -> str:
    """SHA-256 of a module's weights (names, dtypes, shapes and bytes): the identity of what it computes."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().data if tensor.numel() else b"")
    return digest.hexdigest()


def write_cached_gallery(path: Path, key: str, latlon: torch.Tensor, embeddings: torch.Tensor) -> None:
    meta = {"format": CACHE_FORMAT, "key": key, "embeddings_sha256": _digest(embeddings)}
    with atomic_path(path) as tmp:
        save_file({"embeddings": embeddings.contiguous(), "latlon": latlon.contiguous()}, tmp, metadata=meta)


class GeoCLIPGeolocator(nn.Module):
    """GeoCLIP's pretrained image head, temperature and gallery; `backbone` (CLIP ViT-L/14) for PIL images.

    After construction `cache_status` is "loaded" (the cached gallery embeddings were valid), "computed"
    (no cache yet) or "recomputed" (the cache was corrupt or for other inputs); `cache_path` is the file.
    """

    def __init__(
        self,
        files: GeoCLIPFiles | None = None,
        *,
        backbone: ImageBackbone | None = None,
        cache_dir: str | os.PathLike | None = None,
        chunk_size: int = 8192,
    ):
        super().__init__()
        files = files or GeoCLIPFiles.shipped()
        files.check()
        if backbone is not None and backbone.dim != IMAGE_DIM:
            raise GeoTokenError(
                f"GeoCLIP's image head takes {IMAGE_DIM}-d projected CLIP ViT-L/14 features; "
                f"backbone {backbone.config()} gives {backbone.dim}-d"
            )
        self.files, self.backbone = files, backbone
        self.head = load_image_head(files.image_head)
        self.register_buffer("logit_scale", load_logit_scale(files.logit_scale), persistent=False)
        latlon = read_gallery(files.gallery)
        self.key = gallery_key(files)
        cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.cache_path = cache_dir / "geoclip" / f"gallery-{self.key[:16]}.safetensors"
        embeddings = read_cached_gallery(self.cache_path, self.key, latlon)
        if embeddings is not None:
            self.cache_status = "loaded"
        else:
            self.cache_status = "recomputed" if self.cache_path.exists() else "computed"
            encoder = load_location_encoder(files.location_encoder)
            embeddings = encode_gallery(encoder, latlon, chunk_size)
            try:
                write_cached_gallery(self.cache_path, self.key, latlon, embeddings)
            except OSError as e:  # a read-only cache costs time on the next start, not this prediction
                warnings.warn(f"GeoCLIP: cannot write the gallery cache {self.cache_path}: {e}", stacklevel=2)
        self.register_buffer("latlon", latlon, persistent=False)  # (N, 2) degrees
        self.register_buffer("gallery", embeddings, persistent=False)  # (N, 512), unit norm
        self.requires_grad_(False).eval()

    @classmethod
    def load(
        cls,
        clip: str | os.PathLike = PAPER_MODEL,
        *,
        dtype: str = "float32",
        files: GeoCLIPFiles | None = None,
        cache_dir: str | os.PathLike | None = None,
        precision: str = "fp32",
        attention: str = "sdpa",
        runtime: str = "auto",
    ) -> GeoCLIPGeolocator:
        """With geotoken's CLIP backbone (`clip`: a local folder or hub id of CLIP ViT-L/14;
        `precision`, `attention`, `runtime`: see `geotoken.encoders.clip.CLIPBackbone`)."""
        problem = clip_mismatch(str(clip))
        if problem:  # a warning, not an error: small towers stand in for ViT-L/14 in tests and rehearsals
            warnings.warn(
                f"GeoCLIP: CLIP {str(clip)!r}: {problem}; its answers will mean little", stacklevel=2
            )
        backbone = load_backbone(
            "clip",
            clip=str(clip),
            dtype=dtype,
            precision=precision,
            attention=attention,
            runtime=runtime,
        )
        return cls(files, backbone=backbone, cache_dir=cache_dir)

    def __len__(self) -> int:
        return len(self.latlon)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, 768) projected CLIP image features -> (B, N) logits over the gallery."""
        if features.ndim != 2 or features.shape[1] != IMAGE_DIM:
            raise GeoTokenError(f"GeoCLIP: expected image features of shape (B, {IMAGE_DIM}), got {tuple(features.shape)}")  # fmt: skip
        image = F.normalize(self.head(features.to(self.gallery)), dim=1)
        return self.logit_scale.exp() * (image @ self.gallery.t())

    @torch.no_grad()
    def predict_features(self, features: torch.Tensor, k: int = 5) -> GeoCLIPTopK:
        """(B, 768) features -> the k most probable gallery coordinates per image."""
        if not 1 <= k <= len(self):
            raise GeoTokenError(f"GeoCLIP: k must be between 1 and {len(self)}, got {k}")
        top = torch.topk(self(features).softmax(dim=-1), k, dim=1)
        return GeoCLIPTopK(self.latlon[top.indices], top.values, top.indices)

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image], batch_size: int = 16) -> torch.Tensor:
        """PIL images -> (B, 768) float32 projected CLIP features, through the backbone's preprocessing."""
        if self.backbone is None:
            raise GeoTokenError("GeoCLIP: no image backbone; build with GeoCLIPGeolocator.load(clip)")
        if batch_size < 1:
            raise GeoTokenError(f"GeoCLIP: batch_size must be at least 1, got {batch_size}")
        parts = [
            self.backbone.embed(list(images[i : i + batch_size])) for i in range(0, len(images), batch_size)
        ]
        if not parts:
            return torch.zeros(0, IMAGE_DIM)
        return torch.cat(parts).float()

    @torch.no_grad()
    def predict_images(self, images: Sequence[Image.Image], k: int = 5, batch_size: int = 16) -> GeoCLIPTopK:
        """PIL images -> the k most probable gallery coordinates per image."""
        return self.predict_features(self.embed_images(images, batch_size), k)

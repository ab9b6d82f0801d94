"""Alignment heads: frozen backbone features (B, F) -> three L2-normalised embeddings per image.

- `gps` (512): an MLP trained so an image lands next to GeoCLIP's embedding of where it was taken; on a
  CLIP ViT-L/14 store it can instead be GeoCLIP's own pretrained image head (`gps_head`, see GPS_HEADS),
  which was trained against the same location encoder, frozen or fine-tuned. That head reads the raw
  projected CLIP features, as GeoCLIP does, not the standardised ones.
- `text` (Dt): an MLP trained so an image lands next to the text embedding of its place description.
- `visual` (Dv): a fixed PCA projection of the standardised features, not trained against any label.

Why `visual` is not trained: its job in GeoToken is to carry what the photo looks like, information that
the location- and text-supervised heads deliberately throw away (they pull every photo of a place
together). Training a third head against GPS would make it a near copy of `gps`; there are no augmented
views in a feature store to train an image-vs-image objective. PCA keeps the directions of largest
variance of the backbone features (a label-free, lossy compression to Dv dims) and cannot overfit the
alignment set. `geotoken align train` reports 1-NN geolocation with every embedding, so the choice is
measured, not assumed.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from geotoken.encoders.geoclip import IMAGE_DIM, image_head
from geotoken.errors import GeoTokenError
from geotoken.io import atomic_path, read_json, read_safetensors, write_json

WEIGHTS, CONFIG = "model.safetensors", "config.json"
# how the GPS-aligned head is made: "train" an MLP from scratch, or start from GeoCLIP's pretrained image
# head (CLIP ViT-L/14 stores only) and keep it frozen ("geoclip") or fine-tune it ("geoclip-finetune")
GPS_HEADS = ("train", "geoclip", "geoclip-finetune")


@dataclass
class HeadsConfig:
    """Shapes of the heads, plus what produced their inputs and targets (needed to use them later)."""

    in_dim: int  # backbone feature size F
    visual_dim: int = 512
    gps_dim: int = 512  # GeoCLIP's location embedding
    text_dim: int = 384  # the text encoder's output size (all-MiniLM-L6-v2: 384)
    hidden: int = 1024
    dropout: float = 0.1
    backbone: dict[str, Any] = field(default_factory=dict)  # the image backbone's config()
    text_encoder: dict[str, Any] = field(default_factory=lambda: {"name": "minilm"})
    template: str = "a photo taken in {city}, {region}, {country}"
    gps_head: str = "train"  # one of GPS_HEADS


def uses_geoclip_head(config: HeadsConfig) -> bool:
    """Whether the GPS head is GeoCLIP's image architecture (raw 768-d CLIP features -> 512)."""
    if config.gps_head not in GPS_HEADS:
        raise GeoTokenError(f"gps_head must be one of {', '.join(GPS_HEADS)}, got {config.gps_head!r}")
    return config.gps_head != "train"


def mlp(in_dim: int, hidden: int, out_dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim)
    )


class AlignHeads(nn.Module):
    """features (B, F) -> {"visual": (B, Dv), "gps": (B, 512), "text": (B, Dt)}, each L2-normalised."""

    def __init__(self, config: HeadsConfig):
        super().__init__()
        self.config = config
        f = config.in_dim
        # standardisation and PCA, fitted from training features by `fit_input`
        self.register_buffer("mean", torch.zeros(f))
        self.register_buffer("std", torch.ones(f))
        self.register_buffer("pca", torch.eye(f, config.visual_dim))  # (F, Dv)
        if uses_geoclip_head(config):
            if f != IMAGE_DIM or config.gps_dim != 512:
                raise GeoTokenError(
                    f"gps_head {config.gps_head!r} maps {IMAGE_DIM}-d CLIP features to 512, "
                    f"got in_dim {f} and gps_dim {config.gps_dim}"
                )
            self.gps = image_head()  # weights: GeoCLIP's, set by the trainer, or from the saved file
        else:
            self.gps = mlp(f, config.hidden, config.gps_dim, config.dropout)
        self.text = mlp(f, config.hidden, config.text_dim, config.dropout)
        # learned inverse temperatures of the two contrastive losses, CLIP's init (1 / 0.07)
        self.gps_logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))
        self.text_logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))

    @torch.no_grad()
    def fit_input(self, features: np.ndarray) -> None:
        """Set the standardisation and the PCA projection from a sample of training features (n, F)."""
        x = torch.as_tensor(np.asarray(features, dtype=np.float32))
        if len(x) < self.config.visual_dim:
            raise GeoTokenError(
                f"PCA to {self.config.visual_dim} dims needs at least that many training rows, got {len(x)}"
            )
        self.mean.copy_(x.mean(0))
        self.std.copy_(x.std(0).clamp_min(1e-6))
        z = (x - self.mean) / self.std  # (n, F)
        _, _, v = torch.linalg.svd(z.double(), full_matrices=False)  # rows of v: principal directions
        v = v[: self.config.visual_dim].T  # (F, Dv)
        v = v * torch.sign(v.sum(0, keepdim=True) + 1e-12)  # fix the sign of each direction: reproducible
        self.pca.copy_(v.float())

    def standardise(self, features: torch.Tensor) -> torch.Tensor:
        return (features.float() - self.mean) / self.std  # (B, F)

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.standardise(features)  # (B, F)
        gps_in = features.float() if uses_geoclip_head(self.config) else z  # GeoCLIP's head: raw features
        return {
            "visual": F.normalize(z @ self.pca, dim=-1),  # (B, Dv)
            "gps": F.normalize(self.gps(gps_in), dim=-1),  # (B, 512)
            "text": F.normalize(self.text(z), dim=-1),  # (B, Dt)
        }

    @property
    def dims(self) -> dict[str, int]:
        c = self.config
        return {"visual": c.visual_dim, "gps": c.gps_dim, "text": c.text_dim}

    def fingerprint(self) -> str:
        """A short hash of the weights and config: stores record the heads that wrote their arrays, so a
        bundle can refuse a gallery aligned by other (e.g. retrained) heads than the queries will be."""
        h = hashlib.sha256(json.dumps(asdict(self.config), sort_keys=True, default=str).encode())
        for name, t in sorted(self.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def joined_dim(self, modalities: list[str]) -> int:
        """Size of these embeddings joined (what an index over them holds); an unknown name is an error."""
        unknown = [m for m in modalities if m not in self.dims]
        if unknown:
            raise GeoTokenError(f"query embedding(s) {unknown}: the heads make {', '.join(self.dims)}")
        return sum(self.dims[m] for m in modalities)

    def save(self, out_dir: str | os.PathLike, **info: Any) -> Path:
        """`model.safetensors` + `config.json` (the HeadsConfig, plus `info`, e.g. training metrics)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        with atomic_path(out_dir / WEIGHTS) as tmp:
            save_file(state, str(tmp))
        write_json(out_dir / CONFIG, {"heads": asdict(self.config), **info})
        return out_dir

    @classmethod
    def load(cls, heads_dir: str | os.PathLike, device: str | torch.device = "cpu") -> AlignHeads:
        heads_dir = Path(heads_dir)
        if not (heads_dir / CONFIG).is_file() or not (heads_dir / WEIGHTS).is_file():
            raise GeoTokenError(f"{heads_dir}: not an alignment-heads folder (needs {CONFIG} and {WEIGHTS})")
        try:
            heads = cls(HeadsConfig(**read_json(heads_dir / CONFIG)["heads"]))
            heads.load_state_dict(read_safetensors(heads_dir / WEIGHTS), strict=True)
        except (KeyError, TypeError, RuntimeError) as exc:
            raise GeoTokenError(
                f"{heads_dir}: {CONFIG} and {WEIGHTS} do not make alignment heads: {exc}"
            ) from None
        return heads.to(device).eval()

"""GeoCLIP's pretrained location encoder: (lat, lon) degrees -> 512-d embedding.

A point is projected with the Equal Earth projection, then encoded at three scales (sigma = 1, 16,
256): random Fourier features cos/sin(2 pi B p) with a fixed Gaussian matrix B (256 x 2), an MLP
512 -> 1024 -> 1024 -> 1024 (ReLU) and a linear head to 512. The three scale outputs are summed, so
coarse branches separate continents and fine ones separate nearby cities. Weights (including each B)
come from the `geoclip` wheel and are loaded key by key, strictly.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from geotoken import assets
from geotoken.errors import GeoTokenError

# Equal Earth projection (Savric, Patterson & Jenny 2018) polynomial coefficients.
A1, A2, A3, A4 = 1.340264, -0.081106, 0.000893, 0.003796
SF = 66.50336  # GeoCLIP scales projected coordinates by SF / 180
SIGMAS = (2.0**0, 2.0**4, 2.0**8)


def equal_earth(latlon: torch.Tensor) -> torch.Tensor:
    """(N, 2) lat/lon degrees -> (N, 2) Equal Earth (x, y), scaled by 66.50336 / 180 as GeoCLIP does."""
    lat, lon = torch.deg2rad(latlon[:, 0]), torch.deg2rad(latlon[:, 1])
    theta = torch.asin(math.sqrt(3) / 2 * torch.sin(lat))
    x = (
        2
        * math.sqrt(3)
        * lon
        * torch.cos(theta)
        / (3 * (9 * A4 * theta**8 + 7 * A3 * theta**6 + 3 * A2 * theta**2 + A1))
    )
    y = A4 * theta**9 + A3 * theta**7 + A2 * theta**3 + A1 * theta
    return torch.stack((x, y), dim=1) * SF / 180  # (multiply, then divide: bit-identical to GeoCLIP)


class FourierBranch(nn.Module):
    """One scale: (N, 2) projected point -> cos/sin features (N, 512) -> MLP -> (N, 512)."""

    def __init__(self, sigma: float, n_freq: int = 256, hidden: int = 1024, out: int = 512):
        super().__init__()
        self.register_buffer("b", torch.randn(n_freq, 2) * sigma)  # (256, 2), replaced by the pretrained B
        self.mlp = nn.Sequential(
            nn.Linear(2 * n_freq, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(hidden, out)

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        v = 2 * math.pi * p @ self.b.T  # (N, 256)
        return self.head(self.mlp(torch.cat((torch.cos(v), torch.sin(v)), dim=-1)))  # (N, 512)


class GPSEncoder(nn.Module):
    dim = 512

    def __init__(self, sigmas: tuple[float, ...] = SIGMAS):
        super().__init__()
        self.sigmas = tuple(sigmas)
        self.branches = nn.ModuleList(FourierBranch(s) for s in self.sigmas)

    def forward(self, latlon: torch.Tensor) -> torch.Tensor:
        # latlon: (B, 2) degrees -> (B, 512), not normalised (callers L2-normalise)
        check_latlon(latlon)
        p = equal_earth(latlon.to(self.branches[0].b.dtype))  # (B, 2)
        return sum(branch(p) for branch in self.branches)


def check_latlon(latlon: torch.Tensor) -> None:
    """Raise GeoTokenError naming the first row that is not a finite lat in [-90, 90], lon in [-180, 180]."""
    if latlon.ndim != 2 or latlon.shape[1] != 2:
        raise GeoTokenError(f"GPS encoder: expected lat/lon of shape (B, 2), got {tuple(latlon.shape)}")
    lat, lon = latlon[:, 0], latlon[:, 1]
    bad = ~(torch.isfinite(latlon).all(dim=1) & (lat.abs() <= 90) & (lon.abs() <= 180))
    if bad.any():
        row = int(bad.nonzero()[0, 0])
        raise GeoTokenError(f"GPS encoder: row {row} has invalid lat/lon {latlon[row].tolist()} (degrees)")


def geoclip_key(key: str) -> str:
    """GeoCLIP state-dict key -> ours, e.g. LocEnc2.capsule.3.weight -> branches.2.mlp.2.weight."""
    rules = [
        (r"LocEnc(\d+)\.capsule\.0\.b", lambda m: f"branches.{m[1]}.b"),
        (r"LocEnc(\d+)\.capsule\.(\d+)\.(\w+)", lambda m: f"branches.{m[1]}.mlp.{int(m[2]) - 1}.{m[3]}"),
        (r"LocEnc(\d+)\.head\.0\.(\w+)", lambda m: f"branches.{m[1]}.head.{m[2]}"),
    ]
    for pattern, repl in rules:
        if m := re.fullmatch(pattern, key):
            return repl(m)
    raise GeoTokenError(f"GeoCLIP location-encoder weights: unexpected key {key!r}")


def load_gps_encoder(path: str | None = None) -> GPSEncoder:
    """GeoCLIP's pretrained location encoder, frozen, in eval mode (weights from the geoclip wheel by default)."""
    path = path or assets.geoclip_location_encoder_weights()
    state = torch.load(path, map_location="cpu", weights_only=True)
    ours = {geoclip_key(k): v for k, v in state.items()}
    if len(ours) != len(state):
        raise GeoTokenError(f"{path}: two weights map to the same parameter")
    encoder = GPSEncoder()
    encoder.load_state_dict(ours, strict=True)
    return encoder.requires_grad_(False).eval()

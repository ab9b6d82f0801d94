"""GeoCLIP location encoder: exact projection, strict key-by-key load, embeddings that follow distance."""

import math
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from geotoken import assets
from geotoken.encoders import GPSEncoder, load_gps_encoder
from geotoken.encoders.gps import equal_earth, geoclip_key
from geotoken.errors import GeoTokenError


@pytest.fixture(scope="module")
def encoder() -> GPSEncoder:
    torch.set_num_threads(2)
    return load_gps_encoder()


def haversine_km(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lat1, lon1, lat2, lon2 = np.radians(a[:, None, 0]), np.radians(a[:, None, 1]), np.radians(b[None, :, 0]), np.radians(b[None, :, 1])  # fmt: skip
    h = np.sin((lat2 - lat1) / 2) ** 2 + np.cos(lat1) * np.cos(lat2) * np.sin((lon2 - lon1) / 2) ** 2
    return 2 * 6371.0 * np.arcsin(np.sqrt(np.clip(h, 0, 1)))


def test_equal_earth_matches_the_published_formula():
    # Savric et al. 2018 in float64, unit sphere, then GeoCLIP's scale 66.50336 / 180.
    lat, lon = np.array([0.0, 45.0, -60.0, 90.0, 10.0]), np.array([0.0, 90.0, -120.0, 30.0, 180.0])
    theta = np.arcsin(math.sqrt(3) / 2 * np.sin(np.radians(lat)))
    a1, a2, a3, a4 = 1.340264, -0.081106, 0.000893, 0.003796
    x = 2 * math.sqrt(3) * np.radians(lon) * np.cos(theta) / (3 * (9 * a4 * theta**8 + 7 * a3 * theta**6 + 3 * a2 * theta**2 + a1))  # fmt: skip
    y = a4 * theta**9 + a3 * theta**7 + a2 * theta**3 + a1 * theta
    got = equal_earth(torch.tensor(np.stack([lat, lon], 1))).numpy()
    np.testing.assert_allclose(got, np.stack([x, y], 1) * 66.50336 / 180, rtol=1e-12, atol=1e-15)
    assert got[0].tolist() == [0.0, 0.0]
    # The map's published extents: x = 2.7066 at (0, 180), y = 1.3173 at the pole (unit sphere).
    edge = (
        equal_earth(torch.tensor([[0.0, 180.0], [90.0, 0.0]], dtype=torch.float64)).numpy() * 180 / 66.50336
    )
    assert edge[0, 0] == pytest.approx(2.7066, abs=1e-4) and edge[1, 1] == pytest.approx(1.3173, abs=1e-4)


def test_weights_load_key_by_key(encoder):
    saved = torch.load(assets.geoclip_location_encoder_weights(), map_location="cpu", weights_only=True)
    ours = encoder.state_dict()
    assert len(saved) == len(ours) == 3 * 9  # per branch: B, then weight + bias of 3 MLP layers and the head
    for key, value in saved.items():
        assert torch.equal(ours[geoclip_key(key)], value), key
    assert geoclip_key("LocEnc1.capsule.5.bias") == "branches.1.mlp.4.bias"
    with pytest.raises(GeoTokenError, match="unexpected key"):
        geoclip_key("LocEnc0.extra.weight")
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())


def test_similarity_falls_with_distance_on_real_mp16_coordinates(encoder):
    coords = np.loadtxt(assets.mp16_coordinates_csv(), delimiter=",", skiprows=1)  # (100000, 2) LAT, LON
    pts = coords[np.random.default_rng(0).choice(len(coords), 800, replace=False)]
    with torch.no_grad():
        e = F.normalize(encoder(torch.from_numpy(pts).float()), dim=-1).numpy()  # (800, 512)
    iu = np.triu_indices(len(pts), 1)
    dist, sim = haversine_km(pts, pts)[iu], (e @ e.T)[iu]
    bins = [0, 10, 100, 1000, 5000, 21000]
    means = [sim[(dist >= lo) & (dist < hi)].mean() for lo, hi in zip(bins, bins[1:])]
    assert all(((dist >= lo) & (dist < hi)).sum() >= 100 for lo, hi in zip(bins, bins[1:]))
    assert all(a > b for a, b in zip(means, means[1:])), means
    assert means[0] > 0.6 and means[-1] < 0.1, means


def test_output_shape_and_bad_rows(encoder):
    with torch.no_grad():
        out = encoder(torch.tensor([[48.8566, 2.3522], [-33.87, 151.21]], dtype=torch.float64))
    assert out.shape == (2, 512) and out.dtype == torch.float32
    with pytest.raises(GeoTokenError, match="row 1"):
        encoder(torch.tensor([[0.0, 0.0], [91.0, 0.0]]))
    with pytest.raises(GeoTokenError, match="row 0"):
        encoder(torch.tensor([[float("nan"), 0.0]]))
    with pytest.raises(GeoTokenError, match=r"\(B, 2\)"):
        encoder(torch.zeros(3))


@pytest.mark.slow
def test_bit_identical_to_geoclips_own_code(encoder):
    """Run GeoCLIP's location encoder from the wheel's source files (never `import geoclip`: that pulls in
    torchvision), with its weights, and compare: our rewrite gives exactly the same numbers."""
    root = assets.package_dir("geoclip") / "model"
    rff = types.ModuleType("geoclip_rff")
    exec((root / "rff" / "functional.py").read_text().replace("@torch.jit.script", ""), rff.__dict__)
    layers = types.ModuleType("geoclip_rff_layers")
    layers.functional = rff
    exec((root / "rff" / "layers.py").read_text().replace("from . import functional", ""), layers.__dict__)
    source = (root / "location_encoder.py").read_text()
    source = source.replace("from .misc import file_dir", f"file_dir = {str(root)!r}")
    module = types.ModuleType("geoclip_location_encoder")
    module.GaussianEncoding = layers.GaussianEncoding
    exec(source.replace("from .rff import GaussianEncoding", ""), module.__dict__)
    theirs = module.LocationEncoder().eval()  # loads the same weights file, weights_only=True

    g = torch.Generator().manual_seed(0)
    latlon = torch.stack(
        [torch.rand(500, generator=g) * 180 - 90, torch.rand(500, generator=g) * 360 - 180], 1
    )
    with torch.no_grad():
        assert torch.equal(encoder(latlon), theirs(latlon))

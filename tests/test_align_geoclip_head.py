"""`gps_head`: GeoCLIP's pretrained image head as the GPS-aligned head of a CLIP ViT-L/14 store."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from geotoken.align import AlignConfig, AlignHeads, train_heads
from geotoken.encoders.geoclip import GeoCLIPFiles, load_image_head
from geotoken.errors import GeoTokenError
from helpers import write_store
from test_align import CITIES, FakeGPSEncoder, FakeTextEncoder

torch.set_num_threads(1)

CLIP = {"name": "clip", "model": "openai/clip-vit-large-patch14", "dtype": "float32"}


class FakeGPSEncoder512(FakeGPSEncoder):
    dim = 512


def clip_store(root, backbone=CLIP, dim=768, n=96):
    rng = np.random.default_rng(0)
    city = rng.integers(0, len(CITIES), n)
    coords = CITIES[city] + rng.normal(0, 0.05, (n, 2))
    feats = rng.standard_normal((len(CITIES), dim))[city] + 0.5 * rng.standard_normal((n, dim))
    return write_store(root, {"features": feats.astype(np.float16)}, coords=coords, backbone=backbone)


def train(store, out, gps_head, epochs=1):
    cfg = AlignConfig(epochs=epochs, batch_size=32, queue_size=64, lr=1e-3, val_fraction=0.2)
    return train_heads(
        store, out, cfg, {"visual_dim": 8, "hidden": 16, "dropout": 0.0, "gps_head": gps_head},
        gallery_coords=CITIES, gps_encoder=FakeGPSEncoder512(), text_encoder=FakeTextEncoder(), progress=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def shipped():
    return load_image_head(GeoCLIPFiles.shipped().image_head).state_dict()


def test_frozen_geoclip_head_is_saved_exactly_and_round_trips(tmp_path, shipped):
    store = clip_store(tmp_path / "store")
    heads, _ = train(store, tmp_path / "heads", "geoclip", epochs=2)
    saved = load_file(str(tmp_path / "heads" / "model.safetensors"))
    for key, value in shipped.items():
        assert torch.equal(saved[f"gps.{key}"], value)
    loaded = AlignHeads.load(tmp_path / "heads")  # no GeoCLIP files needed: all weights are in the folder
    assert loaded.config.gps_head == "geoclip"
    x = torch.from_numpy(np.asarray(store["features"][:8], dtype=np.float32))
    for name, value in heads(x).items():
        torch.testing.assert_close(loaded(x)[name], value)
    # GeoCLIP's head reads the raw CLIP features, not the standardised ones
    head = load_image_head(GeoCLIPFiles.shipped().image_head)
    torch.testing.assert_close(loaded(x)["gps"], F.normalize(head(x), dim=-1))


def test_finetuned_geoclip_head_moves_and_round_trips(tmp_path, shipped):
    store = clip_store(tmp_path / "store")
    heads, metrics = train(store, tmp_path / "heads", "geoclip-finetune")
    assert metrics["history"]
    tuned = heads.gps.state_dict()
    assert all(not torch.equal(tuned[key].cpu(), value) for key, value in shipped.items())
    loaded = AlignHeads.load(tmp_path / "heads")
    assert loaded.config.gps_head == "geoclip-finetune"
    for key, value in loaded.gps.state_dict().items():
        assert torch.equal(value, tuned[key].cpu())


@pytest.mark.parametrize(
    ("backbone", "dim"), [({"name": "efficientnet-lite0"}, 768), (CLIP, 512)], ids=["not-clip", "512-d"]
)
def test_geoclip_head_needs_a_768d_clip_store(tmp_path, backbone, dim):
    store = clip_store(tmp_path / "store", backbone=backbone, dim=dim, n=40)
    with pytest.raises(GeoTokenError, match="768-d CLIP"):
        train(store, None, "geoclip")


def test_unknown_gps_head(tmp_path):
    with pytest.raises(GeoTokenError, match="gps_head must be one of"):
        train(clip_store(tmp_path / "store", n=40), None, "nope")

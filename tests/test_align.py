"""Alignment heads: losses, queue, training on synthetic features, save/load, apply to a store."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from geotoken.align import AlignConfig, AlignHeads, HeadsConfig, apply_heads, info_nce, train_heads
from geotoken.align.train import Queue, unique_rows
from geotoken.errors import GeoTokenError
from geotoken.features import FeatureStore
from helpers import write_store

torch.set_num_threads(1)

CITIES = np.array([[48.85, 2.35], [40.71, -74.0], [35.68, 139.69], [-33.87, 151.21], [-23.55, -46.63],
                   [30.04, 31.24], [55.76, 37.62], [19.43, -99.13]])  # fmt: skip


class FakeGPSEncoder(torch.nn.Module):
    """Fixed random Fourier features of lat/lon: nearby points get similar vectors."""

    dim = 32

    def __init__(self):
        super().__init__()
        self.b = torch.randn(self.dim // 2, 3, generator=torch.Generator().manual_seed(0)) * 2

    def forward(self, latlon):
        lat, lon = torch.deg2rad(latlon[:, 0]), torch.deg2rad(latlon[:, 1])
        xyz = torch.stack([lat.cos() * lon.cos(), lat.cos() * lon.sin(), lat.sin()], 1)
        v = xyz @ self.b.T
        return torch.cat([v.cos(), v.sin()], 1)


class FakeTextEncoder:
    """A fixed random vector per distinct string (what matters here is that equal texts agree)."""

    dim = 16

    def encode(self, texts):
        seeds = [int(hashlib.sha256(t.encode()).hexdigest()[:8], 16) for t in texts]
        return F.normalize(
            torch.stack([torch.randn(self.dim, generator=torch.Generator().manual_seed(s)) for s in seeds]),
            dim=-1,
        )


def synthetic_store(root, n=480, dim=48, skipped=(3,)) -> FeatureStore:
    """Photos of 8 cities: features = a city-specific direction + noise; coordinates jittered ~5 km."""
    rng = np.random.default_rng(0)
    city = rng.integers(0, len(CITIES), n)
    coords = CITIES[city] + rng.normal(0, 0.05, (n, 2))
    directions = rng.standard_normal((len(CITIES), dim)) * 2
    feats = (
        directions[city] + rng.standard_normal((n, dim)) + 5.0
    )  # an offset: standardisation must remove it
    feats[list(skipped)] = np.nan
    ids = [f"p{i}" for i in range(n)]
    return write_store(
        root, {"features": feats.astype(np.float16)}, ids=ids, coords=coords, skipped=skipped,
        backbone={"name": "fake"},
    )  # fmt: skip


def test_info_nce_masks_same_group_and_uses_queue():
    t = F.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    scale = torch.tensor(10.0)
    perfect = info_nce(t, t, torch.arange(4), scale)
    # rows 0 and 1 share a target group: masking removes 1 from 0's negatives, so the loss drops
    t2 = t.clone()
    t2[1] = t2[0]
    masked = info_nce(t2, t2, torch.tensor([0, 0, 1, 2]), scale)
    unmasked = info_nce(t2, t2, torch.arange(4), scale)
    assert masked < unmasked
    # by hand: image->target over the batch plus a queue item; target->image over the batch
    q = F.normalize(torch.randn(1, 8, generator=torch.Generator().manual_seed(1)), dim=-1)
    logits = scale * t @ torch.cat([t, q]).T
    want = (F.cross_entropy(logits, torch.arange(4)) + F.cross_entropy(scale * t @ t.T, torch.arange(4))) / 2
    got = info_nce(t, t, torch.arange(4), scale, q, torch.tensor([9]))
    assert got.item() == pytest.approx(want.item(), rel=1e-6) and got > perfect
    # a queue item in the same group as a query is not its negative
    same = info_nce(t, t, torch.arange(4), scale, t[:1].clone(), torch.tensor([0]))
    assert same.item() < info_nce(t, t, torch.arange(4), scale, t[:1].clone(), torch.tensor([7])).item()


def test_queue_is_fifo():
    q = Queue(3, 2, torch.device("cpu"))
    q.push(torch.tensor([[1.0, 1], [2, 2]]), torch.tensor([1, 2]))
    assert q.get()[1].tolist() == [1, 2]
    q.push(torch.tensor([[3.0, 3], [4, 4]]), torch.tensor([3, 4]))
    items, groups = q.get()
    assert sorted(groups.tolist()) == [2, 3, 4] and items[groups == 4].tolist() == [[4.0, 4.0]]


def test_unique_rows():
    uniq, inv = unique_rows(np.array([[1.0, 2], [3, 4], [1, 2]]))
    np.testing.assert_array_equal(uniq[inv], [[1, 2], [3, 4], [1, 2]])
    texts, inv = unique_rows(np.array(["b", "a", "b"]))
    assert texts.tolist() == ["a", "b"] and inv.tolist() == [1, 0, 1]


def test_train_save_load_apply(tmp_path):
    store = synthetic_store(tmp_path / "store")
    cfg = AlignConfig(epochs=6, batch_size=64, queue_size=128, lr=3e-3, val_fraction=0.2)
    heads, metrics = train_heads(
        store, tmp_path / "heads", cfg, {"visual_dim": 16, "hidden": 64, "dropout": 0.0},
        gallery_coords=CITIES, gps_encoder=FakeGPSEncoder(), text_encoder=FakeTextEncoder(), progress=False,
        texts=[f"a photo taken in city {np.argmin(np.abs(CITIES - c).sum(1))}" for c in store.coords],
    )  # fmt: skip
    assert (
        metrics["rows"] == {"train": 383, "val": 96, "skipped": 1} and metrics["targets"]["unique_texts"] == 8
    )
    assert metrics["history"][-1]["loss_gps"] < metrics["history"][0]["loss_gps"]
    assert metrics["image_to_gps"]["acc_25km"] > 0.9  # gallery = the 8 city centres
    assert metrics["nn_1"]["gps"]["acc_25km"] > 0.9 and metrics["nn_1"]["visual"]["acc_25km"] > 0.5
    assert (tmp_path / "heads" / "metrics.json").is_file()

    # PCA projection: orthonormal columns; save/load gives identical outputs
    p = heads.pca
    torch.testing.assert_close(p.T @ p, torch.eye(16), atol=1e-5, rtol=0)
    loaded = AlignHeads.load(tmp_path / "heads")
    x = torch.from_numpy(np.asarray(store["features"][:8], dtype=np.float32))
    for name, value in heads(x).items():
        torch.testing.assert_close(loaded(x)[name], value, equal_nan=True)
        assert value.shape == (8, heads.dims[name])

    out = apply_heads(loaded, store, batch_size=100, progress=False)
    assert sorted(out) == ["features", "gps", "text", "visual"]
    assert loaded.fingerprint() == heads.fingerprint()  # the same weights, the same record
    assert {out.header["arrays"][m]["heads"] for m in heads.dims} == {heads.fingerprint()}
    for name in ("visual", "gps", "text"):
        arr = np.asarray(out[name], dtype=np.float32)
        assert np.isnan(arr[3]).all()
        np.testing.assert_allclose(np.linalg.norm(np.delete(arr, 3, 0), axis=1), 1, atol=2e-3)
    np.testing.assert_allclose(out["gps"][:8].astype(np.float32), heads(x)["gps"].detach().numpy(), atol=2e-3)


def test_apply_into_a_new_store_leaves_the_source_untouched(tmp_path):
    store = synthetic_store(tmp_path / "store", n=40, dim=8, skipped=(5,))
    heads = AlignHeads(HeadsConfig(in_dim=8, visual_dim=4, hidden=8, gps_dim=4, text_dim=4)).eval()
    heads.fit_input(np.nan_to_num(np.asarray(store["features"], dtype=np.float32)))
    before = {p.name: p.read_bytes() for p in (tmp_path / "store").iterdir()}
    out = apply_heads(
        heads, store, batch_size=16, progress=False, out=tmp_path / "aligned", info={"heads": "h"}
    )
    assert {p.name: p.read_bytes() for p in (tmp_path / "store").iterdir()} == before
    assert sorted(out) == ["gps", "text", "visual"] and out.ids == store.ids
    assert out.header["backbone"] == {"name": "fake"} and out.header["heads"] == "h"
    assert (
        out.header["aligned_from"] == str(tmp_path / "store") and not out.valid[5] and out.valid.sum() == 39
    )
    np.testing.assert_array_equal(out.coords, store.coords)
    in_place = apply_heads(heads, FeatureStore.open(tmp_path / "store"), batch_size=16, progress=False)
    for name in ("visual", "gps", "text"):  # the same float16 bytes either way
        assert np.asarray(out[name]).tobytes() == np.asarray(in_place[name]).tobytes()


def test_bad_inputs(tmp_path):
    store = synthetic_store(tmp_path / "store", n=40, dim=8)
    with pytest.raises(GeoTokenError, match="not an alignment-heads folder"):
        AlignHeads.load(tmp_path)
    heads = AlignHeads(HeadsConfig(in_dim=9, visual_dim=4, hidden=8, gps_dim=4, text_dim=4))
    with pytest.raises(GeoTokenError, match="8-d, the heads expect 9"):
        apply_heads(heads, store, progress=False)
    with pytest.raises(GeoTokenError, match="at least that many"):
        heads.fit_input(np.zeros((3, 9)))
    with pytest.raises(
        GeoTokenError, match="clip text encoder needs a store embedded with the clip backbone"
    ):
        train_heads(
            store, None, AlignConfig(epochs=1), {"text_encoder": "clip"}, gps_encoder=FakeGPSEncoder()
        )


def test_the_metric_gallery_gps_table_is_cached_by_encoder_and_coordinates(tmp_path, monkeypatch):
    from geotoken.align import train as align_train

    monkeypatch.setenv("GEOTOKEN_CACHE", str(tmp_path / "cache"))
    coords = np.concatenate([CITIES, CITIES + 1.0])
    encoder, calls = FakeGPSEncoder(), []
    real = align_train.gps_table
    monkeypatch.setattr(
        align_train, "gps_table", lambda enc, c, **kw: calls.append(len(c)) or real(enc, c, **kw)
    )
    first = align_train.gallery_gps_table(encoder, coords)
    again = align_train.gallery_gps_table(encoder, coords)
    assert calls == [16, 8] and torch.equal(first, again)  # the second: only the 8-row probe is computed
    assert len(list((tmp_path / "cache" / "gps-tables").iterdir())) == 1
    other = FakeGPSEncoder()
    other.b = other.b * 3  # state outside the weights: the key cannot see it, the probe does
    torch.testing.assert_close(align_train.gallery_gps_table(other, coords), real(other, coords))
    align_train.gallery_gps_table(encoder, coords[:-1])  # other coordinates: another file
    assert calls == [16, 8, 8, 16, 15] and len(list((tmp_path / "cache" / "gps-tables").iterdir())) == 2


def test_a_killed_align_train_goes_on_from_its_last_epoch(tmp_path, monkeypatch):
    from geotoken.align import train as align_train

    store = synthetic_store(tmp_path / "store")
    cfg = AlignConfig(epochs=6, batch_size=64, queue_size=128, lr=3e-3, val_fraction=0.2)
    common = dict(
        gallery_coords=CITIES, gps_encoder=FakeGPSEncoder(), text_encoder=FakeTextEncoder(), progress=False
    )
    heads_cfg = {
        "visual_dim": 16,
        "hidden": 64,
        "dropout": 0.1,
    }  # dropout: the torch RNG must be restored too
    whole, whole_metrics = train_heads(store, tmp_path / "whole", cfg, heads_cfg, **common)

    real, calls = align_train.info_nce, []

    def killed_in_epoch_4(*args, **kwargs):  # 5 steps an epoch, two losses a step
        calls.append(1)
        if len(calls) == 2 * 5 * 3 + 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(align_train, "info_nce", killed_in_epoch_4)
    with pytest.raises(KeyboardInterrupt):
        train_heads(store, tmp_path / "heads", cfg, heads_cfg, **common)
    monkeypatch.setattr(align_train, "info_nce", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert (tmp_path / "heads" / "checkpoint" / "state.json").is_file()
    calls.clear()
    heads, metrics = train_heads(store, tmp_path / "heads", cfg, heads_cfg, **common)
    assert len(calls) == 2 * 5 * 3  # epochs 4-6 only
    assert metrics["history"] == whole_metrics["history"]
    assert all(torch.equal(a, b) for a, b in zip(heads.state_dict().values(), whole.state_dict().values()))
    assert not (tmp_path / "heads" / "checkpoint").exists()
    # a checkpoint of other options is not resumed
    monkeypatch.setattr(align_train, "info_nce", killed_in_epoch_4)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        train_heads(store, tmp_path / "other", cfg, heads_cfg, **common)
    monkeypatch.setattr(align_train, "info_nce", lambda *a, **k: calls.append(1) or real(*a, **k))
    calls.clear()
    train_heads(store, tmp_path / "other", AlignConfig(**{**cfg.__dict__, "lr": 1e-3}), heads_cfg, **common)
    assert len(calls) == 2 * 5 * 6


def test_a_visual_dim_the_data_cannot_give_is_said(tmp_path):
    store = synthetic_store(tmp_path / "store")  # features of fewer dimensions than asked for
    cfg = AlignConfig(epochs=1, batch_size=64, queue_size=128, val_fraction=0.2)
    with pytest.warns(
        UserWarning, match=r"visual_dim 4096 is more than the \d+-d features or the 383 training rows"
    ):
        heads, _ = train_heads(
            store, None, cfg, {"visual_dim": 4096, "hidden": 32}, gallery_coords=CITIES,
            gps_encoder=FakeGPSEncoder(), text_encoder=FakeTextEncoder(), progress=False,
        )  # fmt: skip
    assert heads.config.visual_dim < 4096

"""What generalises beyond the gallery's places: the ceiling of every split, the distribution-shift split in
the demo, and the training option that shows training queries the spatially disjoint condition."""

from __future__ import annotations

import numpy as np
import pytest

from geotoken.errors import GeoTokenError
from geotoken.evaluate import EvalConfig, Split
from geotoken.evaluate.baselines import Ceiling, nearest_coordinate
from geotoken.evaluate.evaluate import METHODS, run_methods
from geotoken.geo import haversine_km
from geotoken.pipeline import demo_config, demo_pipeline
from geotoken.train.data import drop_near_neighbours


def random_points(n, seed):
    rng = np.random.default_rng(seed)
    return np.degrees(np.arcsin(rng.uniform(-1, 1, n))), rng.uniform(-180, 180, n)


def test_ceiling_is_the_nearest_gallery_coordinate_and_bounds_every_gallery_answer():
    glat, glon = random_points(500, 0)
    qlat, qlon = random_points(80, 1)
    rows = nearest_coordinate(glat, glon, qlat, qlon, batch=7)
    d = haversine_km(qlat[:, None], qlon[:, None], glat[None], glon[None])  # (80, 500)
    np.testing.assert_array_equal(rows, d.argmin(axis=1))
    gallery, queries = (
        Split(np.arange(500).astype(str), glat, glon),
        Split(np.arange(80).astype(str), qlat, qlon),
    )
    pred = Ceiling().fit(gallery).predict(queries)
    err = haversine_km(qlat, qlon, pred.lat, pred.lon)
    assert (err[:, None] <= d + 1e-9).all()  # no gallery coordinate is closer
    assert "ceiling" in METHODS
    runs = run_methods(gallery, queries, EvalConfig(methods=("prior", "ceiling"), n_boot=10), progress=False)
    assert (runs["ceiling"].errors_km <= runs["prior"].errors_km + 1e-9).all()


def test_drop_near_removes_exactly_the_neighbours_within_the_radius():
    glat, glon = random_points(300, 2)
    qlat, qlon = random_points(40, 3)
    gallery, query = np.stack([glat, glon], 1), np.stack([qlat, qlon], 1)
    rng = np.random.default_rng(4)
    table = np.stack([rng.permutation(300)[:30] for _ in range(40)])  # (40, 30) best first
    km, k = 3000.0, 5
    out = drop_near_neighbours(table, query, gallery, k, km, share=1.0, seed=0)
    d = haversine_km(qlat[:, None], qlon[:, None], glat[table], glon[table])  # (40, 30)
    for r in range(40):
        far = table[r][d[r] > km]
        near = table[r][d[r] <= km]
        np.testing.assert_array_equal(out[r], np.concatenate([far, near])[:k])  # order kept, near ones last
    assert (haversine_km(qlat[:, None], qlon[:, None], glat[out], glon[out]) > km).mean() > 0.9
    # share 0 keeps the first k; a share picks a seeded subset of the queries and leaves the rest alone
    np.testing.assert_array_equal(drop_near_neighbours(table, query, gallery, k, km, 0.0), table[:, :k])
    half = drop_near_neighbours(table, query, gallery, k, km, 0.5, seed=1)
    changed = (half != table[:, :k]).any(axis=1)
    assert 0 < changed.sum() < 40 and (half[changed] == out[changed]).all()
    np.testing.assert_array_equal(half, drop_near_neighbours(table, query, gallery, k, km, 0.5, seed=1))
    with pytest.raises(GeoTokenError, match="more than k=5"):
        drop_near_neighbours(table[:, :5], query, gallery, k, km, 1.0)


def test_the_demo_evaluates_the_shift_split_with_the_ceiling_and_passes_training_options():
    cfg = demo_config("demo", drop_near_km=250.0, drop_near_share=0.3, label_smoothing=0.1)
    stages = {s.name: s for s in demo_pipeline(cfg).stages}
    assert stages["data"].config.earthviews.n_test_shift == cfg.n_test
    assert stages["eval"].config.splits == ("test", "test_disjoint", "test_shift")
    assert "ceiling" in stages["eval"].config.baselines
    model = stages["model"].config
    assert (model.drop_near_km, model.drop_near_share, model.label_smoothing) == (250.0, 0.3, 0.1)
    with pytest.raises(GeoTokenError, match="n_test 0 must be >= 1"):  # no val split: training could not run
        demo_config("demo", n_test=0)


def test_training_with_drop_near_reads_other_neighbours_and_needs_coordinates(tmp_path):
    import torch

    from geotoken.gallery import Gallery
    from geotoken.model import preset
    from geotoken.train import TrainConfig, TrainData, train

    rng = np.random.default_rng(0)
    n, mods = 48, {"visual": 8}
    emb = {"visual": rng.standard_normal((n, 8)).astype(np.float32)}
    tokens = np.concatenate([(np.arange(n) % 6)[:, None], rng.integers(0, 16, (n, 3))], axis=1)
    lat, lon = random_points(n, 5)
    xy = np.stack([lat, lon], 1)
    nbr = np.stack([rng.permutation(n)[:8] for _ in range(n)]).astype(np.int64)
    data = TrainData(emb, Gallery(emb, tokens, xy), nbr, tokens, xy)
    mc = preset("tiny", d_model=16, n_heads=2, d_ff=32, level=6, group=2, k=3, modalities=mods, dropout=0.0)
    base = dict(batch_size=8, max_steps=2, warmup_steps=1, val_every=0, tensorboard=False, progress=False)
    torch.set_num_threads(1)
    dropped = data.drop_near(4000.0, 1.0, k=3)
    assert dropped.neighbours.shape == (n, 3) and (dropped.neighbours != nbr[:, :3]).any()
    a = train(mc, TrainConfig(**base), data, tmp_path / "a")
    b = train(mc, TrainConfig(**base, drop_near_km=4000.0, drop_near_share=1.0), data, tmp_path / "b")
    assert any((pa != pb).any() for pa, pb in zip(a.parameters(), b.parameters()))
    with pytest.raises(GeoTokenError, match="coordinates"):
        TrainData(emb, Gallery(emb, tokens), nbr, tokens).drop_near(100.0, 1.0, k=3)

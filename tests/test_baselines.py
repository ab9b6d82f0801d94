"""Baselines: exact small cases, and every baseline beats `prior` on a structured synthetic set."""

import numpy as np
import pytest

from geotoken.errors import GeoTokenError
from geotoken.evaluate.baselines import (
    CellClassifier,
    CellsConfig,
    GPSGallery,
    NearestNeighbour,
    Prior,
    RetrievalConfig,
    Split,
    adaptive_cells,
    densest_location,
    exact_neighbours,
    knn_vote,
    spherical_mean,
)
from geotoken.evaluate.synthetic import gps_encoder, synthetic_splits
from geotoken.geo import haversine_km


@pytest.fixture(scope="module")
def splits():
    return synthetic_splits(n_gallery=2000, n_queries=300, seed=0)


def test_spherical_mean_across_antimeridian_and_weights():
    lat, lon = spherical_mean(np.array([0.0, 0.0]), np.array([179.0, -179.0]))
    assert lat == pytest.approx(0, abs=1e-9) and abs(lon) == pytest.approx(180)
    lat, lon = spherical_mean(np.array([[10.0, 20.0]]), np.array([[0.0, 0.0]]), np.array([[1.0, 0.0]]))
    assert lat[0] == pytest.approx(10) and lon[0] == pytest.approx(0)


def test_exact_neighbours_matches_argsort():
    rng = np.random.default_rng(0)
    g, q = rng.normal(size=(200, 16)), rng.normal(size=(30, 16))
    rows, sims = exact_neighbours(g, q, 5, batch=7)
    gn, qn = g / np.linalg.norm(g, axis=1, keepdims=True), q / np.linalg.norm(q, axis=1, keepdims=True)
    s = qn @ gn.T
    np.testing.assert_array_equal(rows, np.argsort(-s, axis=1)[:, :5])
    np.testing.assert_allclose(sims, np.sort(s, axis=1)[:, ::-1][:, :5], atol=1e-5)


def test_knn_vote_prefers_heaviest_cluster_over_top1():
    # top-1 is alone in Paris; three slightly less similar neighbours agree on Tokyo
    lat = np.array([[48.85, 35.68, 35.70, 35.66]])
    lon = np.array([[2.35, 139.69, 139.70, 139.75]])
    sims = np.array([[0.90, 0.88, 0.87, 0.86]])
    plat, plon, share = knn_vote(lat, lon, sims, radius_km=50, temperature=0.1)
    assert haversine_km(plat, plon, 35.68, 139.71)[0] < 10
    assert 0.6 < share[0] < 0.8
    mlat, mlon, _ = knn_vote(lat, lon, sims, radius_km=50, temperature=0.1, answer="member")
    assert (mlat[0], mlon[0]) == (35.68, 139.69)  # the heaviest member of the winning cluster
    # a very low temperature makes it 1-NN
    plat, plon, _ = knn_vote(lat, lon, sims, radius_km=50, temperature=1e-4)
    assert haversine_km(plat, plon, 48.85, 2.35)[0] < 1e-6
    with pytest.raises(GeoTokenError, match="answer"):
        knn_vote(lat, lon, sims, answer="median")


def test_adaptive_cells_respect_counts():
    g, _ = synthetic_splits(n_gallery=3000, n_queries=1, seed=1)
    cells = adaptive_cells(g.lat, g.lon, max_count=100, min_count=5, min_level=2, max_level=12)
    from geotoken.s2 import cell_level

    levels = cell_level(cells.cell_ids)
    assert np.all(cells.counts >= 5)
    assert np.all((cells.counts <= 100) | (levels == 12))
    assert len(np.unique(levels)) > 1  # dense regions got finer cells than sparse ones
    kept = cells.labels >= 0
    np.testing.assert_array_equal(np.bincount(cells.labels[kept]), cells.counts)
    assert (~kept).sum() == 3000 - cells.counts.sum()
    # each class centre is the mean position of its points
    c = 0
    mlat, mlon = spherical_mean(g.lat[cells.labels == c], g.lon[cells.labels == c])
    assert haversine_km(mlat, mlon, cells.lat[c], cells.lon[c]) < 1e-6
    with pytest.raises(GeoTokenError, match="min_count"):
        adaptive_cells(g.lat, g.lon, max_count=5, min_count=10)


def test_prior_is_in_the_densest_cluster():
    lat = np.r_[np.full(50, 40.0), np.full(10, -30.0)] + np.linspace(0, 0.1, 60)
    lon = np.r_[np.full(50, -3.0), np.full(10, 150.0)]
    plat, plon = densest_location(lat, lon, level=7)
    assert haversine_km(plat, plon, 40.05, -3.0) < 20
    p = (
        Prior()
        .fit(Split(np.arange(60).astype(str), lat, lon))
        .predict(Split(np.array(["a", "b"]), [0, 1], [0, 1]))
    )
    assert np.all(p.lat == p.lat[0]) and len(p.lat) == 2


def _median_error(pred, queries):
    return float(np.median(haversine_km(queries.lat, queries.lon, pred.lat, pred.lon)))


def _acc(pred, queries, t):
    return float((haversine_km(queries.lat, queries.lon, pred.lat, pred.lon) <= t).mean())


def test_every_baseline_beats_prior(splits):
    gallery, queries = splits
    prior = Prior().fit(gallery).predict(queries)
    methods = {
        "nn": NearestNeighbour(RetrievalConfig(embedding="visual")),
        "knn": NearestNeighbour(RetrievalConfig(embedding="visual", k=15, radius_km=200), vote=True),
        "cells": CellClassifier(CellsConfig(max_count=100, min_count=5, epochs=8, hidden=128)),
        "cells-linear": CellClassifier(CellsConfig(max_count=100, min_count=5, epochs=8, hidden=0)),
        "gps-gallery": GPSGallery(encoder=gps_encoder()),
    }
    base_med, base_acc = _median_error(prior, queries), _acc(prior, queries, 750)
    for name, m in methods.items():
        pred = m.fit(gallery).predict(queries)
        assert pred.lat.shape == (len(queries),)
        med, acc = _median_error(pred, queries), _acc(pred, queries, 750)
        assert med < 0.5 * base_med, (name, med, base_med)
        assert acc > base_acc + 0.2, (name, acc, base_acc)


def test_knn_beats_nn_on_noisy_features(splits):
    gallery, queries = splits
    nn = NearestNeighbour(RetrievalConfig(embedding="visual")).fit(gallery).predict(queries)
    knn = (
        NearestNeighbour(RetrievalConfig(embedding="visual", k=15, radius_km=200), vote=True)
        .fit(gallery)
        .predict(queries)
    )
    assert _acc(knn, queries, 200) >= _acc(nn, queries, 200)


def test_precomputed_neighbours_equal_exact_search(splits):
    gallery, queries = splits
    table = exact_neighbours(gallery.arrays["visual"], queries.arrays["visual"], 15)
    cfg = RetrievalConfig(embedding="visual", k=15)
    a = NearestNeighbour(cfg, vote=True).fit(gallery).predict(queries)
    b = NearestNeighbour(cfg, vote=True, neighbours=table).fit(gallery).predict(queries)
    np.testing.assert_array_equal(a.lat, b.lat)


def test_missing_array_is_a_clear_error(splits):
    gallery, queries = splits
    with pytest.raises(GeoTokenError, match="'text' is missing"):
        NearestNeighbour(RetrievalConfig(embedding="text")).fit(gallery)
    with pytest.raises(GeoTokenError, match="3 rows"):
        Split(np.array(["a", "b"]), [0, 0], [0, 0], {"visual": np.zeros((3, 4))})

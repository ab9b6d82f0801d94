"""The model as an evaluation method: one row per strategy x selector, calibration report, plots."""

import json

import numpy as np
import pytest
import torch

from geotoken import s2
from geotoken.evaluate.evaluate import EvalConfig, GeoTokenMethodConfig, evaluate
from geotoken.evaluate.geotoken_method import row_label, rows_to_run
from geotoken.evaluate.synthetic import synthetic_splits

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def geolocator_and_splits(tiny_model):
    from geotoken.bundle import SearchOptions
    from geotoken.gallery import Gallery
    from geotoken.predict import Geolocator
    from geotoken.retrieval import NeighbourIndex

    gallery, queries = synthetic_splits(n_gallery=400, n_queries=40, seed=5)
    dims = {"visual": gallery.arrays["visual"].shape[1], "gps": gallery.arrays["gps"].shape[1]}
    model = tiny_model(dims, k=3, dropout=0.0, level=10, group=2)
    cfg = model.cfg
    coords = np.stack([gallery.lat, gallery.lon], 1)
    tokens = s2.latlon_to_tokens(gallery.lat, gallery.lon, cfg.level, cfg.group)
    index = NeighbourIndex.build(gallery.arrays["visual"], kind="flat", progress=False)
    geo = Geolocator(
        model, Gallery({m: gallery.arrays[m] for m in dims}, tokens, coords), index=index,
        query_modalities=["visual"], options=SearchOptions(batch_size=16),
    )  # fmt: skip
    return geo, gallery, queries


def test_rows_and_labels():
    cfg = GeoTokenMethodConfig(
        strategies=("greedy", "beam", "sample", "beam"), selectors=("logp", "consensus")
    )
    assert rows_to_run(cfg) == [
        ("greedy", "logp"),
        ("beam", "logp"),
        ("beam", "consensus"),
        ("sample", "logp"),
        ("sample", "consensus"),
    ]
    assert row_label("beam", "consensus", cfg) == "geotoken beam5+consensus"
    assert row_label("sample", "logp", cfg) == "geotoken sample10+logp"
    assert row_label("greedy", "logp", cfg) == "geotoken greedy"
    assert row_label("sample+retrieval", "reward", cfg) == "geotoken sample10+nbr5+reward"


@pytest.mark.slow
def test_geotoken_rows_in_one_table(geolocator_and_splits, tmp_path):
    geo, gallery, queries = geolocator_and_splits
    cfg = EvalConfig(
        methods=("nn", "geotoken"),
        n_boot=50,
        geotoken=GeoTokenMethodConfig(
            strategies=("greedy", "beam", "sample"), selectors=("logp", "consensus"), num_samples=4
        ),
        plots=False,
    )
    res = evaluate(gallery, queries, tmp_path, cfg, geolocator=geo, log=lambda *a: None)
    assert not list(tmp_path.glob("*.png"))
    labels = ["nn", "geotoken greedy", "geotoken beam5+logp", "geotoken beam5+consensus",
              "geotoken sample4+logp", "geotoken sample4+consensus"]  # fmt: skip
    assert list(res.runs) == labels
    report = json.loads((tmp_path / "metrics.json").read_text())
    # paired: every row minus the reference (nn), then every search row minus greedy
    pairs = [(p["a"], p["b"]) for p in report["paired"]]
    assert pairs == [(lab, "nn") for lab in labels[1:]] + [(lab, "geotoken greedy") for lab in labels[2:]]
    for label in labels[1:]:
        m = report["methods"][label]
        assert m["method"] == "geotoken" and m["n"] == len(queries)
        cal = m["calibration"]
        assert set(cal) >= {"within_25km", "within_200km", "within_750km", "levels"}
        assert 0 <= cal["within_200km"]["ece"] <= 1
        assert len(cal["levels"]) == geo.model.cfg.n_tokens
    # the greedy row equals the model's own (gallery-constrained) greedy decoding of the same inputs
    from geotoken.search.decode import generate

    batch = geo.batch({m: queries.arrays[m] for m in ("visual", "gps")}, geo.neighbours(queries.arrays))
    with torch.no_grad():
        pool, _ = generate(geo.model, batch, "greedy", constraint=geo.constraint)
    lat, lon = s2.tokens_to_latlon(pool.tokens[:, 0], geo.model.cfg.level, geo.model.cfg.group)
    np.testing.assert_allclose(res.runs["geotoken greedy"].pred.lat, lat)
    np.testing.assert_allclose(res.runs["geotoken greedy"].pred.lon, lon)
    # beam search keeps the most likely of its beams: never less likely than greedy
    assert np.all(
        res.runs["geotoken beam5+logp"].pred.score >= res.runs["geotoken greedy"].pred.score * (1 - 1e-6)
    )


@pytest.mark.slow
def test_reliability_plot_written(geolocator_and_splits, tmp_path):
    geo, gallery, queries = geolocator_and_splits
    cfg = EvalConfig(methods=("geotoken",), n_boot=10, geotoken=GeoTokenMethodConfig(strategies=("beam",)))
    evaluate(gallery, queries, tmp_path, cfg, geolocator=geo, log=lambda *a: None)
    assert (tmp_path / "reliability_geotoken_beam5_logp.png").read_bytes()[:4] == b"\x89PNG"

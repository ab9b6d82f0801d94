"""Inference: a small real Geolocator built from parts (random model, real backbone, test heads and index)."""

import json

import numpy as np
import pytest
import torch

from geotoken import s2
from geotoken.errors import GeoTokenError
from geotoken.search.calibration import Calibration
from helpers import DIMS, make_geolocator

torch.set_num_threads(1)


def embeddings(b=3, seed=1):
    rng = np.random.default_rng(seed)
    return {m: rng.standard_normal((b, d)).astype(np.float32) for m, d in DIMS.items()}


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda e: {m: np.full_like(v, np.nan) for m, v in e.items()}, "'visual': row 0 is not finite"),
        (lambda e: {**e, "gps": e["gps"][:2]}, "different numbers of rows"),
        (lambda e: {**e, "visual": e["visual"][0]}, r"'visual': float32 of shape \(\d+,\), expected"),
        (lambda e: {"visual": e["visual"]}, r"no 'gps' \(this model reads \['gps', 'text', 'visual'\]"),
        (lambda e: {**e, "text": e["text"][:, :5]}, rf"'text' has width 5; this model's is {DIMS['text']}"),
    ],
)
def test_bad_query_embeddings_are_named(change, message):
    """Each would otherwise fail far away: a NaN row gets no neighbours from FAISS, and the error named them."""
    with pytest.raises(GeoTokenError, match=message):
        make_geolocator().predict_embeddings(change(embeddings()))
    assert len(make_geolocator().predict_embeddings(embeddings(), top_k=np.int64(2))[0].candidates) <= 2
    assert (
        make_geolocator().predict_embeddings({m: v[:0] for m, v in embeddings().items()}) == []
    )  # as predict([])
    with pytest.raises(GeoTokenError, match=r"neighbours: float64 of shape \(3, 3\), expected integer"):
        make_geolocator().predict_embeddings(embeddings(), neighbours=np.zeros((3, 3)))
    narrow = {m: v[:, :10] for m, v in embeddings().items()}  # (neighbours given: no index search to say it)
    with pytest.raises(GeoTokenError, match="'visual' has width 10"):
        make_geolocator().predict_embeddings(narrow, neighbours=np.zeros((3, 3), dtype=np.int64))


def test_fewer_candidates_than_asked_for_are_said_in_the_note():
    """top_k is an upper bound: the search's distinct cells bound the list, and the note says how."""
    geo = make_geolocator()
    [greedy] = geo.predict_embeddings(embeddings(1), top_k=4, strategy="greedy")
    assert len(greedy.candidates) == 1
    assert greedy.note == "1 of the 4 candidates asked for: the search (greedy) found no more distinct cells"
    [beam] = geo.predict_embeddings(embeddings(1), top_k=5, strategy="beam", beam_width=3)
    assert (
        len(beam.candidates) == 3
        and "3 of the 5 candidates asked for: the search (beam (width 3))" in beam.note
    )
    [enough] = geo.predict_embeddings(embeddings(1), top_k=3, strategy="beam", beam_width=3)
    assert enough.note == ""


def test_predict_embeddings_candidates_are_complete_and_consistent():
    geo = make_geolocator()
    preds = geo.predict_embeddings(embeddings(), top_k=4, strategy="beam")
    assert len(preds) == 3
    gallery_cells = set(map(tuple, geo.gallery.tokens.tolist()))
    for p in preds:
        assert len(p.candidates) == 4
        d = json.loads(json.dumps(p.to_dict()))  # JSON-serialisable
        assert d["lat"] == p.candidates[0].lat and d["strategy"] == "beam"
        for c in d["candidates"]:  # the JSON form of each `Candidate`
            assert 0 <= c["probability"] <= 1 and set(c["within"]) == {"25km", "200km", "750km"}
            assert len(c["polygon"]) == 4 and len(c["level_confidence"]) == geo.model.cfg.n_tokens
            assert np.all(np.diff(c["level_confidence"]) <= 1e-12)
            cell = s2.latlon_to_cell_ids(np.array([c["lat"]]), np.array([c["lon"]]), 10)
            assert s2.cell_ids_to_hex(cell)[0] == c["cell"]
            assert (
                tuple(s2.latlon_to_tokens(np.array([c["lat"]]), np.array([c["lon"]]), 10, 2)[0])
                in gallery_cells
            )  # constrained
            assert "country" in c["place"]
        logps = [c.logp for c in p.candidates]
        assert logps == sorted(logps, reverse=True)
        assert set(p.timings_ms) >= {"retrieve", "decode", "select", "total"}


def test_search_batches_equal_one_batch_and_neighbours_can_be_given():
    geo = make_geolocator()
    e = embeddings(5)
    one = geo.search(e, batch_size=32)
    parts = geo.search(e, batch_size=2)
    assert (one.pool.tokens == parts.pool.tokens).all() and (
        one.selection.index == parts.selection.index
    ).all()
    given = geo.search(e, neighbours=one.neighbours)
    np.testing.assert_allclose(given.pool.logp, one.pool.logp)
    # samples too: a photo's draws depend on its place in the call, not on how the call is batched
    drawn = [geo.search(e, batch_size=b, strategy="sample", num_samples=6).pool.tokens for b in (32, 2, 3)]
    assert (drawn[0] == drawn[1]).all() and (drawn[0] == drawn[2]).all()
    with pytest.raises(GeoTokenError, match="neighbour rows"):
        geo.search(e, neighbours=np.full((5, 3), 999))


def test_strategies_and_selectors():
    geo = make_geolocator()
    e = embeddings()
    greedy = geo.search(e, strategy="greedy")
    assert greedy.pool.tokens.shape[1] == 1
    beam = geo.search(e, strategy="beam", beam_width=5)
    assert (beam.pool.logp[:, 0] >= greedy.pool.logp[:, 0] - 1e-5).all()
    sampled = geo.search(e, strategy="sample", num_samples=8, select="consensus", radius_km=2000)
    assert sampled.pool.tokens.shape[1] == 8 and (sampled.selection.index >= 0).all()
    preds = geo.predict_embeddings(e, top_k=3, strategy="sample", num_samples=8, select="consensus")
    assert all(1 <= len(p.candidates) <= 3 and p.select == "consensus" for p in preds)
    with pytest.raises(GeoTokenError, match="reward"):
        geo.search(e, select="reward")
    with pytest.raises(GeoTokenError, match="unknown search option"):
        geo.search(e, beams=3)


def test_unconstrained_and_calibrated():
    cal = Calibration(radii_km=[25.0, 200.0, 750.0], within=[0.5, 0.5, 0.5], levels=[2.0] * 6)
    geo = make_geolocator(calibration=cal)
    raw = make_geolocator()
    e = embeddings()
    a = geo.predict_embeddings(e, top_k=1, constrain=False)[0].candidates[0]
    b = raw.predict_embeddings(e, top_k=1, constrain=False)[0].candidates[0]
    assert a.cell == b.cell
    # a temperature below 1 pushes probabilities away from 0.5
    assert abs(a.probability - 0.5) >= abs(b.probability - 0.5) - 1e-12


def test_predict_images_with_real_backbone(photo):
    from geotoken.encoders import load_backbone

    geo = make_geolocator(backbone=load_backbone("efficientnet-lite0"))
    preds = geo.predict([photo, photo.convert("L")], top_k=2)
    assert len(preds) == 2
    stages = preds[0].timings_ms  # the embedding's stages, each timed
    assert {"read", "preprocess", "backbone", "heads", "retrieve", "decode", "describe"} <= set(stages)
    assert stages["total"] == pytest.approx(sum(v for k, v in stages.items() if k != "total"), abs=0.01)
    assert preds[0].to_dict()["candidates"][0]["cell"]
    with pytest.raises(GeoTokenError, match="backbone"):
        make_geolocator().predict([photo])

"""Selectors over candidate pools: logp, consensus (mass within R km), medoid, duplicates."""

import numpy as np
import pytest

from geotoken.errors import GeoTokenError
from geotoken.search.candidates import Candidates, duplicate_mask, pool_weights
from geotoken.search.select import select


def pool_from(lat, lon, p, tokens=None):
    lat, lon, p = (np.atleast_2d(np.asarray(a, dtype=np.float64)) for a in (lat, lon, p))
    B, N = lat.shape
    if tokens is None:
        tokens = np.arange(B * N * 3).reshape(B, N, 3)
    return Candidates(tokens, np.log(p), lat, lon, np.ones(tokens.shape))


# Candidate 0 is the single most likely (Tokyo), but 1..3 (all within ~50 km of Paris) hold more mass.
PARIS = pool_from(
    [[35.68, 48.85, 48.90, 48.60, -33.9]], [[139.65, 2.35, 2.60, 2.00, 151.2]], [[0.3, 0.2, 0.15, 0.1, 0.05]]
)


def test_logp_picks_most_likely():
    sel = select(PARIS, "logp")
    assert sel.index.tolist() == [0]
    assert sel.lat[0] == 35.68 and sel.notes == [""]


def test_consensus_prefers_the_agreeing_cluster():
    sel = select(PARIS, "consensus", radius_km=100.0)
    assert sel.index.tolist() == [1]  # 1 has the most mass (0.45) and the highest logp within its cluster
    np.testing.assert_allclose(sel.scores[0], [0.3, 0.45, 0.45, 0.45, 0.05])
    # with a tiny radius every candidate only counts itself: consensus == logp
    assert select(PARIS, "consensus", radius_km=1.0).index.tolist() == [0]
    # a radius spanning the globe: everyone ties at total mass, the tie goes to the highest logp
    assert select(PARIS, "consensus", radius_km=25000.0).index.tolist() == [0]


def test_vote_lets_the_neighbours_overrule_the_model_prior():
    sydney = np.array([[[-33.87, 151.21], [-33.9, 151.1], [-34.0, 151.0]]])  # all 3 neighbours near Sydney
    sel = select(PARIS, "vote", neighbours_latlon=sydney, radius_km=200.0)
    assert sel.index.tolist() == [4]  # the least likely candidate, the only one the neighbours back
    tokyo = np.array([[[35.7, 139.7], [35.6, 139.6], [35.0, 139.0]]])
    assert select(PARIS, "vote", neighbours_latlon=tokyo).index.tolist() == [0]
    # neighbours far from every candidate back them alike: the model's own choice (logp) stands
    pole = np.array([[[-89.0, 0.0], [-89.5, 10.0], [-88.0, 20.0]]])
    assert select(PARIS, "vote", neighbours_latlon=pole, radius_km=25000.0).index.tolist() == [0]
    with pytest.raises(GeoTokenError, match="needs the retrieved neighbours"):
        select(PARIS, "vote", neighbours_latlon=None)


def test_gate_keeps_the_model_answer_only_where_it_is_sure_of_the_region():
    sydney = np.array([[[-33.87, 151.21], [-33.9, 151.1], [-34.0, 151.0]]])  # the neighbours back candidate 4
    level = np.ones(PARIS.tokens.shape)
    level[0, 0, :2] = [0.9, 0.5]  # the model's own answer (first): P(first 2 tokens) = 0.45
    pool = Candidates(PARIS.tokens, PARIS.logp, PARIS.lat, PARIS.lon, level)
    args = {"neighbours_latlon": sydney, "radius_km": 200.0, "gate_tokens": 2}
    sure = select(pool, "gate", gate_p=0.4, **args)
    assert sure.index.tolist() == [0] and sure.notes == ["model sure of the region"]
    assert np.argmax(sure.scores[0]) == 0
    unsure = select(pool, "gate", gate_p=0.5, **args)
    assert unsure.index.tolist() == [4] and unsure.notes == ["neighbours voted"]
    assert unsure.index.tolist() == select(pool, "vote", neighbours_latlon=sydney).index.tolist()
    alone = pool.take(np.array([[0]]))  # greedy: a pool of one, nothing voted on whatever the gate says
    assert select(alone, "gate", gate_p=0.5, **args).notes == [""]
    # one token (the cube face, 0.9) is enough at 0.5; gate_p 0 always keeps the model's answer
    assert select(pool, "gate", gate_p=0.5, **{**args, "gate_tokens": 1}).index.tolist() == [0]
    assert select(pool, "gate", gate_p=0.0, **args).index.tolist() == [0]
    # own_index names where the pool holds the model's answer; None: its most likely candidate
    level[0, 2, :2] = 1.0
    assert select(pool, "gate", gate_p=0.9, own_index=2, **args).index.tolist() == [2]
    assert select(pool, "gate", gate_p=0.9, own_index=None, **args).index.tolist() == [4]
    # without neighbours there is nothing to vote with: the model's own answer
    assert select(pool, "gate", neighbours_latlon=None, gate_p=1.0).index.tolist() == [0]
    for bad, match in (({"gate_p": 1.5}, "gate_p"), ({"gate_tokens": 4}, "gate_tokens"),
                       ({"own_index": 7}, "own_index 7")):  # fmt: skip
        with pytest.raises(GeoTokenError, match=match):
            select(pool, "gate", **{**args, **bad})


def test_medoid():
    sel = select(PARIS, "consensus", medoid=True)
    assert sel.index.tolist() == [1] or sel.index.tolist() == [2]
    costs = -sel.scores[0]
    assert costs[0] > costs[1] and costs[4] > costs[1]


def test_duplicates_are_counted_once():
    tokens = np.array([[[1, 2], [1, 2], [3, 4], [1, 2]]])
    assert duplicate_mask(tokens).tolist() == [[False, True, False, True]]
    pool = pool_from([[10, 10, 10.1, 10]], [[20, 20, 20.1, 20]], [[0.4, 0.4, 0.3, 0.4]], tokens=tokens)
    np.testing.assert_allclose(pool_weights(pool), [[0.4, 0, 0.3, 0]])
    sel = select(pool, "consensus", radius_km=50)
    np.testing.assert_allclose(sel.scores, [[0.7, -np.inf, 0.7, -np.inf]])
    assert sel.index.tolist() == [0]


def test_batched_matches_per_image():
    rng = np.random.default_rng(0)
    lat, lon = rng.uniform(-60, 60, (5, 7)), rng.uniform(-180, 180, (5, 7))
    p = rng.dirichlet(np.ones(7), size=5)
    batch = select(pool_from(lat, lon, p), "consensus", radius_km=3000)
    for b in range(5):
        one = select(pool_from(lat[b], lon[b], p[b]), "consensus", radius_km=3000)
        assert one.index[0] == batch.index[b]


def test_bad_options():
    with pytest.raises(GeoTokenError, match="unknown selector"):
        select(PARIS, "best")
    with pytest.raises(GeoTokenError, match="radius_km"):
        select(PARIS, "consensus", radius_km=0)
    with pytest.raises(GeoTokenError, match="shape"):
        Candidates(
            np.zeros((1, 2, 3), int),
            np.zeros((1, 3)),
            np.zeros((1, 2)),
            np.zeros((1, 2)),
            np.zeros((1, 2, 3)),
        )

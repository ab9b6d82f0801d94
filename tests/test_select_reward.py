"""The learned reward scorer: training on a tiny Geolocator, save/load, selection through search."""

import numpy as np
import pytest
import torch

from geotoken.errors import GeoTokenError
from geotoken.fit import reward_candidates, train_reward
from geotoken.search.reward import RewardConfig, RewardScorer, select_reward
from helpers import make_geolocator

torch.set_num_threads(1)


def training_set(geo):
    """The gallery's own rows as training images; neighbours exclude the image itself."""
    emb = {m: np.asarray(v, dtype=np.float32) for m, v in geo.gallery.embeddings.items()}
    n = geo.gallery.rows
    sims = emb["visual"] @ emb["visual"].T
    np.fill_diagonal(sims, -np.inf)
    nbrs = np.argsort(-sims, axis=1, kind="stable")[:, :3]
    return emb, nbrs, geo.gallery.coords[:, 0].copy(), geo.gallery.coords[:, 1].copy(), n


def test_train_save_load_select(tmp_path):
    geo = make_geolocator()
    emb, nbrs, lat, lon, n = training_set(geo)
    cfg = RewardConfig(
        radius_km=3000, hidden=32, beam_width=3, num_samples=4, epochs=6, batch_size=16, lr=3e-3, holdout=0.2
    )
    scorer, metrics = train_reward(geo, emb, nbrs, lat, lon, cfg, progress=False)
    assert metrics["train_images"] == 48 and metrics["val_images"] == 12
    assert metrics["train_loss"][-1] < metrics["train_loss"][0]
    for key in ("val_within_logp", "val_within_reward", "val_within_oracle"):
        assert 0 <= metrics[key] <= metrics["val_within_oracle"] <= 1
    scorer.save(tmp_path / "reward", metrics=metrics)
    again = RewardScorer.load(tmp_path / "reward")
    geo.reward = again
    res = geo.search(
        {m: v[:5] for m, v in emb.items()},
        neighbours=nbrs[:5],
        strategy="sample",
        num_samples=6,
        select="reward",
    )
    batch = geo.batch({m: v[:5] for m, v in emb.items()}, nbrs[:5])
    memory = geo.model.encode(batch)
    np.testing.assert_allclose(again.score(memory, res.pool), scorer.score(memory, res.pool), rtol=1e-6)
    sel = select_reward(res.pool, again, memory)
    assert (sel.index == res.selection.index).all()
    probs = again.score(memory, res.pool)
    assert ((probs > 0) & (probs < 1)).all()


def test_training_pools_hold_beams_samples_and_the_retrieved_cells():
    geo = make_geolocator()
    emb, nbrs, *_ = training_set(geo)
    rows = np.arange(6)
    k = geo.model.cfg.k
    pool = reward_candidates(
        geo, emb, nbrs, rows, RewardConfig(beam_width=2, num_samples=3, retrieved=k), progress=False
    )
    assert pool.tokens.shape[:2] == (6, 2 + 3 + k)
    np.testing.assert_array_equal(pool.tokens[:, -k:], geo.gallery.tokens[nbrs[rows, :k]])
    none = reward_candidates(
        geo, emb, nbrs, rows, RewardConfig(beam_width=2, num_samples=3, retrieved=0), progress=False
    )
    assert none.tokens.shape[1] == 5


def test_config_checks_its_counts():
    with pytest.raises(GeoTokenError, match="beam_width must be >= 0, got -1"):
        RewardConfig(beam_width=-1)
    with pytest.raises(GeoTokenError, match="must be >= 1"):
        RewardConfig(beam_width=0, num_samples=0, retrieved=0)
    with pytest.raises(GeoTokenError, match="retrieved must be >= 0, got -1"):
        RewardConfig(retrieved=-1)
    with pytest.raises(GeoTokenError, match="radius_km must be > 0"):
        RewardConfig(radius_km=0.0)
    assert RewardConfig(num_samples=0, retrieved=0).num_samples == 0

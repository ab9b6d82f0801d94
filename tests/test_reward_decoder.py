"""The authors' reward scorer (`--reward-kind decoder`): a fine-tuned GeoToken copy with a 2-bin head."""

import json

import numpy as np
import pytest
import torch

from geotoken.cli import main
from geotoken.errors import GeoTokenError
from geotoken.fit import reward_candidates, train_reward
from geotoken.predict import Geolocator
from geotoken.search.candidates import Candidates
from geotoken.search.reward import (
    DecoderRewardScorer,
    RewardConfig,
    RewardScorer,
    load_reward,
    select_reward,
)
from helpers import make_geolocator
from test_select_reward import training_set

torch.set_num_threads(1)


def test_config_defaults_per_kind():
    head, dec = RewardConfig(), RewardConfig(kind="decoder")
    assert (head.beam_width, head.num_samples, head.retrieved, head.temperature) == (5, 10, 5, 1.0)
    assert (dec.beam_width, dec.num_samples, dec.retrieved, dec.temperature) == (0, 10, 0, 0.7)
    assert dec.lr < head.lr
    assert RewardConfig(kind="decoder", lr=1e-3, retrieved=2).lr == 1e-3  # given values win
    with pytest.raises(GeoTokenError, match="kind"):
        RewardConfig(kind="oracle")
    with pytest.raises(GeoTokenError, match=">= 1"):
        RewardConfig(kind="decoder", num_samples=0)


def test_model_decoder_states_end_in_the_logits(tiny_model):
    model = tiny_model({"visual": 8}, k=0, head_std=0.5, dropout=0.0, level=6, group=2)
    from geotoken.model import Batch

    batch = Batch({"visual": torch.randn(2, 8)}, {}, None)
    tokens = torch.randint(0, 4, (2 * 3, model.cfg.n_tokens))
    with torch.no_grad():
        memory = model.encode(batch)
        states = model.decoder_states(memory, tokens, copies=3)  # (6, T + 1, d)
        assert states.shape == (6, model.cfg.n_tokens + 1, model.cfg.d_model)
        alone = model.decoder_states(memory.repeat_interleave(3, 0), tokens)
        torch.testing.assert_close(states, alone, atol=1e-5, rtol=1e-5)
        # the states the heads read are the first T (the last one has read the whole sequence)
        torch.testing.assert_close(
            model._logits(states[:, :-1], 0), model.decode(memory.repeat_interleave(3, 0), tokens)
        )
        # a later token changes the last state only
        other = tokens.clone()
        other[:, -1] = (other[:, -1] + 1) % 4
        changed = model.decoder_states(memory, other, copies=3)
        torch.testing.assert_close(changed[:, :-1], states[:, :-1])
        assert not torch.allclose(changed[:, -1], states[:, -1])


def test_training_candidates_follow_constrain_and_temperature():
    geo = make_geolocator()
    emb, nbrs, *_ = training_set(geo)
    rows = np.arange(8)
    kw = dict(kind="decoder", num_samples=6, batch_size=4)
    free = reward_candidates(geo, emb, nbrs, rows, RewardConfig(constrain=False, **kw), progress=False)
    held = reward_candidates(geo, emb, nbrs, rows, RewardConfig(constrain=True, **kw), progress=False)
    assert free.shape == held.shape == (8, 6)  # 10 samples by default; here 6, no beams, no retrieved cells
    assert geo.constraint.contains(held.tokens).all()
    assert not geo.constraint.contains(free.tokens).all()  # free samples leave the gallery's cells
    # None: the bundle's option
    geo.options = geo.options.replace(constrain=False)
    default = reward_candidates(geo, emb, nbrs, rows, RewardConfig(**kw), progress=False)
    np.testing.assert_array_equal(default.tokens, free.tokens)
    # the samples are drawn at the kind's temperature (0.7): scaled log-probabilities are those at 0.7
    assert not np.allclose(free.logp_scaled, free.logp)


def test_selection_rule_lowest_bin_then_confidence():
    class Fixed(DecoderRewardScorer):
        def __init__(self, p):
            torch.nn.Module.__init__(self)
            self.p = p

        def probs(self, batch, pool):
            return self.p

    # P(bin 0 = within), per candidate: image 0 has two "within" calls, image 1 none
    p0 = np.array([[0.55, 0.9, 0.3, 0.7], [0.2, 0.45, 0.05, 0.3]])
    scorer = Fixed(np.stack([p0, 1 - p0], -1))
    pool = Candidates(
        np.arange(2 * 4 * 3).reshape(2, 4, 3),
        np.log(np.array([[0.4, 0.1, 0.3, 0.2], [0.1, 0.6, 0.2, 0.1]])),
        np.zeros((2, 4)),
        np.zeros((2, 4)),
        np.ones((2, 4, 3)),
    )
    sel = select_reward(pool, scorer, batch=object.__new__(_FakeBatch))
    # image 0: bin 0 candidates 0, 1, 3, most confident 1; image 1: all bin 1, most confident bin 1 is 2
    assert sel.index.tolist() == [1, 2]
    assert np.argsort(-sel.scores[0]).tolist() == [1, 3, 0, 2]
    with pytest.raises(GeoTokenError, match="batch"):
        scorer.selection_scores(pool, None, None)


class _FakeBatch:
    query = {"visual": np.zeros((2, 1))}


def test_decoder_train_save_load_select(tmp_path):
    geo = make_geolocator()
    emb, nbrs, lat, lon, n = training_set(geo)
    original = {k: v.clone() for k, v in geo.model.state_dict().items()}
    cfg = RewardConfig(kind="decoder", radius_km=3000, hidden=16, num_samples=4, epochs=3, batch_size=8,
                       lr=1e-3, holdout=0.2, max_steps=10, constrain=False)  # fmt: skip
    scorer, metrics = train_reward(geo, emb, nbrs, lat, lon, cfg, progress=False)
    assert metrics["kind"] == "decoder" and metrics["train_steps"] == 10  # max_steps stops it
    assert metrics["train_candidates_per_image"] == 4 and metrics["val_images"] == 12
    assert 0 <= metrics["val_within_reward"] <= metrics["val_within_oracle"] <= 1
    # the whole copy was trained; the geolocator's own model was not touched
    for k, v in geo.model.state_dict().items():
        assert torch.equal(v, original[k]), k
    tuned = scorer.model.state_dict()
    assert any(not torch.equal(tuned[k], original[k]) for k in original if "decoder" in k)
    assert any(not torch.equal(tuned[k], original[k]) for k in original if "encoder" in k)

    scorer.save(tmp_path / "reward", metrics=metrics)
    saved = json.loads((tmp_path / "reward" / "config.json").read_text())
    assert saved["kind"] == "decoder" and saved["reward"]["temperature"] == 0.7
    again = load_reward(tmp_path / "reward")
    assert isinstance(again, DecoderRewardScorer) and not again.training
    geo.reward = again
    q = {m: v[:5] for m, v in emb.items()}
    res = geo.search(q, neighbours=nbrs[:5], strategy="sample", num_samples=6, select="reward")
    batch = geo.batch(q, nbrs[:5])
    scorer.eval()
    np.testing.assert_allclose(again.score(batch, res.pool), scorer.score(batch, res.pool), rtol=1e-5)
    sel = select_reward(res.pool, again, batch=batch)
    assert (sel.index == res.selection.index).all()
    p = again.probs(batch, res.pool)
    expected = np.lexsort((-p.max(-1), p.argmax(-1)), axis=-1)[:, 0]  # lowest bin, then confidence
    # (ties between duplicate samples go to the first one, as the rule has no preference; duplicates scored
    # at different rows of a batch may differ in the last bit)
    np.testing.assert_allclose(
        p.max(-1)[np.arange(5), sel.index], p.max(-1)[np.arange(5), expected], rtol=1e-6
    )
    assert (p.argmax(-1)[np.arange(5), sel.index] == p.argmax(-1)[np.arange(5), expected]).all()
    # the head kind still loads through the same function
    head = RewardScorer(geo.model.cfg.d_model, geo.model.cfg.vocab_sizes, RewardConfig(hidden=8))
    head.save(tmp_path / "head")
    assert isinstance(load_reward(tmp_path / "head"), RewardScorer)


@pytest.mark.slow
def test_cli_reward_kind_decoder_in_a_bundle(random_bundle, tmp_path, feature_store):
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(random_bundle(gallery_rows=64, k=3), bundle)
    geo = Geolocator.from_bundle(bundle)
    emb = {m: np.asarray(v, dtype=np.float32) for m, v in geo.gallery.embeddings.items()}
    coords = geo.gallery.coords
    store = feature_store("train", emb, coords=coords)
    sims = emb["visual"] @ emb["visual"].T
    np.fill_diagonal(sims, -np.inf)
    table = tmp_path / "nbrs"
    table.mkdir()
    np.save(table / "index.npy", np.argsort(-sims, axis=1, kind="stable")[:, :3].astype(np.int64))
    np.save(table / "sims.npy", -np.sort(-sims, axis=1)[:, :3].astype(np.float32))
    (table / "neighbours.json").write_text(json.dumps({"k": 3, "queries": 64, "gallery_rows": 64}))
    argv = ["train-reward", "--model", str(bundle), "--queries", str(store.root), "--neighbours", str(table),
            "--reward-kind", "decoder", "--max-steps", "2", "--batch-size", "16", "--num-samples", "3",
            "--no-constrain"]  # fmt: skip
    assert main(argv) == 0
    geo = Geolocator.from_bundle(bundle)
    assert geo.reward.kind == "decoder" and geo.info()["reward_kind"] == "decoder"
    assert geo.reward.config.constrain is False and geo.reward.config.num_samples == 3
    [pred] = geo.predict_embeddings({m: v[:1] for m, v in emb.items()}, select="reward", strategy="sample")
    assert pred.select == "reward" and len(pred.candidates) >= 1

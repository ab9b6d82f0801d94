"""The authors' sampling: both log-probabilities in every pool, `logp_kind`, temperature 'paper' (0.7)."""

import numpy as np
import pytest
import torch

from geotoken.errors import GeoTokenError
from geotoken.model import Batch
from geotoken.search.candidates import Candidates, select_logp
from geotoken.search.decode import generate, sample
from geotoken.search.options import PAPER_TEMPERATURE, SearchOptions, sampling_temperature
from geotoken.search.select import select

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def setup(tiny_model):
    model = tiny_model({"visual": 16, "gps": 8}, k=3, head_std=0.8, dropout=0.0, level=8, group=2)
    cfg, B = model.cfg, 3
    g = torch.Generator().manual_seed(3)
    batch = Batch(
        {m: torch.randn(B, d, generator=g) for m, d in cfg.modalities.items()},
        {m: torch.randn(B, 3, d, generator=g) for m, d in cfg.modalities.items()},
        torch.randint(0, 4, (B, 3, cfg.n_tokens), generator=g),
    )
    with torch.no_grad():
        return model, batch, model.encode(batch)


def sequence_logp(model, memory, tokens: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """log P(sequence) from one teacher-forced `decode` pass (not the decoding code under test)."""
    B, N, T = tokens.shape
    flat = torch.as_tensor(tokens.reshape(B * N, T))
    logits = model.decode(memory.repeat_interleave(N, 0), flat).float() / temperature  # (B*N, T, V)
    lp = torch.log_softmax(logits, -1).gather(-1, flat[..., None])[..., 0].sum(-1)
    return lp.detach().double().view(B, N).numpy()


def test_samples_carry_t1_and_temperature_scaled_logp(setup):
    model, _, memory = setup
    pool = sample(model, memory, 6, temperature=0.7, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(pool.logp, sequence_logp(model, memory, pool.tokens), atol=1e-4)
    np.testing.assert_allclose(pool.logp_scaled, sequence_logp(model, memory, pool.tokens, 0.7), atol=1e-4)
    assert not np.allclose(pool.logp, pool.logp_scaled)  # the two kinds differ at T 0.7
    # at temperature 1 (no top-k/top-p) the two are the same number
    one = sample(model, memory, 4, temperature=1.0, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(one.logp_scaled, one.logp, atol=1e-6)


def test_a_huge_temperature_samples_the_vocabulary_uniformly_and_never_outside_it(setup):
    """-inf / inf is NaN: the excluded tokens (beyond a position's vocabulary) must stay excluded."""
    model, _, memory = setup
    vocab = np.asarray(model.cfg.vocab_sizes)
    for t in (1e300, float("inf")):  # 1e300 is inf in float32
        pool = sample(model, memory, 32, temperature=t, generator=torch.Generator().manual_seed(0))
        assert (pool.tokens >= 0).all() and (pool.tokens < vocab).all()
        np.testing.assert_allclose(pool.logp_scaled, -np.log(vocab.astype(float)).sum(), atol=1e-4)


def test_beams_and_greedy_scaled_logp_is_the_models_own(setup):
    model, batch, _ = setup
    for strategy in ("greedy", "beam"):
        pool, memory = generate(model, batch, strategy, beam_width=3)
        np.testing.assert_array_equal(pool.logp_scaled, pool.logp)
    pool, memory = generate(model, batch, "beam+sample", beam_width=2, num_samples=4, temperature=0.5)
    assert pool.logp_scaled.shape == pool.logp.shape == (3, 6)
    np.testing.assert_array_equal(pool.logp_scaled[:, :2], pool.logp[:, :2])  # the beams
    assert (pool.logp_scaled[:, 2:] > pool.logp[:, 2:] - 1e-9).any()  # samples: a sharper distribution
    # the fields travel through take / images / concat / join
    part = pool.images(1, 3).take(np.array([[5, 0], [4, 1]]))
    np.testing.assert_array_equal(part.logp_scaled, pool.logp_scaled[[1, 2]][[[0], [1]], [[5, 0], [4, 1]]])
    both = Candidates.join([Candidates.concat([part, part]), part.take(np.array([[0, 1, 0, 1]] * 2))])
    assert both.logp_scaled.shape == (4, 4)


def test_logp_kinds_pick_by_their_own_log_probability():
    tokens = np.arange(3 * 4).reshape(1, 3, 4)
    t1 = np.log([[0.5, 0.3, 0.2]])
    scaled = np.log([[0.2, 0.7, 0.1]])
    pool = Candidates(tokens, t1, np.zeros((1, 3)), np.zeros((1, 3)), np.ones((1, 3, 4)), logp_scaled=scaled)
    assert select_logp(pool).index.tolist() == [0]
    assert select_logp(pool, "t1").index.tolist() == [0]
    assert select_logp(pool, "scaled").index.tolist() == [1]
    assert select(pool, "logp", logp_kind="scaled").index.tolist() == [1]
    with pytest.raises(GeoTokenError, match="logp_kind"):
        select_logp(pool, "t2")
    # a pool made without scaled log-probabilities uses the model's own for both
    plain = Candidates(tokens, t1, np.zeros((1, 3)), np.zeros((1, 3)), np.ones((1, 3, 4)))
    np.testing.assert_array_equal(plain.logp_scaled, t1)
    with pytest.raises(GeoTokenError, match="logp_scaled"):
        Candidates(tokens, t1, np.zeros((1, 3)), np.zeros((1, 3)), np.ones((1, 3, 4)), logp_scaled=t1[0])


def test_temperature_paper_is_0_7_everywhere():
    assert PAPER_TEMPERATURE == 0.7
    assert sampling_temperature("paper") == 0.7 and sampling_temperature("0.3") == 0.3
    assert SearchOptions().temperature == 1.0  # today's default stays
    assert SearchOptions(temperature="paper").temperature == 0.7
    opt = SearchOptions().replace(temperature="paper", logp_kind="scaled")
    assert (opt.temperature, opt.logp_kind) == (0.7, "scaled")
    assert SearchOptions.from_dict(opt.to_dict()) == opt
    for bad in ("hot", -1):
        with pytest.raises(GeoTokenError, match="temperature"):
            SearchOptions(temperature=bad)
    with pytest.raises(GeoTokenError, match="logp_kind"):
        SearchOptions(logp_kind="t2")


def test_cli_temperature_and_logp_kind():
    from geotoken.cli import build_parser

    parser = build_parser()
    for cmd in (["predict", "x.jpg", "--model", "M"], ["calibrate", "--model", "M", "--queries", "Q"]):
        args = parser.parse_args([*cmd, "--temperature", "paper", "--logp-kind", "scaled"])
        assert (args.temperature, args.logp_kind) == (0.7, "scaled")
    args = parser.parse_args(
        ["evaluate", "--gallery", "G", "--queries", "Q", "-o", "O", "--temperature", "paper"]
    )
    assert (args.temperature, args.logp_kind, args.knn_temperature) == (0.7, "t1", 0.1)


def test_geolocator_search_logp_kind_and_prediction_fields(random_bundle):
    from geotoken.predict import Geolocator

    geo = Geolocator.from_bundle(random_bundle())
    rng = np.random.default_rng(0)
    emb = {m: rng.normal(size=(3, d)).astype(np.float32) for m, d in geo.model.cfg.modalities.items()}
    kw = dict(strategy="sample", num_samples=8, temperature="paper", constrain=False, select="logp")
    t1 = geo.search(emb, **kw, logp_kind="t1")
    scaled = geo.search(emb, **kw, logp_kind="scaled")
    np.testing.assert_array_equal(t1.pool.tokens, scaled.pool.tokens)  # same draws
    rows = np.arange(3)
    assert (t1.selection.index == select_logp(t1.pool, "t1").index).all()
    assert (scaled.selection.index == select_logp(t1.pool, "scaled").index).all()
    best = scaled.pool.logp_scaled.max(1)
    np.testing.assert_allclose(scaled.pool.logp_scaled[rows, scaled.selection.index], best)
    [pred] = geo.predict_embeddings({m: v[:1] for m, v in emb.items()}, top_k=2, **kw)
    c = pred.candidates[0].to_dict()
    assert isinstance(c["logp"], float) and isinstance(c["logp_scaled"], float)

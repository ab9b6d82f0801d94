"""Decoding: cached == uncached, beam 1 == greedy, best beam >= greedy, T -> 0 samples == greedy, constraints."""

import numpy as np
import pytest
import torch

from geotoken.errors import GeoTokenError
from geotoken.model import ARCHS, Batch
from geotoken.search.decode import PrefixConstraint, beam_search, generate, greedy, sample, score_sequences

torch.set_num_threads(1)


@pytest.fixture(scope="module", params=ARCHS)
def setup(request, tiny_model):
    # every search test runs on both layer designs (post-LN "authors" keeps the same cache contract);
    # untrained heads are all-zero: head_std gives the distributions some shape
    model = tiny_model(
        {"visual": 16, "gps": 16, "text": 8}, k=3, head_std=0.5, dropout=0.0, level=10, group=2,
        arch=request.param,
    )  # fmt: skip
    cfg = model.cfg
    B, T = 4, cfg.n_tokens
    g = torch.Generator().manual_seed(1)
    batch = Batch(
        {m: torch.randn(B, d, generator=g) for m, d in cfg.modalities.items()},
        {m: torch.randn(B, 3, d, generator=g) for m, d in cfg.modalities.items()},
        torch.randint(0, 4, (B, 3, T), generator=g),
    )
    return model, batch, model.encode(batch)


def test_cached_step_logits_equal_uncached(setup):
    model, _, memory = setup
    T, n = model.cfg.n_tokens, 3
    tokens = torch.randint(0, 4, (memory.shape[0] * n, T), generator=torch.Generator().manual_seed(2))
    full = model.decode(memory.repeat_interleave(n, 0), tokens)  # (B*n, T, V)
    cache = model.init_cache(memory, copies=n)
    for t in range(T):
        step = model.step(cache, tokens[:, t - 1] if t else None, t)
        torch.testing.assert_close(step, full[:, t], atol=1e-5, rtol=1e-5)


def test_beam_width_1_is_greedy_and_best_beam_beats_greedy(setup):
    model, batch, memory = setup
    g_tokens, g_logp = greedy(model, batch)
    one = beam_search(model, memory, beam_width=1)
    assert (one.tokens[:, 0] == g_tokens.numpy()).all()
    np.testing.assert_allclose(one.logp[:, 0], g_logp.numpy(), atol=1e-5)
    five = beam_search(model, memory, beam_width=5)
    assert five.tokens.shape == (4, 5, model.cfg.n_tokens)
    assert (five.logp[:, 0] >= g_logp.numpy() - 1e-5).all()
    assert (np.diff(five.logp, axis=1) <= 1e-9).all()  # best first
    np.testing.assert_allclose(np.log(five.level_probs).sum(-1), five.logp, atol=1e-9)
    # the beams are distinct sequences
    assert all(len({tuple(s) for s in five.tokens[b]}) == 5 for b in range(4))


@pytest.mark.parametrize("strategy", ["beam", "sample"])
def test_cached_search_equals_uncached_search(setup, strategy):
    model, _, memory = setup
    if strategy == "beam":
        a, b = beam_search(model, memory, 4), beam_search(model, memory, 4, cached=False)
    else:
        a = sample(model, memory, 6, sample_top_k=5, generator=torch.Generator().manual_seed(3))
        b = sample(model, memory, 6, sample_top_k=5, generator=torch.Generator().manual_seed(3), cached=False)
    assert (a.tokens == b.tokens).all()
    np.testing.assert_allclose(a.logp, b.logp, atol=1e-4)
    np.testing.assert_allclose(a.lat, b.lat)


def test_cold_samples_equal_greedy_and_sampling_is_seeded(setup):
    model, batch, memory = setup
    g_tokens, g_logp = greedy(model, batch)
    for temperature in (0.0, 1e-6):
        cold = sample(model, memory, 3, temperature=temperature, generator=torch.Generator().manual_seed(0))
        assert (cold.tokens == g_tokens.numpy()[:, None]).all()
        np.testing.assert_allclose(cold.logp, np.repeat(g_logp.numpy()[:, None], 3, 1), atol=1e-5)
    a = sample(model, memory, 8, generator=torch.Generator().manual_seed(5))
    b = sample(model, memory, 8, generator=torch.Generator().manual_seed(5))
    assert (a.tokens == b.tokens).all()
    assert len({tuple(s) for s in a.tokens.reshape(-1, a.tokens.shape[-1])}) > 4  # it does explore


def test_a_seeded_images_samples_do_not_depend_on_its_batch(setup):
    model, batch, memory = setup
    whole = sample(model, memory, 6, seed=7)
    for b in range(memory.shape[0]):  # image b alone, with seed + b: the same draws
        alone = sample(model, memory[b : b + 1], 6, seed=7 + b)
        assert (alone.tokens[0] == whole.tokens[b]).all()
        np.testing.assert_allclose(alone.logp[0], whole.logp[b], atol=1e-5)
    other = sample(model, memory, 6, seed=8)
    assert (other.tokens != whole.tokens).any() and (
        sample(model, memory, 6, seed=7).tokens == whole.tokens
    ).all()
    # the draws follow the distribution: the first token's frequencies over many samples
    many = sample(model, memory[:1], 4000, seed=0)
    probs = torch.softmax(
        model.step(model.init_cache(memory[:1]), None, 0)[0, : model.cfg.vocab_sizes[0]], -1
    )
    freq = np.bincount(many.tokens[0, :, 0], minlength=len(probs)) / 4000
    np.testing.assert_allclose(freq, probs.numpy(), atol=0.03)


def test_top_k_1_and_tiny_top_p_are_greedy(setup):
    model, batch, memory = setup
    g_tokens, _ = greedy(model, batch)
    for kw in ({"sample_top_k": 1}, {"top_p": 1e-6}):
        s = sample(model, memory, 4, temperature=2.0, generator=torch.Generator().manual_seed(0), **kw)
        assert (s.tokens == g_tokens.numpy()[:, None]).all()


def test_constraint_only_emits_gallery_cells(setup):
    model, _, memory = setup
    vocab = model.cfg.vocab_sizes
    rng = np.random.default_rng(0)
    gallery = np.stack([rng.integers(0, v, 12) for v in vocab], axis=1)  # 12 cells
    c = PrefixConstraint(gallery, vocab)
    assert c.contains(gallery).all()
    beams = beam_search(model, memory, 5, constraint=c)
    samples = sample(model, memory, 10, constraint=c, generator=torch.Generator().manual_seed(0))
    assert c.contains(beams.tokens).all() and c.contains(samples.tokens).all()
    # the model's probabilities of all gallery cells: at most 1; renormalised over the allowed cells: 1
    everything = beam_search(model, memory, 12, constraint=c)
    assert (np.exp(everything.logp).sum(1) < 1).all()
    renorm = PrefixConstraint(gallery, vocab, renormalize=True)
    np.testing.assert_allclose(
        np.exp(beam_search(model, memory, 12, constraint=renorm).logp).sum(1), 1.0, atol=1e-5
    )
    # the kept tokens keep the model's probabilities: the best constrained path scores as the model does
    full = model.decode(
        memory.repeat_interleave(12, 0), torch.as_tensor(everything.tokens.reshape(-1, len(vocab)))
    )
    logp = torch.log_softmax(full.float(), -1).gather(
        -1, torch.as_tensor(everything.tokens.reshape(-1, len(vocab)))[..., None]
    )
    np.testing.assert_allclose(everything.logp.reshape(-1), logp.sum((1, 2)).detach().numpy(), atol=1e-4)
    # more beams than cells: the extra ones repeat the best with -inf
    wide = beam_search(model, memory, 20, constraint=c)
    assert np.isinf(wide.logp[:, 12:]).all() and np.isfinite(wide.logp[:, :12]).all()
    assert c.contains(wide.tokens).all()


def test_constraint_bad_input():
    with pytest.raises(GeoTokenError, match="row 1 position 0: 7"):
        PrefixConstraint(np.array([[0, 1], [7, 1]]), [6, 16])


def test_generate_dispatch(setup):
    model, batch, _ = setup
    for strategy, n in (("greedy", 1), ("beam", 3), ("sample", 5), ("beam+sample", 8)):
        pool, memory = generate(model, batch, strategy, beam_width=3, num_samples=5)
        assert pool.tokens.shape[:2] == (4, n) and memory.shape[0] == 4
        assert np.isfinite(pool.lat).all()
    with pytest.raises(GeoTokenError, match="strategy"):
        generate(model, batch, "best")


@pytest.mark.slow  # timed loops
def test_bench_decode_reports_every_figure(capsys):
    from geotoken.cli import main

    assert (
        main(
            [
                "bench",
                "decode",
                "--preset",
                "small",
                "--batch-size",
                "1",
                "--threads",
                "1",
                "--iters",
                "1",
                "--json",
            ]
        )
        == 0
    )
    import json

    res = json.loads(capsys.readouterr().out)
    for key in (
        "encoder",
        "greedy",
        "beam5",
        "sample10",
        "uncached_greedy",
        "uncached_beam5",
        "uncached_sample10",
    ):
        assert res[f"{key}_images_per_s"] > 0
    assert res["outputs_identical"] is True and set(res["ratio_vs_reference"]) == {
        "greedy",
        "beam5",
        "sample10",
    }


@pytest.mark.parametrize("strategy", ["greedy", "beam", "sample"])
def test_bf16_search_matches_its_uncached_path_and_mostly_fp32(setup, strategy):
    model, batch, _ = setup
    kw = dict(strategy=strategy, beam_width=4, num_samples=6, seed=3)
    fast, memory = generate(model, batch, dtype="bf16", **kw)
    slow, _ = generate(model, batch, dtype="bf16", cached=False, **kw)
    ref, _ = generate(model, batch, **kw)
    assert memory.dtype == torch.float32  # the residual stream and the memory stay fp32
    assert (fast.tokens == slow.tokens).all()
    np.testing.assert_allclose(fast.logp, slow.logp, atol=0.05)
    assert (fast.tokens == ref.tokens).all(-1).mean() >= 0.75  # bf16 rounding may flip near-ties
    with pytest.raises(GeoTokenError, match="dtype"):
        generate(model, batch, dtype="half")


def test_score_sequences_gives_the_teacher_forced_probabilities(setup):
    model, batch, memory = setup
    T, N = model.cfg.n_tokens, 3
    tokens = batch.nbr_tokens[:, :N]  # (B, N, T) the neighbours' cells
    pool = score_sequences(model, memory, tokens)
    logits = model.decode(memory.repeat_interleave(N, 0), tokens.reshape(-1, T))  # (B*N, T, V)
    ref = torch.log_softmax(logits, -1).gather(-1, tokens.reshape(-1, T, 1))[..., 0].view(-1, N, T).detach()
    np.testing.assert_allclose(np.log(pool.level_probs), ref.numpy(), atol=1e-5)
    np.testing.assert_allclose(pool.logp, ref.sum(-1).numpy(), atol=1e-5, rtol=1e-6)  # fp32 sum vs fp64
    assert (pool.tokens == tokens.numpy()).all()
    uncached = score_sequences(model, memory, tokens, cached=False)
    np.testing.assert_allclose(uncached.logp, pool.logp, atol=1e-4)


def test_sample_plus_retrieval_pools_samples_and_neighbour_cells(setup):
    model, batch, _ = setup
    pool, memory = generate(model, batch, "sample+retrieval", num_samples=4, retrieved=2, seed=1)
    samples, _ = generate(model, batch, "sample", num_samples=4, seed=1)
    assert pool.tokens.shape[:2] == (4, 6)
    assert (pool.tokens[:, :4] == samples.tokens).all()
    assert (pool.tokens[:, 4:] == batch.nbr_tokens[:, :2].numpy()).all()
    np.testing.assert_allclose(pool.logp[:, 4:], score_sequences(model, memory, batch.nbr_tokens[:, :2]).logp)
    with pytest.raises(GeoTokenError, match="pools 9 neighbours"):
        generate(model, batch, "sample+retrieval", retrieved=9)
    # greedy+sample+retrieval: the greedy answer first, then the same samples and neighbour cells
    full, _ = generate(model, batch, "greedy+sample+retrieval", num_samples=4, retrieved=2, seed=1)
    greedy, _ = generate(model, batch, "greedy")
    assert full.tokens.shape[:2] == (4, 7)
    assert (full.tokens[:, :1] == greedy.tokens).all() and (full.tokens[:, 1:] == pool.tokens).all()
    np.testing.assert_allclose(full.logp[:, 1:], pool.logp)

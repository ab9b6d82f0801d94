"""GeoToken model: shapes, masking, causality, the cached path against the full path, loss, save/load."""

import math

import pytest
import torch

import geotoken.model as model_module
from geotoken.errors import GeoTokenError
from geotoken.model import (
    ARCHS,
    Batch,
    Dropout,
    FoldedMemory,
    GeoToken,
    ModelConfig,
    attention,
    loss_weights,
    one_query_attention,
    precision,
    preset,
    project_heads,
    token_loss,
)
from helpers import tiny_model

torch.set_num_threads(1)
MODS = {"visual": 24, "gps": 16, "text": 8}


def make_batch(cfg: ModelConfig, B: int = 3, k_store: int = 5, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    vocab = torch.tensor(cfg.vocab_sizes)
    T = cfg.n_tokens
    tok = lambda *s: (torch.rand(*s, T, generator=g) * vocab).long()  # noqa: E731
    return Batch(
        {m: torch.randn(B, D, generator=g) for m, D in cfg.modalities.items()},
        {m: torch.randn(B, k_store, D, generator=g) for m, D in cfg.modalities.items()},
        tok(B, k_store),
        tok(B),
    )


def tiny(**kw) -> GeoToken:
    return tiny_model(MODS, k=4, **kw)


BOTH = pytest.mark.parametrize("arch", ARCHS)  # the equivalences hold for both layer designs


def test_presets_match_the_paper():
    p = preset("paper")
    assert (p.d_model, p.n_encoder_layers, p.n_decoder_layers, p.n_heads, p.d_ff) == (512, 10, 10, 8, 1024)
    assert (p.level, p.group, p.k, p.dropout) == (20, 2, 15, 0.1)
    assert p.n_tokens == 11 and p.vocab_sizes == [6] + [16] * 10
    assert p.seq_len == 4 + 15 * 14 == 214  # the paper's encoder length
    s = preset("small")
    assert (s.d_model, s.n_encoder_layers, s.d_ff, s.k) == (256, 4, 512, 15)
    with pytest.raises(GeoTokenError, match="preset"):
        preset("huge")
    with pytest.raises(GeoTokenError, match="k 31"):
        ModelConfig(k=31)


@BOTH
def test_logits_are_padded_with_minus_inf_beyond_each_vocabulary(arch):
    m = tiny(level=6, group=3, arch=arch)  # vocabularies [6, 64, 64]
    logits, loss = m(make_batch(m.cfg))
    assert logits.shape == (3, 3, 64)
    assert torch.isinf(logits[:, 0, 6:]).all() and torch.isfinite(logits[:, 0, :6]).all()
    assert torch.isfinite(logits[:, 1:]).all()
    assert torch.isfinite(loss)


def test_encoder_length_follows_the_ablation_flags():
    for kw, S in [
        ({}, 1 + 3 + 4 * (3 + 11)),
        ({"use_neighbour_tokens": False}, 1 + 3 + 4 * 3),
        ({"use_neighbour_embeddings": False}, 1 + 3 + 4 * 11),
    ]:
        m = tiny(**kw)
        assert m.encode(make_batch(m.cfg)).shape == (3, S, 128) and m.cfg.seq_len == S
    torch.manual_seed(0)
    m0 = GeoToken(preset("tiny", modalities={"visual": 24}, k=0)).eval()
    b = make_batch(m0.cfg)
    b = Batch(b.query, targets=b.targets)  # no neighbours at all
    assert m0.encode(b).shape == (3, 2, 128)
    assert torch.isfinite(m0(b)[1])


@BOTH
def test_only_the_first_k_neighbours_are_read(arch):
    m = tiny(arch=arch)
    b = make_batch(m.cfg, k_store=6)
    b2 = make_batch(m.cfg, k_store=6)
    b2 = Batch(
        b.query,
        {x: torch.cat([b.nbr[x][:, :4], b2.nbr[x][:, 4:]], 1) for x in b.nbr},
        b.nbr_tokens,
        b.targets,
    )
    assert torch.equal(m.encode(b), m.encode(b2))
    b2.nbr["gps"][:, 3] += 1.0  # the 4th neighbour is read
    assert not torch.allclose(m.encode(b), m.encode(b2))


def test_too_few_neighbours_is_a_clear_error():
    m = tiny()
    b = make_batch(m.cfg, k_store=3)
    with pytest.raises(GeoTokenError, match="k=4 neighbours"):
        m.encode(b)
    with pytest.raises(GeoTokenError, match="k=4 neighbours"):
        m.encode(Batch(b.query, targets=b.targets))


@BOTH
def test_samples_do_not_see_each_other(arch):
    m = tiny(arch=arch)
    b = make_batch(m.cfg, B=4)
    one = Batch(
        {x: v[:1] for x, v in b.query.items()},
        {x: v[:1] for x, v in b.nbr.items()},
        b.nbr_tokens[:1],
        b.targets[:1],
    )
    torch.testing.assert_close(m(b)[0][:1], m(one)[0], atol=1e-5, rtol=0)


@BOTH
def test_decoder_is_causal(arch):
    m = tiny(arch=arch)
    b = make_batch(m.cfg)
    memory = m.encode(b)
    logits = m.decode(memory, b.targets)
    changed = b.targets.clone()
    changed[:, 5] = (changed[:, 5] + 1) % 16
    logits2 = m.decode(memory, changed)
    torch.testing.assert_close(logits[:, :6], logits2[:, :6], atol=0, rtol=0)  # token 5 only feeds 6+
    assert not torch.allclose(logits[:, 6:], logits2[:, 6:])
    # a prefix gives the same logits as the full sequence for its positions
    torch.testing.assert_close(m.decode(memory, b.targets[:, :4]), logits[:, :4], atol=1e-5, rtol=0)


@BOTH
@pytest.mark.parametrize("broadcast_rows", [1, 10**9])  # self-attention of the step: both forms
@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("copies", [1, 3])
def test_cached_step_equals_full_decode(copies, fold, broadcast_rows, arch, monkeypatch):
    monkeypatch.setattr(model_module, "ONE_QUERY_BROADCAST_ROWS", broadcast_rows)
    m = tiny(arch=arch)
    b = make_batch(m.cfg)
    memory = m.encode(b)
    full = m.decode(memory, b.targets).repeat_interleave(copies, 0)  # (B*n, T, V)
    cache = m.init_cache(memory, copies=copies, fold=fold)
    assert isinstance(cache["layers"][0]["kv"], FoldedMemory) == fold
    targets = b.targets.repeat_interleave(copies, 0)
    steps = torch.stack(
        [m.step(cache, targets[:, p - 1] if p else None, p) for p in range(m.cfg.n_tokens)], 1
    )
    assert torch.equal(torch.isfinite(steps), torch.isfinite(full))
    fin = torch.isfinite(full)
    torch.testing.assert_close(steps[fin], full[fin], atol=1e-5, rtol=0)
    assert cache["layers"][0]["kv"][0].shape[0] == 3  # memory keys are per image, not per copy


@pytest.mark.parametrize("rows", [5, 40])  # below and above ONE_QUERY_BROADCAST_ROWS
def test_one_query_attention_equals_the_fused_kernel_on_per_head_views(rows):
    h, hd, t = 4, 8, 6
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(rows, h * hd, generator=g), *torch.randn(2, rows, t, h * hd, generator=g)
    heads = lambda x: x.view(rows, -1, h, hd).transpose(1, 2)  # noqa: E731
    want = torch.nn.functional.scaled_dot_product_attention(heads(q), heads(k), heads(v))
    got = one_query_attention(q, k, v, h)
    assert got.shape == (rows, h * hd)
    torch.testing.assert_close(got, want.reshape(rows, h * hd), atol=1e-6, rtol=0)


def test_init_cache_folds_the_memory_for_few_rows_in_full_precision_only():
    """T*copies*(h - 1) < d: greedy folds on the presets, 10 samples project, autocast projects."""
    for name in ("small", "paper"):
        m = GeoToken(preset(name, level=20, group=2, k=1)).eval()
        memory = torch.randn(2, m.cfg.seq_len, m.cfg.d_model)
        kinds = {n: type(m.init_cache(memory, copies=n)["layers"][0]["kv"]) for n in (1, 10)}
        assert kinds == {1: FoldedMemory, 10: tuple}, name
        with precision("bf16"):
            assert not isinstance(m.init_cache(memory)["layers"][0]["kv"], FoldedMemory)


@BOTH
def test_reorder_cache_follows_the_chosen_rows(arch):
    m = tiny(arch=arch)
    b = make_batch(m.cfg, B=1)
    memory = m.encode(b)
    seqs = torch.tensor([[0, 1, 2, 3], [5, 15, 0, 9]])  # two different prefixes of one image
    cache = m.init_cache(memory, copies=2)
    for p in range(3):
        m.step(cache, seqs[:, p - 1] if p else None, p)
    GeoToken.reorder_cache(cache, torch.tensor([1, 1]))  # both rows continue the second prefix
    out = m.step(cache, seqs[[1, 1], 2], 3)
    ref = m.decode(memory, seqs[1:2])[0, 3]
    torch.testing.assert_close(out, ref.expand(2, -1), atol=1e-5, rtol=0)


def test_loss_weights_and_definition():
    w = loss_weights(11)
    assert math.isclose(w.sum().item(), 1.0, rel_tol=1e-6)
    assert math.isclose((w[0] / w[-1]).item(), 2.0, rel_tol=1e-6)
    valid = torch.tensor([[True] * 3 + [False], [True] * 4])  # vocabularies [3, 4]
    logits = torch.tensor([[[1.0, 2.0, 0.5, -math.inf], [0.1, 0.2, 0.3, 0.4]]])
    targets = torch.tensor([[1, 3]])
    ce0 = -torch.log_softmax(logits[0, 0, :3], 0)[1]
    ce1 = -torch.log_softmax(logits[0, 1], 0)[3]
    expected = (2.0 * ce0 + 1.0 * ce1) / 3.0
    torch.testing.assert_close(token_loss(logits, targets, valid), expected)
    # smoothing spreads mass over each position's own vocabulary only: finite, and the formula holds
    ls = token_loss(logits, targets, valid, label_smoothing=0.1)
    u0 = -torch.log_softmax(logits[0, 0, :3], 0).mean()
    u1 = -torch.log_softmax(logits[0, 1], 0).mean()
    expected = (2.0 * (0.9 * ce0 + 0.1 * u0) + (0.9 * ce1 + 0.1 * u1)) / 3.0
    torch.testing.assert_close(ls, expected)


@BOTH
def test_training_step_reduces_loss_and_gradients_are_finite(arch):
    torch.manual_seed(0)
    m = GeoToken(preset("tiny", modalities=MODS, k=4, dropout=0.0, arch=arch))
    b = make_batch(m.cfg, B=8)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    first = None
    for _ in range(15):
        _, loss = m(b, label_smoothing=0.1)
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.5 * first


@BOTH
def test_save_load_roundtrip(tmp_path, arch):
    m = tiny(arch=arch)
    b = make_batch(m.cfg)
    m.save(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    m2 = GeoToken.load(tmp_path / "m")
    assert m2.cfg == m.cfg
    torch.testing.assert_close(m2(b)[0], m(b)[0], atol=0, rtol=0)
    with pytest.raises(GeoTokenError, match="config.json"):
        GeoToken.load(tmp_path)


@BOTH
def test_greedy_matches_argmax_of_full_decode(arch):
    from geotoken.search.decode import greedy

    m = tiny(arch=arch)
    b = make_batch(m.cfg)
    tokens, logp = greedy(m, b)
    assert tokens.shape == (3, 11) and tokens.dtype == torch.long
    assert (tokens < torch.tensor(m.cfg.vocab_sizes)).all()
    lp = torch.log_softmax(m.decode(m.encode(b), tokens), -1)  # teacher-forced on its own output
    assert torch.equal(lp.argmax(-1), tokens)
    torch.testing.assert_close(lp.gather(-1, tokens[..., None])[..., 0].sum(1), logp, atol=1e-4, rtol=0)


@pytest.mark.parametrize("level,group", [(20, 2), (6, 3), (7, 2), (30, 4)])
def test_vocabularies_match_the_s2_tokens(level, group):
    s2 = pytest.importorskip("geotoken.s2")
    cfg = ModelConfig(level=level, group=group)
    assert cfg.vocab_sizes == s2.vocab_sizes(level, group)
    assert cfg.n_tokens == s2.latlon_to_tokens([10.0], [20.0], level, group).shape[-1]


@BOTH
def test_bf16_autocast_step_on_cpu_is_close_to_fp32(arch):
    torch.manual_seed(0)
    m = GeoToken(
        preset("tiny", d_model=32, n_heads=2, d_ff=64, modalities=MODS, k=2, level=6, dropout=0.0, arch=arch)
    )
    b = make_batch(m.cfg, B=2)
    _, ref = m(b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = m(b)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(logits[:, 1:]).all()
    assert 0 < abs(loss.item() - ref.item()) < 0.05  # bf16 matmuls ran, and stay close
    assert all(
        p.grad is None or (p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all())
        for p in m.parameters()
    )


def test_cpu_dropout_keeps_1_minus_p_scales_and_is_seeded():
    drop = Dropout(0.1).train()
    x = torch.ones(200_003)  # not a multiple of 4: the last 64-bit draw is cut
    torch.manual_seed(5)
    y = drop(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.005
    assert torch.equal(y[kept], torch.full_like(y[kept], 65536 / (65536 - round(0.1 * 65536))))
    assert abs(y.mean().item() - 1.0) < 0.01  # unbiased
    torch.manual_seed(5)
    g = torch.ones(200_003, requires_grad=True)
    drop(g).sum().backward()
    assert torch.equal(g.grad, y)  # same seed, same mask (runs resume to the bit); gradient = mask * scale
    bf = drop(torch.ones(5, 7, dtype=torch.bfloat16))
    assert bf.dtype == torch.bfloat16 and bf.shape == (5, 7)
    assert torch.equal(drop.eval()(x), x) and torch.equal(Dropout(0.0).train()(x), x)
    assert torch.equal(Dropout(1.0).train()(x), torch.zeros_like(x))
    with pytest.raises(GeoTokenError, match="dropout probability"):
        Dropout(1.5)


def test_residual_dropout_is_the_sum_with_the_same_mask_and_gradients():
    drop = Dropout(0.25).train()
    x = torch.randn(3, 7, 11, requires_grad=True)
    y = torch.randn(3, 7, 11, requires_grad=True)
    torch.manual_seed(9)
    out = drop.residual(x, y)
    torch.manual_seed(9)
    ref = x.detach() + drop(y.detach())
    assert torch.allclose(out, ref, atol=1e-6) and not torch.equal(out, x + y)
    g = torch.randn_like(out)
    out.backward(g)
    kept = ref != x.detach()  # where dropout kept y's element
    assert torch.equal(x.grad, g)  # the stream passes its gradient through
    assert torch.allclose(y.grad, torch.where(kept, g * drop.scale, 0.0), atol=1e-6)
    lo = drop.residual(x.detach(), y.detach().bfloat16())  # a bf16 branch joins an fp32 stream
    assert lo.dtype == torch.float32
    assert torch.equal(drop.eval().residual(x, y), x + y)
    assert torch.equal(Dropout(0.0).train().residual(x, y), x + y)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("L", [1, 7, 9])
def test_bf16_cpu_attention_matches_fused_attention(causal, L):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, L, 16, generator=g)
    k, v = torch.randn(2, 3, 9, 16, generator=g), torch.randn(2, 3, 9, 16, generator=g)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    out = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal)  # explicit matmuls
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.05)
    torch.testing.assert_close(attention(q, k, v, causal), ref)  # fp32: the fused kernel itself


def test_precision_names():
    with precision("bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with precision("fp32"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with pytest.raises(GeoTokenError, match="dtype 'fp16'"):
        precision("fp16")


@BOTH
def test_a_cache_made_in_bf16_steps_in_fp32_and_back(arch):
    m = tiny(arch=arch)
    b = make_batch(m.cfg)
    memory = m.encode(b)
    ref = m.step(m.init_cache(memory), None, 0)
    with precision("bf16"):
        cache = m.init_cache(memory)  # bf16 keys/values
    torch.testing.assert_close(m.step(cache, None, 0), ref, atol=0.05, rtol=0.05)
    cache = m.init_cache(memory)  # fp32 keys/values, stepped in bf16
    with precision("bf16"):
        torch.testing.assert_close(m.step(cache, None, 0).float(), ref, atol=0.05, rtol=0.05)


# ------------------------------------------------------------------------------ arch "authors"
def test_arch_config_defaults_round_trip_and_old_configs():
    ours, authors = ModelConfig(), ModelConfig(arch="authors")
    assert (ours.arch, ours.attn_dropout) == ("ours", 0.0)
    assert (authors.attn_dropout, authors.dropout) == (
        0.1,
        0.1,
    )  # nn.Transformer: attention dropout = dropout
    assert ModelConfig(arch="authors", dropout=0.2).attn_dropout == 0.2
    assert ModelConfig(arch="authors", attn_dropout=0.0).attn_dropout == 0.0  # an explicit value stays
    for cfg in (ours, authors):
        assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    old = ours.to_dict()
    del old["arch"]  # a config.json written before the field existed
    assert ModelConfig.from_dict(old) == ours
    with pytest.raises(GeoTokenError, match="arch 'pre-ln'"):
        ModelConfig(arch="pre-ln")


def test_authors_checkpoint_round_trip_keeps_the_arch(tmp_path):
    m = tiny(arch="authors")
    m.save(tmp_path / "m")
    m2 = GeoToken.load(tmp_path / "m")
    assert m2.cfg.arch == "authors" and not hasattr(m2, "slot_emb")
    b = make_batch(m.cfg)
    torch.testing.assert_close(m2(b)[0], m(b)[0], atol=0, rtol=0)
    ours = tiny()  # the two designs' checkpoints do not load into each other
    ours.save(tmp_path / "o")
    (tmp_path / "o" / "config.json").write_text((tmp_path / "m" / "config.json").read_text())
    with pytest.raises(GeoTokenError, match="does not match"):
        GeoToken.load(tmp_path / "o")


def _torch_layers(m: GeoToken):
    """nn.TransformerEncoderLayer / DecoderLayer (the authors' modules) holding layer 0's weights of `m`."""
    cfg = m.cfg
    kw = dict(
        d_model=cfg.d_model,
        nhead=cfg.n_heads,
        dim_feedforward=cfg.d_ff,
        dropout=cfg.dropout,
        batch_first=True,
    )
    enc, dec = torch.nn.TransformerEncoderLayer(**kw).eval(), torch.nn.TransformerDecoderLayer(**kw).eval()
    ours_e, ours_d = m.encoder[0], m.decoder[0]
    with torch.no_grad():
        for ref, mine in ((enc, ours_e), (dec, ours_d)):
            ref.self_attn.in_proj_weight.copy_(mine.attn.qkv.weight)
            ref.self_attn.in_proj_bias.copy_(mine.attn.qkv.bias)
            ref.self_attn.out_proj.load_state_dict(mine.attn.proj.state_dict())
            ref.linear1.load_state_dict(mine.mlp.fc.state_dict())
            ref.linear2.load_state_dict(mine.mlp.proj.state_dict())
            for i in (1, 2, 3) if ref is dec else (1, 2):
                getattr(ref, f"norm{i}").load_state_dict(getattr(mine, f"ln{i}").state_dict())
        cross = ours_d.cross
        dec.multihead_attn.in_proj_weight.copy_(torch.cat([cross.q.weight, cross.kv.weight]))
        dec.multihead_attn.in_proj_bias.copy_(torch.cat([cross.q.bias, cross.kv.bias]))
        dec.multihead_attn.out_proj.load_state_dict(cross.proj.state_dict())
    return enc, dec


def test_authors_layers_are_torch_transformer_layers():
    """Post-LN, ReLU, the same residual order: outputs equal nn.Transformer*Layer's (eval mode)."""
    m = tiny(arch="authors")
    enc, dec = _torch_layers(m)
    g = torch.Generator().manual_seed(0)
    x, mem, y = (torch.randn(2, n, 128, generator=g) for n in (9, 9, 5))
    torch.testing.assert_close(m.encoder[0](x), enc(x), atol=1e-5, rtol=1e-5)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(5)
    kv = m.decoder[0].cross.memory_kv(mem)
    torch.testing.assert_close(m.decoder[0](y, kv), dec(y, mem, tgt_mask=mask), atol=1e-5, rtol=1e-5)
    ours = tiny()  # and "ours" is not (pre-LN, GELU): the check can fail
    enc_o, _ = _torch_layers(ours)
    assert not torch.allclose(ours.encoder[0](x), enc_o(x), atol=1e-3)


def test_authors_decoder_reads_sinusoidal_positions_at_the_absolute_position():
    m = tiny(arch="authors")
    b = make_batch(m.cfg, B=2)
    memory = m.encode(b)
    ref = m.decode(memory, b.targets)
    with torch.no_grad():
        m.dec_pos[4] += 1.0  # position 4's input changes: logits 0..3 stay, 4.. move (full and cached)
    full = m.decode(memory, b.targets)
    cache = m.init_cache(memory)
    steps = torch.stack(
        [m.step(cache, b.targets[:, p - 1] if p else None, p) for p in range(m.cfg.n_tokens)], 1
    )
    fin = torch.isfinite(ref)
    torch.testing.assert_close(full[:, :4], ref[:, :4], atol=0, rtol=0)
    assert not torch.allclose(full[:, 4:][fin[:, 4:]], ref[:, 4:][fin[:, 4:]])
    torch.testing.assert_close(steps[fin], full[fin], atol=1e-5, rtol=0)


def test_authors_attention_dropout_is_on_in_training_only():
    m = tiny(arch="authors")
    b = make_batch(m.cfg)
    assert m.encoder[0].attn.p == 0.1 and tiny().encoder[0].attn.p == 0.0
    torch.testing.assert_close(m(b)[0], m(b)[0], atol=0, rtol=0)  # eval: deterministic
    m.train()
    torch.manual_seed(1)
    a = m(b)[1]
    torch.manual_seed(2)
    assert a.item() != m(b)[1].item()


def test_project_heads_is_one_projection_with_or_without_gradients():
    lin = torch.nn.Linear(16, 3 * 16)
    x = torch.randn(2, 5, 16, requires_grad=True)
    fused = lin(x).view(2, 5, 3, 4, 4).permute(2, 0, 3, 1, 4)  # the single-matmul layout, (3, B, h, L, hd)
    split = project_heads(lin, x, 3, 4)  # with gradients: one matmul per block of rows
    g = torch.randn_like(fused)
    want = torch.autograd.grad(fused, [x, lin.weight, lin.bias], g)
    got = torch.autograd.grad(torch.stack(split), [x, lin.weight, lin.bias], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    with torch.no_grad():
        torch.testing.assert_close(torch.stack(project_heads(lin, x, 3, 4)), fused.detach())
    assert [t.shape for t in split] == [(2, 4, 5, 4)] * 3


@pytest.mark.slow  # a subprocess with its own torch import
def test_fold_benchmark_times_both_forms_and_finds_the_same_tokens():
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "fold.py"
    args = ["--preset", "small", "--batch-size", "2", "--threads", "1", "--rounds", "1"]
    res = json.loads(
        subprocess.run(
            [sys.executable, str(script), *args], capture_output=True, text=True, check=True
        ).stdout
    )
    rows = res["decoders"]
    assert {k: r["default_folds"] for k, r in rows.items()} == {"greedy": True, "beam2": True, "beam5": False}
    assert all(r["same_tokens"] and r["folded_s"] > 0 and r["projected_s"] > 0 for r in rows.values())
    assert (
        rows["greedy"]["projected_over_folded"] == rows["greedy"]["projected_s"] / rows["greedy"]["folded_s"]
    )

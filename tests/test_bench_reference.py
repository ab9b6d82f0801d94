"""The reference-style model behind the same-run speed ratios: its uncached decoding decodes correctly, it
runs at the precision it is asked for, and `bench decode|train` take their ratios from it, not from the
published constants (which appear only as labelled context)."""

import json

import pytest
import torch

from geotoken.bench.reference import ReferenceGeoToken, bench_reference, reference_decode, reference_encode
from geotoken.bench.train import published_context
from geotoken.cli import main

VOCAB = [6, 16, 16]


@pytest.fixture(scope="module")
def memory():
    torch.manual_seed(0)
    model = ReferenceGeoToken(32, 1, 2, 64, 0.0, VOCAB, dim=8).eval()
    B, k = 3, 2
    query = {m: torch.randn(B, 8) for m in ("visual", "gps", "text")}
    nbr = {m: torch.randn(B, k, 8) for m in ("visual", "gps", "text")}
    tokens = torch.stack([torch.randint(0, v, (B, k)) for v in VOCAB], -1)
    with torch.no_grad():
        return model, reference_encode(model, query, nbr, tokens)


def path_logp(model, memory, tokens):
    """Total log-probability of each (B, n, T) sequence under the reference model, scored one step at a time."""
    from geotoken.bench.reference import reference_next_logp

    B, n, T = tokens.shape
    mem = memory.repeat_interleave(n, 1)
    flat, total = tokens.reshape(B * n, T), torch.zeros(B * n)
    for t in range(T):
        total += reference_next_logp(model, mem, flat[:, :t]).gather(1, flat[:, t : t + 1])[:, 0]
    return total.view(B, n)


def test_reference_decoding(memory):
    model, mem = memory
    with torch.no_grad():
        greedy = reference_decode(model, mem, "greedy")
        beam1 = reference_decode(model, mem, "beam", 1)
        beams = reference_decode(model, mem, "beam", 5)
        samples = reference_decode(model, mem, "sample", 7, torch.Generator().manual_seed(0))
        assert greedy.shape == (3, 1, 3) and beams.shape == (3, 5, 3) and samples.shape == (3, 7, 3)
        assert torch.equal(greedy, beam1)  # one beam is greedy
        scores = path_logp(model, mem, beams)
        assert (scores[:, :-1] >= scores[:, 1:] - 1e-5).all()  # best first
        assert (scores[:, 0] >= path_logp(model, mem, greedy)[:, 0] - 1e-5).all()  # never worse than greedy
        for t, v in enumerate(VOCAB):
            assert 0 <= samples[..., t].min() and samples[..., t].max() < v
        again = reference_decode(model, mem, "sample", 7, torch.Generator().manual_seed(0))
        assert torch.equal(samples, again)


def test_reference_step_runs_at_the_asked_precision():
    out = bench_reference("tiny", 2, iters=1, warmup=0, rows=64, dtype="bf16")
    assert out["dtype"] == "bf16" and out["train_samples_per_s"] > 0
    context = published_context("small", 32, 28.4)
    assert context["ours_over_published"] == pytest.approx(2.0) and "not measured" in context["note"]
    assert published_context("tiny", 2, 1.0) is None


@pytest.mark.slow  # timed loops of the small preset
def test_bench_decode_ratio_is_same_run(capsys):
    args = ["bench", "decode", "--preset", "small", "--batch-size", "1", "--threads", "1", "--iters", "1"]
    assert main(args + ["--no-uncached", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["reference_dtype"] == res["dtype"] == "fp32"
    for n in ("greedy", "beam5", "sample10"):
        ours, ref = res[f"{n}_images_per_s"], res[f"reference_{n}_images_per_s"]
        assert res["ratio_vs_reference"][n] == pytest.approx(ours / ref)
        assert 0 < res["share_of_fp32_matmul_peak"][n] < 2
        (probe,) = res["matmul_probes_gflops"]  # one round, so one probe, paired with it
        assert res["share_of_fp32_matmul_peak"][n] == pytest.approx(res["achieved_gflops"][n] / probe)
        assert res["share_of_encoder_bound"][n] == pytest.approx(ours / res["encoder_images_per_s"])
    assert "not measured" in res["published_context"]["note"]
    assert main(args + ["--no-uncached", "--no-reference", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ratio_vs_reference"] is None

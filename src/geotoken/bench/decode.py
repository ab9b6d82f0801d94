"""Decoding benchmark: images/s of greedy, beam-5 and 10-sample decoding, cached vs uncached, in one run.

Random inputs shaped like the paper's (three 768-d embeddings, k = 15 neighbours, level 20, g = 2), eval
mode, fp32 (or bf16 autocast with `dtype="bf16"`, which also reports how many sequences match fp32's).
Every figure includes the encoder, as the reference figures do; `encoder_images_per_s` is the bound
(decoding cannot be cheaper than encoding the memory once). The uncached path re-runs the whole decoder
on the prefix at every step for every beam/sample, as the reference code does; the benchmark also checks
that both paths return the same tokens.

`ratio_vs_reference` is against the reference-style model (`geotoken.bench.reference`: the authors'
structure, seq-first `nn.Transformer` layers, per-neighbour loops, uncached decoding) timed in the same
rounds of the same run at the same precision; the authors' published figures are only `published_context`.
`share_of_fp32_matmul_peak`: FLOPs of each decoder (counted once) per second over this run's fp32 2048²
matmul rate.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from geotoken.bench.common import PAPER_INPUTS, check_at_least, set_threads
from geotoken.bench.reference import ReferenceGeoToken, reference_decode, reference_encode
from geotoken.bench.train import count_flops, matmul_gflops
from geotoken.model import Batch, GeoToken, precision
from geotoken.model import preset as model_preset
from geotoken.search.decode import beam_search, sample

# The authors' code on the issue's machine (2 threads, fp32, random inputs, k 15, level 20, g 2), from the
# issue: context only (`published_context`); the keys are also the presets `bench decode` offers.
REFERENCE = {
    "small": {"batch": 16, "encoder": 125.0, "greedy": 32.6, "beam5": 7.9, "sample10": 3.7},
    "paper": {"batch": 8, "encoder": 16.2, "greedy": 3.8, "beam5": 1.08, "sample10": 0.49},
}
DECODERS = ("greedy", "beam5", "sample10")


def bench_decode(
    preset: str = "small",
    batch_size: int | None = None,
    threads: int = 0,
    iters: int = 3,
    uncached: bool = True,
    seed: int = 0,
    dtype: str = "fp32",
    reference: bool = True,
) -> dict:
    """{preset, batch, threads, dtype, iters, params, encoder_positions, encoder_images_per_s,
    <s>_images_per_s and (uncached) uncached_<s>_images_per_s for s in DECODERS, outputs_identical
    (uncached), fp32_sequence_agreement {s: share} (not fp32), matmul_gflops_fp32, achieved_gflops {s},
    share_of_fp32_matmul_peak {s} (per round against the probe after it, the median; matmul_gflops_fp32 is the
    median of matmul_probes_gflops), share_of_encoder_bound {s} (the bound: encoder_images_per_s),
    ratio_vs_uncached {s} (uncached), with `reference`: reference_dtype, reference_encoder_images_per_s,
    reference_<s>_images_per_s, ratio_vs_reference {s} (same run, same precision; else None), and
    published_context {batch, images_per_s, ours_over_published, note}.

    batch_size None: the published reference's (16 small / 8 paper); threads 0: torch's current setting."""
    check_at_least(1, batch_size=batch_size, iters=iters)
    threads = set_threads(threads)
    torch.manual_seed(seed)
    batch_size = batch_size or REFERENCE[preset]["batch"]
    cfg = model_preset(preset, **PAPER_INPUTS)
    model = GeoToken(cfg).eval()
    with torch.no_grad():  # untrained heads are zero; random ones make beams and samples differ
        model.head_w.normal_(0, 0.05)
    model.requires_grad_(False)  # inference only (and FLOP counting's module hooks expect no grad leaves)
    g = torch.Generator().manual_seed(seed)
    B, k, T = batch_size, cfg.k, cfg.n_tokens
    inputs = Batch(
        {m: torch.randn(B, d, generator=g) for m, d in cfg.modalities.items()},
        {m: torch.randn(B, k, d, generator=g) for m, d in cfg.modalities.items()},
        torch.randint(0, 4, (B, k, T), generator=g),
    )

    def strategy(name: str, cached: bool, dtype: str = dtype):
        def fn():
            with torch.no_grad(), precision(dtype):
                memory = model.encode(inputs)
                if name == "greedy":
                    return sample(model, memory, 1, temperature=0.0, cached=cached)
                if name == "beam5":
                    return beam_search(model, memory, 5, cached=cached)
                return sample(model, memory, 10, generator=torch.Generator().manual_seed(1), cached=cached)

        return fn

    def encoder():
        with torch.no_grad(), precision(dtype):
            model.encode(inputs)

    names = DECODERS
    fns = {"encoder": encoder, **{n: strategy(n, True) for n in names}}
    if uncached:
        fns.update({f"uncached_{n}": strategy(n, False) for n in names})
    if reference:  # the authors' structure on the same inputs, same precision, timed in the same rounds
        torch.manual_seed(seed)
        ref_model = ReferenceGeoToken(cfg.d_model, cfg.n_encoder_layers, cfg.n_heads, cfg.d_ff, cfg.dropout,
                                      cfg.vocab_sizes, dim=next(iter(cfg.modalities.values()))).eval()  # fmt: skip

        def ref_strategy(name: str):
            kind, width = {"encoder": ("encoder", 0), "greedy": ("greedy", 1), "beam5": ("beam", 5),
                           "sample10": ("sample", 10)}[name]  # fmt: skip

            def fn():
                with torch.no_grad(), precision(dtype):
                    memory = reference_encode(ref_model, inputs.query, inputs.nbr, inputs.nbr_tokens)
                    if kind != "encoder":
                        return reference_decode(
                            ref_model, memory, kind, width, torch.Generator().manual_seed(1)
                        )

            return fn

        fns.update({f"reference_{n}": ref_strategy(n) for n in ("encoder", *names)})
        for name in ("encoder", *names):
            fns[f"reference_{name}"]()  # warm-up
    for name in ("encoder", *names):
        fns[name]()  # warm-up (allocator, thread pool)
    # Rounds visit every figure in turn, so a busy spell on a shared machine hits all of them alike; the
    # fastest round of each figure is kept (the least disturbed estimate). The uncached path gets half the
    # rounds: it is the slow one. The reference-style model runs in every round, as ours: its ratio must not
    # favour whichever side happened to run in the machine's quiet spells.
    # Each round ends with a matmul probe: the share of the peak pairs a round's times with its own probe
    # (on a shared VM the probe's rate moves with the machine's) and takes the median over rounds.
    best, last, seconds, probes = dict.fromkeys(fns, float("inf")), {}, {n: [] for n in names}, []
    for i in range(iters):
        for name, fn in fns.items():
            if name.startswith("uncached") and i >= max(1, iters // 2):
                continue
            t0 = time.perf_counter()
            last[name] = fn()
            dt = time.perf_counter() - t0
            best[name] = min(best[name], dt)
            if name in seconds:
                seconds[name].append(dt)
        probes.append(matmul_gflops(torch.float32, min_seconds=0.25))
    out = {
        "preset": preset,
        "batch": B,
        "threads": threads,
        "dtype": dtype,
        "iters": iters,
        "params": model.n_params(),
        "encoder_positions": cfg.seq_len,
        "encoder_images_per_s": B / best["encoder"],
    }
    for name in fns:
        if name != "encoder":
            out[f"{name}_images_per_s"] = B / best[name]
    if uncached:
        out["outputs_identical"] = all((last[n].tokens == last[f"uncached_{n}"].tokens).all() for n in names)
    if dtype != "fp32":  # share of (image, candidate) sequences equal to the fp32 cached path's
        same = [(last[n].tokens == strategy(n, True, "fp32")().tokens).all(-1) for n in names]
        out["fp32_sequence_agreement"] = {n: float(x.mean()) for n, x in zip(names, same)}
    flops = {n: count_flops(fns[n]) for n in names}
    out["matmul_gflops_fp32"], out["matmul_probes_gflops"] = float(np.median(probes)), probes
    out["achieved_gflops"] = {n: flops[n] * out[f"{n}_images_per_s"] / B / 1e9 for n in names}
    out["share_of_fp32_matmul_peak"] = {
        n: float(np.median([flops[n] / t / 1e9 / p for t, p in zip(seconds[n], probes)])) for n in names
    }
    if reference:
        out["reference_dtype"] = dtype
        out["ratio_vs_reference"] = {
            n: out[f"{n}_images_per_s"] / out[f"reference_{n}_images_per_s"] for n in names
        }
    else:
        out["ratio_vs_reference"] = None
    published = REFERENCE[preset]
    out["published_context"] = {
        "batch": published["batch"],
        "images_per_s": {n: published[n] for n in ("encoder", *names)},
        "ours_over_published": {n: out[f"{n}_images_per_s"] / published[n] for n in names},
        "note": "the authors' code on the issue's machine, fp32, not measured in this run",
    }
    if uncached:
        out["ratio_vs_uncached"] = {
            n: out[f"{n}_images_per_s"] / out[f"uncached_{n}_images_per_s"] for n in names
        }
    out["share_of_encoder_bound"] = {n: out[f"{n}_images_per_s"] / out["encoder_images_per_s"] for n in names}
    return out

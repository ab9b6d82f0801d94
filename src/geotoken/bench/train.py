"""Training-speed benchmark on random inputs shaped like the paper's (three 768-d embeddings per image,
k 15, level 20, g 2, a 20,000-row gallery): one forward + backward + AdamW step per iteration, with the
batch assembled from the gallery arrays by indexing, as in real training.

Also measures this machine's matmul peak (2048 x 2048, fp32 and bf16) and the share of it the training
step achieves, from the FLOPs `torch.utils.flop_counter` counts for one step, and times the reference-style
step (`geotoken.bench.reference`) on the same inputs in the same process.
"""

from __future__ import annotations

import platform
import resource
import time
from collections.abc import Callable

import numpy as np
import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from geotoken import DTYPES
from geotoken.bench.common import (
    GALLERY_ROWS,
    PAPER_INPUTS,
    check_at_least,
    random_data,
    set_threads,
    time_steps,
)
from geotoken.bench.reference import bench_reference
from geotoken.model import ARCHS, GeoToken, attention, precision, preset
from geotoken.train.loop import TrainConfig, make_optimizer

# The authors' code on the issue's machine type: 2 threads, fp32, random inputs (see issue 5). Context only:
# every ratio is against the reference-style step timed in the same run at the same precision.
REFERENCE_SAMPLES_PER_S = {("small", 32): 14.2, ("paper", 16): 2.35}


def published_context(name: str, batch_size: int, samples_per_s: float) -> dict | None:
    """The authors' published figure for this preset and batch (another machine, another day, fp32), and
    ours over it: labelled context, not a measured ratio. None where there is no published figure."""
    published = REFERENCE_SAMPLES_PER_S.get((name, batch_size))
    if not published:
        return None
    return {
        "samples_per_s": published,
        "ours_over_published": samples_per_s / published,
        "note": "the authors' code on the issue's machine, fp32, not measured in this run",
    }


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def matmul_gflops(dtype: torch.dtype, n: int = 2048, min_seconds: float = 0.5) -> float:
    """Achieved GFLOP/s of an n x n matmul (the machine's practical peak for this dtype).

    A CPU without native bf16 (no AVX-512 BF16 / AMX) runs bf16 matmuls orders of magnitude slower;
    there a 512 x 512 probe stands in for the 2048 one, which would take minutes.
    """
    p = torch.randn(512, 512).to(dtype)
    t0 = time.perf_counter()
    p @ p
    if (time.perf_counter() - t0) * (n / 512) ** 3 > 5.0:
        n = 512
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b  # warm-up
    reps, t0 = 0, time.perf_counter()
    while (dt := time.perf_counter() - t0) < min_seconds or reps < 2:
        a @ b
        reps += 1
    return 2 * n**3 * reps / dt / 1e9


def matmul_peaks() -> dict[str, float]:
    """{"fp32": GFLOP/s, "bf16": GFLOP/s}: `matmul_gflops` of both dtypes, as every training figure uses them."""
    return {"fp32": matmul_gflops(torch.float32), "bf16": matmul_gflops(torch.bfloat16, min_seconds=0.2)}


def _cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


def _cpu_attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


# torch's FLOP counter knows the CUDA attention kernels but not the CPU's fused one, which fp32 attention
# runs on this path: without these, every fp32 attention FLOP would count as zero (bf16's explicit
# matmuls are counted), and shares of the peak would be understated.
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops,
}


def count_flops(fn: Callable[[], None]) -> int:
    """FLOPs of one call of `fn` (torch's counter, plus the CPU's fused attention)."""
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        fn()
    return int(counter.get_total_flops())


def bench_ours(
    name: str,
    batch_size: int,
    dtype: str = "fp32",
    iters: int = 5,
    warmup: int = 2,
    seed: int = 0,
    rows: int = GALLERY_ROWS,
    compile: bool = False,
    arch: str = "ours",
    probe: torch.dtype | None = None,
) -> dict:
    """{seconds_per_step, train_samples_per_s, flops_per_step, n_params} of our training step at preset
    `name` with layers `arch` (compiled: `torch.compile`, whose compilation happens in the warm-up steps, at
    least two; FLOPs are counted on the eager model). With a `probe` dtype every timed step is followed by
    a matmul probe of it, and the result adds step_seconds and paired_peaks (GFLOP/s), one per step."""
    cfg = preset(name, **PAPER_INPUTS, arch=arch)
    torch.manual_seed(seed)
    model = GeoToken(cfg).train()
    opt = make_optimizer(model, TrainConfig())
    data = random_data(cfg, rows, seed)
    rng = np.random.default_rng(seed)
    net = torch.compile(model) if compile else model
    if compile:
        warmup = max(warmup, 2)

    def step(_: int, net: torch.nn.Module = net) -> None:
        b = data.batch(rng.integers(0, data.rows, batch_size), cfg)
        with precision(dtype):
            _, loss = net(b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    if probe is None:
        sec, paired = time_steps(step, iters, warmup), {}
    else:
        paired = {"step_seconds": [], "paired_peaks": []}
        for i in range(warmup + iters):
            t0 = time.perf_counter()
            step(i)
            if i >= warmup:
                paired["step_seconds"].append(time.perf_counter() - t0)
                paired["paired_peaks"].append(matmul_gflops(probe, min_seconds=0.25))
        sec = sum(paired["step_seconds"]) / iters
    flops = count_flops(lambda: step(0, model))
    return {
        "seconds_per_step": sec,
        "train_samples_per_s": batch_size / sec,
        "flops_per_step": flops,
        "n_params": model.n_params(),
        **paired,
    }


def attention_cost(
    name: str, batch_size: int, dtype: str = "fp32", iters: int = 3, arch: str = "ours"
) -> dict[str, float]:
    """{seconds, flops} of one training step's attention alone, forward + backward, through the model's own
    `attention` at the step's shapes: encoder self-attention (S x S), causal decoder self-attention
    (T x T) and cross-attention (T x S), once per layer. Its kernels work on head_dim-wide slices (32 at
    the presets), far from a large GEMM's rate, so this time is a floor no GEMM tuning removes. Timed as
    the step itself is (`time_steps`: the mean of `iters` calls after a warm-up)."""
    cfg = preset(name, **PAPER_INPUTS, arch=arch)
    B, h, hd = batch_size, cfg.n_heads, cfg.d_model // cfg.n_heads
    S, T = cfg.seq_len, cfg.n_tokens
    g = torch.Generator().manual_seed(0)
    shapes = [(S, S, False)] * cfg.n_encoder_layers + [(T, T, True), (T, S, False)] * cfg.n_decoder_layers
    inputs = [
        [torch.randn(B, h, n, hd, generator=g).requires_grad_() for n in (L, Sk, Sk)] + [causal]
        for L, Sk, causal in shapes
    ]

    def step() -> None:
        for q, k, v, causal in inputs:
            with precision(dtype):
                y = attention(q, k, v, causal, dropout_p=cfg.attn_dropout)
            y.float().sum().backward()

    flops = count_flops(step)
    return {"seconds": time_steps(lambda _: step(), iters, warmup=1), "flops": flops}


def bench_train(
    name: str = "small",
    batch_size: int = 32,
    threads: int = 0,
    dtype: str = "fp32",
    compile: bool = False,
    iters: int = 5,
    warmup: int = 1,
    rows: int = GALLERY_ROWS,
    reference: bool = False,
    arch: str = "ours",
    compare_archs: bool = False,
) -> dict:
    """{preset, arch, batch, threads, dtype, compile, gallery_rows, torch, cpu, matmul_gflops_fp32,
    matmul_gflops_bf16, <bench_ours' figures with step_seconds and paired_peaks>, peak_rss_mb,
    achieved_gflops, share_of_matmul_peak (of the run's dtype: the median over the timed steps of each
    step's rate over the probe right after it; matmul_gflops of that dtype is the median probe),
    share_of_matmul_peak_range, share_of_best_probe (the mean step against the run's fastest probe),
    share_of_fp32_matmul_peak, attention_seconds_per_step and attention_flops_per_step
    (`attention_cost`), attention_share_of_step, share_of_matmul_peak_bound (the share the step would reach
    with its attention as measured and every other FLOP at the matmul peak, nothing else costing time: the
    most that speeding up the GEMMs and elementwise work can give), published_context (labelled; None without a published figure)
    and, with `reference`, reference_samples_per_s, reference_dtype and ratio_side_by_side = ratio_vs_reference
    (the reference-style step timed after ours, at the same precision); with `compare_archs`,
    arch_samples_per_s {arch: samples/s} of every layer design (`ARCHS`), timed alternately in rounds, best
    round each, and ratio_authors_to_ours.

    threads 0: torch's current setting. peak_rss_mb is read before the reference-style step runs."""
    check_at_least(1, batch_size=batch_size, iters=iters, rows=rows)
    threads = set_threads(threads)
    res = {"preset": name, "arch": arch, "batch": batch_size, "threads": threads, "dtype": dtype}
    res["compile"] = compile
    res["gallery_rows"] = rows
    res["torch"], res["cpu"] = torch.__version__, platform.processor() or platform.machine()
    before = matmul_peaks()
    probe = torch.bfloat16 if dtype == "bf16" else torch.float32
    ours = bench_ours(
        name, batch_size, dtype, iters, warmup, rows=rows, compile=compile, arch=arch, probe=probe
    )
    res.update(ours)
    res["peak_rss_mb"] = peak_rss_mb()  # before the reference runs in this process
    after = matmul_peaks()
    # On a shared VM the probe's rate moves with the machine's (109-188 GFLOP/s seen in one hour on one
    # box), so each timed step is paired with a probe right after it and the share is the median of the
    # pairs. share_of_best_probe sets the mean step against the fastest probe of the run: a lower bound.
    shares = [
        ours["flops_per_step"] / s / (p * 1e9) for s, p in zip(ours["step_seconds"], ours["paired_peaks"])
    ]
    res["share_of_matmul_peak"] = float(np.median(shares))
    res["share_of_matmul_peak_range"] = [min(shares), max(shares)]
    paired_peak = float(np.median(ours["paired_peaks"]))
    for d in DTYPES:  # the run's dtype: the median of its paired probes; the other: the faster probe
        res[f"matmul_gflops_{d}"] = paired_peak if d == dtype else max(before[d], after[d])
    peak = paired_peak
    res["achieved_gflops"] = ours["flops_per_step"] / ours["seconds_per_step"] / 1e9
    best_probe = max([before[dtype], after[dtype], *ours["paired_peaks"]])
    res["share_of_best_probe"] = res["achieved_gflops"] / best_probe
    res["share_of_fp32_matmul_peak"] = (
        res["share_of_matmul_peak"] if dtype == "fp32" else res["achieved_gflops"] / res["matmul_gflops_fp32"]
    )
    # the bound: the step with everything but attention at the matmul peak and no other cost
    att = attention_cost(name, batch_size, dtype, arch=arch)
    res["attention_seconds_per_step"], res["attention_flops_per_step"] = att["seconds"], att["flops"]
    res["attention_share_of_step"] = att["seconds"] / ours["seconds_per_step"]
    rest = max(ours["flops_per_step"] - att["flops"], 0) / (peak * 1e9)
    res["share_of_matmul_peak_bound"] = ours["flops_per_step"] / (peak * 1e9) / (att["seconds"] + rest)
    res["published_context"] = published_context(name, batch_size, ours["train_samples_per_s"])
    if reference:
        ref = bench_reference(name, batch_size, iters, warmup, rows=rows, dtype=dtype)
        res["reference_samples_per_s"] = ref["train_samples_per_s"]
        res["reference_dtype"] = ref["dtype"]
        res["ratio_side_by_side"] = ours["train_samples_per_s"] / ref["train_samples_per_s"]
        res["ratio_vs_reference"] = res["ratio_side_by_side"]
    if compare_archs:
        best = {a: 0.0 for a in ARCHS}
        for _ in range(2):  # alternating rounds: machine load hits both designs alike
            for a in ARCHS:
                run = bench_ours(name, batch_size, dtype, iters, warmup, rows=rows, compile=compile, arch=a)
                best[a] = max(best[a], run["train_samples_per_s"])
        res["arch_samples_per_s"] = best
        res["ratio_authors_to_ours"] = best["authors"] / best["ours"]
    return res


def side_by_side(
    name: str,
    batch_size: int,
    threads: int = 0,
    dtype: str = "fp32",
    compile: bool = False,
    iters: int = 3,
    rounds: int = 2,
    peaks: dict[str, float] | None = None,
) -> dict:
    """Ours and the reference-style step alternating `rounds` times in this process (so machine load hits
    both alike), the best round of each kept, the reference at the same precision: {preset, batch, threads,
    dtype, compile, train_samples_per_s, reference_samples_per_s, ratio_side_by_side, published_context
    (labelled; None without a published figure), matmul_gflops_fp32, matmul_gflops_bf16,
    share_of_matmul_peak, share_of_fp32_matmul_peak}.

    peaks: `matmul_peaks()` measured once for several calls (None: measured here); threads 0: torch's
    current setting."""
    threads = set_threads(threads)
    peaks = peaks or matmul_peaks()
    ours, ref = [], []
    for _ in range(rounds):
        ours.append(bench_ours(name, batch_size, dtype, iters, warmup=1, compile=compile))
        ref.append(bench_reference(name, batch_size, iters, warmup=1, dtype=dtype)["train_samples_per_s"])
    best = max(ours, key=lambda r: r["train_samples_per_s"])
    achieved = best["flops_per_step"] * best["train_samples_per_s"] / batch_size / 1e9
    return {
        "preset": name,
        "batch": batch_size,
        "threads": threads,
        "dtype": dtype,
        "compile": compile,
        "train_samples_per_s": best["train_samples_per_s"],
        "reference_samples_per_s": max(ref),
        "ratio_side_by_side": best["train_samples_per_s"] / max(ref),
        "published_context": published_context(name, batch_size, best["train_samples_per_s"]),
        "matmul_gflops_fp32": peaks["fp32"],
        "matmul_gflops_bf16": peaks["bf16"],
        "share_of_matmul_peak": achieved / peaks[dtype],
        "share_of_fp32_matmul_peak": achieved / peaks["fp32"],
    }

"""Training-speed benchmark on random inputs shaped like the paper's (three 768-d embeddings per image,
k 15, level 20, g 2, a 20,000-row gallery): one forward + backward + AdamW step per iteration, with the
batch assembled from the gallery arrays by indexing, as in real training.

Also measures this machine's matmul peak (2048 x 2048, fp32 and bf16) and the share of it the training
step achieves, from the FLOPs `torch.utils.flop_counter` counts for one step.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable

import numpy as np
import torch

from geotoken.model import GeoToken, ModelConfig, precision, preset

PAPER_INPUTS = dict(modalities={"visual": 768, "gps": 768, "text": 768}, k=15, level=20, group=2)
GALLERY_ROWS = 20_000
# The authors' code on this machine type: 2 threads, fp32, random inputs (see issue 5).
REFERENCE_SAMPLES_PER_S = {("small", 32): 14.2, ("paper", 16): 2.35}


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


def random_data(cfg: ModelConfig, rows: int = GALLERY_ROWS, seed: int = 0):
    """Gallery = training queries (as on MP16): float16 embeddings, int64 neighbour table and tokens."""
    from geotoken.gallery import Gallery
    from geotoken.train.data import TrainData

    rng = np.random.default_rng(seed)
    emb = {
        m: rng.standard_normal((rows, D), dtype=np.float32).astype(np.float16)
        for m, D in cfg.modalities.items()
    }
    tokens = (rng.random((rows, cfg.n_tokens)) * np.array(cfg.vocab_sizes)).astype(np.int64)
    nbr = rng.integers(0, rows, (rows, cfg.k + 1), dtype=np.int64)
    return TrainData(emb, Gallery(emb, tokens), nbr, tokens)


def time_steps(step: Callable[[int], None], iters: int, warmup: int) -> float:
    """Seconds per call of step(i), after `warmup` untimed calls."""
    for i in range(warmup):
        step(i)
    t0 = time.perf_counter()
    for i in range(warmup, warmup + iters):
        step(i)
    return (time.perf_counter() - t0) / iters


def count_flops(fn: Callable[[], None]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def bench_ours(
    name: str,
    batch: int,
    dtype: str = "fp32",
    iters: int = 5,
    warmup: int = 2,
    seed: int = 0,
    rows: int = GALLERY_ROWS,
    compile: bool = False,
) -> dict:
    """Samples/s and FLOPs of our training step at preset `name` (compiled: `torch.compile`, whose
    compilation happens in the warm-up steps, at least two; FLOPs are counted on the eager model)."""
    from geotoken.train.loop import TrainConfig, make_optimizer

    cfg = preset(name, **PAPER_INPUTS)
    torch.manual_seed(seed)
    model = GeoToken(cfg).train()
    opt = make_optimizer(model, TrainConfig())
    data = random_data(cfg, rows, seed)
    rng = np.random.default_rng(seed)
    net = torch.compile(model) if compile else model
    if compile:
        warmup = max(warmup, 2)

    def step(_: int, net: torch.nn.Module = net) -> None:
        b = data.batch(rng.integers(0, data.rows, batch), cfg)
        with precision(dtype):
            _, loss = net(b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    sec = time_steps(step, iters, warmup)
    flops = count_flops(lambda: step(0, model))
    return {
        "seconds_per_step": sec,
        "train_samples_per_s": batch / sec,
        "flops_per_step": flops,
        "n_params": model.n_params(),
    }

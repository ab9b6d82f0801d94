"""What the benchmarks share: the paper-shaped random inputs, a step timer, the thread setting."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from geotoken.errors import GeoTokenError
from geotoken.gallery import Gallery
from geotoken.model import ModelConfig
from geotoken.train.data import TrainData

PAPER_INPUTS = dict(modalities={"visual": 768, "gps": 768, "text": 768}, k=15, level=20, group=2)
GALLERY_ROWS = 20_000


def random_data(cfg: ModelConfig, rows: int = GALLERY_ROWS, seed: int = 0) -> TrainData:
    """Gallery = training queries (as on MP16): float16 embeddings, int64 neighbour table and tokens."""
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


def check_at_least(minimum: int, **values: int | None) -> None:
    """A GeoTokenError naming the first of `values` (None: not given) below `minimum`."""
    for name, value in values.items():
        if value is not None and value < minimum:
            raise GeoTokenError(f"{name} must be >= {minimum}, got {value}")


def set_threads(threads: int) -> int:
    """torch's intra-op threads: `threads`, or torch's current setting for 0; returns the count in use."""
    check_at_least(0, threads=threads)
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()

"""Generating token sequences from a trained GeoToken model with the cached decoder path."""

from __future__ import annotations

import torch

from geotoken.model import Batch, GeoToken


@torch.no_grad()
def greedy(model: GeoToken, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Most likely token at each position: (tokens (B, T) int64, summed log-probability (B,))."""
    memory = model.encode(batch)  # (B, S, d)
    cache = model.init_cache(memory)
    B, T = memory.shape[0], model.cfg.n_tokens
    tokens = torch.zeros(B, T, dtype=torch.long, device=memory.device)
    logp = torch.zeros(B, device=memory.device)
    for p in range(T):  # the autoregressive loop: one cached step per position
        lp = torch.log_softmax(
            model.step(cache, tokens[:, p - 1] if p else None, p).float(), dim=-1
        )  # (B, V)
        best, tokens[:, p] = lp.max(dim=-1)
        logp += best
    return tokens, logp

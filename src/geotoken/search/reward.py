"""A learned scorer of candidates: P(candidate within `radius_km` of the truth | image memory, candidate).

As in the paper, it reads the frozen GeoToken model's encoder memory and the candidate's tokens, and a
small head classifies whether the candidate is close enough. The head (d_model -> hidden):

    c   = mean_t tok_emb[token_t at position t]             (B, N, h)  the candidate's cell, coarse to fine
    a   = softmax(q(c) . memory / sqrt(d)) @ memory         (B, N, d)  what the image memory says about it
    out = MLP([c, W a, c * W a, per-level log-probs, logp])  (B, N)    a logit

The model's own per-level log-probabilities are inputs too, so the scorer starts from what `logp`
knows and learns when to overrule it. Trained with binary cross-entropy on beam and sample candidates
of training images (their neighbour tables exclude the image itself), with a held-out share of images
to report whether reward selection beats `logp` selection; the training lives in `geotoken.fit`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from geotoken.errors import GeoTokenError
from geotoken.io import atomic_path, read_json, write_json
from geotoken.search.candidates import Candidates, Selection, from_scores


@dataclass
class RewardConfig:
    radius_km: float = 200.0  # the paper's scorer: "within 200 km"
    hidden: int = 128
    beam_width: int = 5  # training candidates per image: beams + samples + retrieved neighbours' cells
    num_samples: int = 10
    retrieved: int = 5  # (at most the model's k) so the scorer also learns to judge retrieval candidates
    epochs: int = 8
    batch_size: int = 64  # images per step
    lr: float = 1e-3
    weight_decay: float = 1e-4
    max_images: int = 4000  # training images used (a random subset)
    holdout: float = 0.1  # share of those images kept for validation
    seed: int = 0

    def __post_init__(self) -> None:
        minimum = {"epochs": 1, "max_images": 1, "beam_width": 1, "num_samples": 0, "retrieved": 0}
        for name, low in minimum.items():
            if getattr(self, name) < low:
                raise GeoTokenError(f"reward scorer: {name} must be >= {low}, got {getattr(self, name)}")
        if not self.radius_km > 0:
            raise GeoTokenError(f"reward scorer: radius_km must be > 0, got {self.radius_km}")


_RENAMED = {"beams": "beam_width", "samples": "num_samples"}


class RewardScorer(nn.Module):
    def __init__(self, d_model: int, vocab_sizes: list[int], config: RewardConfig | None = None):
        super().__init__()
        self.config = config or RewardConfig()
        self.d_model, self.vocab_sizes = d_model, list(vocab_sizes)
        h, T = self.config.hidden, len(vocab_sizes)
        vocab = torch.tensor(vocab_sizes)
        self.register_buffer("offsets", torch.cumsum(vocab, 0) - vocab, persistent=False)  # (T,)
        self.tok_emb = nn.Embedding(int(vocab.sum()), h)
        self.q = nn.Linear(h, d_model)
        self.mem = nn.Linear(d_model, h)
        self.mlp = nn.Sequential(nn.Linear(3 * h + T + 1, h), nn.ReLU(), nn.Linear(h, 1))

    def forward(self, memory: torch.Tensor, tokens: torch.Tensor, level_logp: torch.Tensor) -> torch.Tensor:
        """memory (B, S, d), tokens (B, N, T) int64, level_logp (B, N, T) -> logits (B, N)."""
        c = self.tok_emb(tokens + self.offsets).mean(2)  # (B, N, h)
        att = torch.softmax(self.q(c) @ memory.transpose(1, 2) / math.sqrt(self.d_model), dim=-1)  # (B, N, S)
        a = self.mem(att @ memory)  # (B, N, h)
        lp = level_logp.clamp_min(-30.0)  # -inf (impossible beams) would poison the MLP
        x = torch.cat([c, a, c * a, lp, lp.sum(-1, keepdim=True)], dim=-1)
        return self.mlp(x)[..., 0]

    @torch.no_grad()
    def score(self, memory: torch.Tensor, pool: Candidates) -> np.ndarray:
        """(B, N) P(within radius) of each candidate of the pool."""
        dev = next(self.parameters()).device
        tokens = torch.as_tensor(pool.tokens, dtype=torch.long, device=dev)
        level_logp = torch.as_tensor(
            np.log(np.maximum(pool.level_probs, 1e-300)), dtype=torch.float32, device=dev
        )
        return torch.sigmoid(self(memory.float().to(dev), tokens, level_logp)).double().cpu().numpy()

    def save(self, directory: str | os.PathLike, **info) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(directory / "model.safetensors") as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(tmp))
        write_json(
            directory / "config.json",
            {
                "d_model": self.d_model,
                "vocab_sizes": self.vocab_sizes,
                "reward": dataclasses.asdict(self.config),
                **info,
            },
        )
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str = "cpu") -> RewardScorer:
        directory = Path(directory)
        if not (directory / "config.json").is_file() or not (directory / "model.safetensors").is_file():
            raise GeoTokenError(
                f"{directory}: not a reward scorer folder (needs config.json, model.safetensors)"
            )
        d = read_json(directory / "config.json")
        try:
            names = {_RENAMED.get(k, k): v for k, v in d["reward"].items()}  # folders saved before the rename
            scorer = cls(int(d["d_model"]), d["vocab_sizes"], RewardConfig(**names))
            scorer.load_state_dict(load_file(str(directory / "model.safetensors")))
        except (KeyError, TypeError, RuntimeError) as exc:
            raise GeoTokenError(f"{directory}: broken reward scorer: {exc}") from None
        return scorer.to(device).eval()


def select_reward(pool: Candidates, scorer: RewardScorer, memory: torch.Tensor) -> Selection:
    """The candidate the scorer finds most likely to be within its radius (ties: higher logp)."""
    if memory.shape[0] != pool.shape[0]:
        raise GeoTokenError(f"select_reward: memory for {memory.shape[0]} images, pool for {pool.shape[0]}")
    return from_scores(pool, scorer.score(memory, pool))

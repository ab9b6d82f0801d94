"""Learned scorers of candidates: P(candidate within `radius_km` of the truth | image, candidate).

Two kinds (`REWARD_KINDS`, `RewardConfig.kind`):

`decoder` (`DecoderRewardScorer`, the authors' `train_reward_n.py`): a fine-tuned copy of the whole
GeoToken model. Its encoder builds the memory as usual, its decoder runs teacher-forced over the
candidate's tokens (start vector + token embeddings, causal mask), and the last decoder state goes through
Linear(d, hidden) + ReLU + Linear(hidden, 2): two bins, within the radius (bin 0) or not (bin 1). Every
weight is trained (AdamW over all of them), so the scorer keeps its own copy of the model's weights. The
chosen candidate: the lowest predicted bin, then the highest confidence in that bin.

`head` (`RewardScorer`): the frozen GeoToken model's encoder memory and the candidate's tokens go into a
small head that classifies whether the candidate is close enough. The head (d_model -> hidden):

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
from safetensors.torch import save_file

from geotoken.errors import GeoTokenError
from geotoken.io import atomic_path, read_json, read_safetensors, write_json
from geotoken.model import Batch, GeoToken, ModelConfig
from geotoken.search.candidates import Candidates, Selection, from_scores

REWARD_KINDS = ("head", "decoder")

# per kind, the defaults of the fields left None: the head scores beams, samples and retrieved cells of the
# frozen model; the decoder scorer is the authors' (10 samples at T 0.7, the whole model fine-tuned at a
# transformer's learning rate)
KIND_DEFAULTS = {
    "head": {"beam_width": 5, "num_samples": 10, "retrieved": 5, "temperature": 1.0, "epochs": 8,
             "lr": 1e-3, "weight_decay": 1e-4},
    "decoder": {"beam_width": 0, "num_samples": 10, "retrieved": 0, "temperature": 0.7, "epochs": 2,
                "lr": 5e-5, "weight_decay": 1e-6},
}  # fmt: skip


@dataclass
class RewardConfig:
    kind: str = "head"  # one of REWARD_KINDS
    radius_km: float = 200.0  # the paper's scorer: "within 200 km"
    hidden: int = 128
    # training candidates per image: beams + samples (at `temperature`) + retrieved neighbours' cells
    # (at most the model's k); None: the kind's default (KIND_DEFAULTS)
    beam_width: int | None = None
    num_samples: int | None = None
    retrieved: int | None = None
    temperature: float | None = None
    constrain: bool | None = None  # decode the candidates under the gallery constraint (None: the bundle's)
    epochs: int | None = None
    max_steps: int = 0  # optimiser steps at most (0: epochs decide)
    batch_size: int = 64  # images per step
    lr: float | None = None
    weight_decay: float | None = None
    max_images: int = 4000  # training images used (a random subset)
    holdout: float = 0.1  # share of those images kept for validation
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in REWARD_KINDS:
            raise GeoTokenError(f"reward scorer: kind {self.kind!r}: choose one of {', '.join(REWARD_KINDS)}")
        for name, value in KIND_DEFAULTS[self.kind].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        minimum = {"epochs": 1, "max_images": 1, "beam_width": 0, "num_samples": 0, "retrieved": 0,
                   "max_steps": 0, "batch_size": 1, "hidden": 1}  # fmt: skip
        for name, low in minimum.items():
            if getattr(self, name) < low:
                raise GeoTokenError(f"reward scorer: {name} must be >= {low}, got {getattr(self, name)}")
        if self.beam_width + self.num_samples + self.retrieved < 1:
            raise GeoTokenError("reward scorer: beam_width + num_samples + retrieved must be >= 1")
        if not self.radius_km > 0:
            raise GeoTokenError(f"reward scorer: radius_km must be > 0, got {self.radius_km}")
        if not self.temperature >= 0:
            raise GeoTokenError(f"reward scorer: temperature must be >= 0, got {self.temperature}")


_RENAMED = {"beams": "beam_width", "samples": "num_samples"}


class RewardScorer(nn.Module):
    """The `head` kind: a small head over the frozen model's memory and the candidate's tokens."""

    kind = "head"

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

    def selection_scores(
        self, pool: Candidates, memory: torch.Tensor, batch: Batch | None = None
    ) -> np.ndarray:
        """(B, N) higher is better: P(within radius)."""
        return self.score(memory, pool)

    def save(self, directory: str | os.PathLike, **info) -> Path:
        return _save_scorer(self, directory, {"d_model": self.d_model, "vocab_sizes": self.vocab_sizes}, info)

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
            scorer.load_state_dict(read_safetensors(directory / "model.safetensors"))
        except (KeyError, TypeError, RuntimeError) as exc:
            raise GeoTokenError(f"{directory}: broken reward scorer: {exc}") from None
        return scorer.to(device).eval()


class DecoderRewardScorer(nn.Module):
    """The `decoder` kind (the authors'): its own GeoToken model, teacher-forced over a candidate, and a
    two-bin head on the last decoder state. Bin 0: within `radius_km`; bin 1: farther."""

    kind = "decoder"
    n_bins = 2

    def __init__(self, model: GeoToken, config: RewardConfig | None = None):
        super().__init__()
        self.config = config or RewardConfig(kind="decoder")
        self.model = model  # trained along with the head: pass a copy to keep the original
        d, h = model.cfg.d_model, self.config.hidden
        self.head = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, self.n_bins))

    def forward(self, batch: Batch, tokens: torch.Tensor) -> torch.Tensor:
        """batch of B images, tokens (B, N, T) int64 -> bin logits (B, N, 2)."""
        B, N, T = tokens.shape
        memory = self.model.encode(batch)  # (B, S, d)
        states = self.model.decoder_states(memory, tokens.reshape(B * N, T), copies=N)  # (B*N, T+1, d)
        return self.head(states[:, -1].float()).view(B, N, self.n_bins)

    @torch.no_grad()
    def probs(self, batch: Batch, pool: Candidates) -> np.ndarray:
        """(B, N, 2) P(bin) of each candidate of the pool."""
        dev = next(self.parameters()).device
        tokens = torch.as_tensor(pool.tokens, dtype=torch.long, device=dev)
        return torch.softmax(self(batch.to(dev), tokens), -1).double().cpu().numpy()

    def score(self, batch: Batch, pool: Candidates) -> np.ndarray:
        """(B, N) P(within radius), bin 0."""
        return self.probs(batch, pool)[..., 0]

    def selection_scores(self, pool: Candidates, memory=None, batch: Batch | None = None) -> np.ndarray:
        """(B, N) the authors' rule as one number, higher is better: the lowest predicted bin first, then
        the highest confidence (the predicted bin's probability) within it. (With two bins, when every
        candidate is predicted far, that picks the one most confidently far, as their code does.)"""
        if batch is None:
            raise GeoTokenError(
                "the decoder reward scorer reads the images' inputs: select_reward(batch=...)"
            )
        p = self.probs(batch, pool)  # (B, N, 2)
        bin_ = p.argmax(-1)
        return (self.n_bins - 1 - bin_) + p.max(-1)

    def save(self, directory: str | os.PathLike, **info) -> Path:
        """model.safetensors (the fine-tuned GeoToken weights as model.*, the head as head.*) + config.json."""
        return _save_scorer(self, directory, {"model_config": self.model.cfg.to_dict()}, info)

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str = "cpu") -> DecoderRewardScorer:
        directory = Path(directory)
        d = _read_config(directory)
        try:
            scorer = cls(GeoToken(ModelConfig.from_dict(d["model_config"])), RewardConfig(**d["reward"]))
            scorer.load_state_dict(read_safetensors(directory / "model.safetensors"))
        except (KeyError, TypeError, RuntimeError) as exc:
            raise GeoTokenError(f"{directory}: broken decoder reward scorer: {exc}") from None
        return scorer.to(device).eval()


def _save_scorer(scorer: nn.Module, directory: str | os.PathLike, shape: dict, info: dict) -> Path:
    """A scorer folder of either kind: its weights (safetensors) and config.json (kind, what rebuilds its
    modules (`shape`), the reward config, `info`)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / "model.safetensors") as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in scorer.state_dict().items()}, str(tmp))
    config = {"kind": scorer.kind, **shape, "reward": dataclasses.asdict(scorer.config), **info}
    write_json(directory / "config.json", config)
    return directory


def _read_config(directory: Path) -> dict:
    if not (directory / "config.json").is_file() or not (directory / "model.safetensors").is_file():
        raise GeoTokenError(f"{directory}: not a reward scorer folder (needs config.json, model.safetensors)")
    return read_json(directory / "config.json")


def load_reward(directory: str | os.PathLike, device: str = "cpu") -> RewardScorer | DecoderRewardScorer:
    """A saved scorer of either kind (config.json's "kind"; folders without one are the head kind)."""
    kind = _read_config(Path(directory)).get("kind", "head")
    if kind not in REWARD_KINDS:
        raise GeoTokenError(
            f"{directory}/config.json: kind {kind!r}: choose one of {', '.join(REWARD_KINDS)}"
        )
    return (DecoderRewardScorer if kind == "decoder" else RewardScorer).load(directory, device=device)


def select_reward(
    pool: Candidates,
    scorer: RewardScorer | DecoderRewardScorer,
    memory: torch.Tensor | None = None,
    batch: Batch | None = None,
) -> Selection:
    """The candidate the scorer ranks first (ties: higher logp). The head kind reads the model's `memory`,
    the decoder kind the images' inputs `batch` (it runs its own fine-tuned encoder)."""
    n = (memory if memory is not None else batch.query[next(iter(batch.query))]).shape[0]
    if n != pool.shape[0]:
        raise GeoTokenError(f"select_reward: inputs for {n} images, pool for {pool.shape[0]}")
    return from_scores(pool, scorer.selection_scores(pool, memory, batch))

"""A learned scorer of candidates: P(candidate within `radius_km` of the truth | image memory, candidate).

As in the paper, it reads the frozen GeoToken model's encoder memory and the candidate's tokens, and a
small head classifies whether the candidate is close enough. The head (d_model -> hidden):

    c   = mean_t tok_emb[token_t at position t]             (B, N, h)  the candidate's cell, coarse to fine
    a   = softmax(q(c) . memory / sqrt(d)) @ memory         (B, N, d)  what the image memory says about it
    out = MLP([c, W a, c * W a, per-level log-probs, logp])  (B, N)    a logit

The model's own per-level log-probabilities are inputs too, so the scorer starts from what `logp`
knows and learns when to overrule it. Trained with binary cross-entropy on beam and sample candidates
of training images (their neighbour tables exclude the image itself), with a held-out share of images
to report whether reward selection beats `logp` selection.
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
import torch.nn.functional as F

from geotoken.errors import GeoTokenError
from geotoken.io import atomic_path, read_json, write_json
from geotoken.select import Candidates, Selection, _from_scores


@dataclass
class RewardConfig:
    radius_km: float = 200.0  # the paper's scorer: "within 200 km"
    hidden: int = 128
    beams: int = 5  # training candidates per image: beams + samples + retrieved neighbours' cells
    samples: int = 10
    retrieved: int = 5  # (at most the model's k) so the scorer also learns to judge retrieval candidates
    epochs: int = 8
    batch_size: int = 64  # images per step
    lr: float = 1e-3
    weight_decay: float = 1e-4
    max_images: int = 4000  # training images used (a random subset)
    holdout: float = 0.1  # share of those images kept for validation
    seed: int = 0


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
        from safetensors.torch import save_file

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
        from safetensors.torch import load_file

        directory = Path(directory)
        if not (directory / "config.json").is_file() or not (directory / "model.safetensors").is_file():
            raise GeoTokenError(
                f"{directory}: not a reward scorer folder (needs config.json, model.safetensors)"
            )
        d = read_json(directory / "config.json")
        try:
            scorer = cls(int(d["d_model"]), d["vocab_sizes"], RewardConfig(**d["reward"]))
            scorer.load_state_dict(load_file(str(directory / "model.safetensors")))
        except (KeyError, TypeError, RuntimeError) as exc:
            raise GeoTokenError(f"{directory}: broken reward scorer: {exc}") from None
        return scorer.to(device).eval()


def select_reward(pool: Candidates, scorer: RewardScorer, memory: torch.Tensor) -> Selection:
    """The candidate the scorer finds most likely to be within its radius (ties: higher logp)."""
    if memory.shape[0] != pool.shape[0]:
        raise GeoTokenError(f"select_reward: memory for {memory.shape[0]} images, pool for {pool.shape[0]}")
    return _from_scores(pool, scorer.score(memory, pool))


def _pools(geo, embeddings, neighbours, rows, cfg: RewardConfig, progress: bool):
    """Beam + sample + retrieved candidates of the images `rows`: tokens (n, N, T), logp, lat, lon (n, N)."""
    from tqdm import tqdm

    from geotoken.decode import beam_search, sample, score_sequences

    out = []
    for s in tqdm(range(0, len(rows), cfg.batch_size), desc="reward: candidates", disable=not progress):
        part = rows[s : s + cfg.batch_size]
        batch = geo._batch(
            {m: v[part] for m, v in embeddings.items()}, None if neighbours is None else neighbours[part]
        )
        with torch.no_grad():
            memory = geo.model.encode(batch)
            pools = [beam_search(geo.model, memory, cfg.beams, constraint=geo.constraint)]
            if cfg.samples:
                g = torch.Generator().manual_seed(cfg.seed + s)
                pools.append(sample(geo.model, memory, cfg.samples, generator=g, constraint=geo.constraint))
            r = min(cfg.retrieved, geo.model.cfg.k)
            if r > 0:
                pools.append(score_sequences(geo.model, memory, batch.nbr_tokens[:, :r]))
        out.append(Candidates.concat(pools))
    fields = ("tokens", "logp", "lat", "lon", "level_probs")
    return Candidates(*(np.concatenate([getattr(p, f) for p in out]) for f in fields))


def train_reward(
    geo,
    embeddings: dict[str, np.ndarray],
    neighbours: np.ndarray | None,
    lat: np.ndarray,
    lon: np.ndarray,
    config: RewardConfig | None = None,
    progress: bool = True,
) -> tuple[RewardScorer, dict]:
    """Train a scorer on training images (aligned embeddings {m: (N, D)}, neighbour rows (N, k) that
    exclude each image itself, true lat/lon (N,)); the GeoToken model stays frozen.

    Returns the scorer and metrics on the held-out images: accuracy within the radius of the `logp`
    choice vs the reward choice, and the scorer's log-loss.
    """
    from tqdm import tqdm

    from geotoken.geo import haversine_km
    from geotoken.select import select_logp

    cfg = config or RewardConfig()
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    n = len(lat)
    rows = np.sort(rng.choice(n, size=min(n, cfg.max_images), replace=False))
    n_val = int(round(len(rows) * cfg.holdout)) if len(rows) >= 10 else 0
    rng.shuffle(rows)
    val_rows, train_rows = np.sort(rows[:n_val]), np.sort(rows[n_val:])
    if len(train_rows) == 0:
        raise GeoTokenError("train_reward: no training images")

    def labelled(rows_):
        pool = _pools(geo, embeddings, neighbours, rows_, cfg, progress)
        within = (
            haversine_km(pool.lat, pool.lon, lat[rows_, None], lon[rows_, None]) <= cfg.radius_km
        )  # (n, N)
        return pool, within

    train_pool, train_y = labelled(train_rows)
    model = geo.model
    scorer = RewardScorer(model.cfg.d_model, model.cfg.vocab_sizes, cfg).to(geo.device)
    opt = torch.optim.AdamW(scorer.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    tokens = torch.as_tensor(train_pool.tokens, dtype=torch.long)
    level_logp = torch.as_tensor(np.log(np.maximum(train_pool.level_probs, 1e-300)), dtype=torch.float32)
    y = torch.as_tensor(train_y, dtype=torch.float32)
    pos_weight = torch.tensor((1 - y.mean().item()) / max(y.mean().item(), 1e-3)).clamp(0.1, 10.0)
    losses = []
    for epoch in range(cfg.epochs):
        order = rng.permutation(len(train_rows))
        bar = tqdm(
            range(0, len(order), cfg.batch_size), desc=f"reward: epoch {epoch + 1}", disable=not progress
        )
        total = 0.0
        for s in bar:
            idx = order[s : s + cfg.batch_size]
            part = train_rows[idx]
            batch = geo._batch(
                {m: v[part] for m, v in embeddings.items()}, None if neighbours is None else neighbours[part]
            )
            with torch.no_grad():
                memory = model.encode(batch).float()  # (b, S, d), frozen
            logits = scorer(memory, tokens[idx].to(geo.device), level_logp[idx].to(geo.device))
            loss = F.binary_cross_entropy_with_logits(logits, y[idx].to(geo.device), pos_weight=pos_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        losses.append(total / len(order))
    scorer.eval()
    metrics = {
        "train_images": int(len(train_rows)),
        "train_loss": losses,
        "train_positive_share": float(y.mean()),
    }
    if n_val:
        pool, within = labelled(val_rows)
        scores = []
        for s in range(0, len(val_rows), cfg.batch_size):
            part = val_rows[s : s + cfg.batch_size]
            batch = geo._batch(
                {m: v[part] for m, v in embeddings.items()}, None if neighbours is None else neighbours[part]
            )
            with torch.no_grad():
                scores.append(scorer.score(model.encode(batch), _slice(pool, s, s + len(part))))
        p = np.concatenate(scores)  # (n_val, N)
        r = np.arange(n_val)
        by_reward = _from_scores(pool, p).index
        by_logp = select_logp(pool).index
        eps = 1e-7
        metrics.update(
            val_images=int(n_val),
            val_within_logp=float(within[r, by_logp].mean()),
            val_within_reward=float(within[r, by_reward].mean()),
            val_within_oracle=float(within.any(1).mean()),
            val_log_loss=float(-(within * np.log(p + eps) + (~within) * np.log(1 - p + eps)).mean()),
        )
    return scorer, metrics


def _slice(pool: Candidates, start: int, stop: int) -> Candidates:
    fields = ("tokens", "logp", "lat", "lon", "level_probs")
    return Candidates(*(getattr(pool, f)[start:stop] for f in fields))


def train_bundle_reward(
    geo, queries_dir, neighbours_dir=None, config: RewardConfig | None = None, progress: bool = True
) -> dict:
    """Train the reward scorer of a loaded bundle on training images, save it into the bundle, register it.

    queries_dir: aligned feature store of training images; neighbours_dir: their neighbour table, which
    must exclude each image itself (as the training tables do). Returns the scorer's held-out metrics.
    """
    from geotoken.predict import load_queries, set_bundle_part

    emb, nbrs, lat, lon = load_queries(queries_dir, list(geo.model.cfg.modalities), neighbours_dir)
    scorer, metrics = train_reward(geo, emb, nbrs, lat, lon, config, progress=progress)
    scorer.save(geo.root / "reward", metrics=metrics, queries=str(queries_dir))
    set_bundle_part(geo.root, "reward", "reward")
    return metrics

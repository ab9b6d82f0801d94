"""Fitting the parts of a bundle that learn from data after the model: calibration and the reward scorer.

Both run the loaded `Geolocator` over a split (validation images for the confidence temperatures,
training images for the reward scorer), save their result into the bundle folder and register it in
`bundle.json`, so the next `Geolocator.from_bundle` uses it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from geotoken.bundle import set_bundle_part
from geotoken.errors import GeoTokenError
from geotoken.gallery import load_queries
from geotoken.geo import haversine_km
from geotoken.predict import Geolocator
from geotoken.s2 import latlon_to_tokens
from geotoken.search.calibration import RADII_KM, calibration_data, calibration_report, fit_calibration
from geotoken.search.candidates import Candidates, from_scores, select_logp
from geotoken.search.decode import beam_search, sample, score_sequences
from geotoken.search.reward import RewardConfig, RewardScorer
from geotoken.search.select import SELECTORS

# selectors a calibration can use: the MLLM selector sends photos, calibration reads feature stores
CALIBRATION_SELECTORS = tuple(s for s in SELECTORS if s != "mllm")


# ----------------------------------------------------------------------------- calibration
def calibrate_bundle(
    geo: Geolocator,
    queries_dir: str | Path,
    neighbours_dir: str | Path | None = None,
    strategy: str | None = None,
    select: str | None = None,
    radii_km: Sequence[float] = RADII_KM,
    plot: str | Path | None = None,
    progress: bool = True,
    constrain: bool | None = None,
    **options,
) -> dict:
    """Fit a bundle's confidence temperatures on validation images and register them in bundle.json.

    geo: a `Geolocator` loaded from the bundle; strategy, select and constrain (decode under the
    gallery-prefix constraint or freely) default to the bundle's search options, as do `options` (other
    `SearchOptions` fields: temperature, logp_kind, ...). Returns the calibration report (ECE before and
    after, on the same images: held-out figures come from `geotoken evaluate`).
    """
    if select is not None and select not in CALIBRATION_SELECTORS:
        raise GeoTokenError(f"calibration: select {select!r}: choose from {', '.join(CALIBRATION_SELECTORS)}")
    emb, nbrs, lat, lon = load_queries(queries_dir, list(geo.model.cfg.modalities), neighbours_dir)
    res = geo.search(
        emb, nbrs, progress=progress, strategy=strategy, select=select, constrain=constrain, **options
    )
    cfg = geo.model.cfg
    tokens = latlon_to_tokens(lat, lon, cfg.level, cfg.group)
    data = calibration_data(
        res.pool, res.selection, lat, lon, tokens, radii_km=list(radii_km), group=cfg.group
    )
    cal = fit_calibration(data)
    cal.save(geo.root / "calibration.json")
    set_bundle_part(geo.root, "calibration", "calibration.json")
    return calibration_report(data, cal, plot=plot)


# ----------------------------------------------------------------------------- reward scorer
def reward_candidates(geo: Geolocator, embeddings, neighbours, rows, cfg: RewardConfig, progress: bool):
    """Beam + sample + retrieved candidates of the images `rows`: tokens (n, N, T), logp, lat, lon (n, N)."""
    out = []
    for s in tqdm(range(0, len(rows), cfg.batch_size), desc="reward: candidates", disable=not progress):
        part = rows[s : s + cfg.batch_size]
        batch = geo.batch(
            {m: v[part] for m, v in embeddings.items()}, None if neighbours is None else neighbours[part]
        )
        with torch.no_grad():
            memory = geo.model.encode(batch)
            pools = [beam_search(geo.model, memory, cfg.beam_width, constraint=geo.constraint)]
            if cfg.num_samples:
                g = torch.Generator().manual_seed(cfg.seed + s)
                pools.append(
                    sample(geo.model, memory, cfg.num_samples, generator=g, constraint=geo.constraint)
                )
            r = min(cfg.retrieved, geo.model.cfg.k)
            if r > 0:
                pools.append(score_sequences(geo.model, memory, batch.nbr_tokens[:, :r]))
        out.append(Candidates.concat(pools))
    return Candidates.join(out)


def train_reward(
    geo: Geolocator,
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
        pool = reward_candidates(geo, embeddings, neighbours, rows_, cfg, progress)
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
            batch = geo.batch(
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
            batch = geo.batch(
                {m: v[part] for m, v in embeddings.items()}, None if neighbours is None else neighbours[part]
            )
            with torch.no_grad():
                scores.append(scorer.score(model.encode(batch), pool.images(s, s + len(part))))
        p = np.concatenate(scores)  # (n_val, N)
        r = np.arange(n_val)
        by_reward = from_scores(pool, p).index
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


def train_bundle_reward(
    geo: Geolocator,
    queries_dir,
    neighbours_dir=None,
    config: RewardConfig | None = None,
    progress: bool = True,
) -> dict:
    """Train the reward scorer of a loaded bundle on training images, save it into the bundle, register it.

    queries_dir: aligned feature store of training images; neighbours_dir: their neighbour table, which
    must exclude each image itself (as the training tables do). Returns the scorer's held-out metrics.
    """
    emb, nbrs, lat, lon = load_queries(queries_dir, list(geo.model.cfg.modalities), neighbours_dir)
    scorer, metrics = train_reward(geo, emb, nbrs, lat, lon, config, progress=progress)
    scorer.save(geo.root / "reward", metrics=metrics, queries=str(queries_dir))
    set_bundle_part(geo.root, "reward", "reward")
    return metrics

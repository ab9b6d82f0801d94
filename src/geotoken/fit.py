"""Fitting the parts of a bundle that learn from data after the model: calibration and the reward scorer.

Both run the loaded `Geolocator` over a split (validation images for the confidence temperatures,
training images for the reward scorer), save their result into the bundle folder and register it in
`bundle.json`, so the next `Geolocator.from_bundle` uses it.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from geotoken.bundle import set_bundle_part
from geotoken.devices import own_random_state
from geotoken.errors import GeoTokenError
from geotoken.gallery import load_queries
from geotoken.geo import haversine_km
from geotoken.predict import Geolocator
from geotoken.s2 import latlon_to_tokens
from geotoken.search.calibration import (
    RADII_KM,
    calibration_data,
    calibration_report,
    check_radii,
    fit_calibration,
)
from geotoken.search.candidates import Candidates, from_scores, select_logp
from geotoken.search.decode import beam_search, sample, score_sequences
from geotoken.search.reward import DecoderRewardScorer, RewardConfig, RewardScorer
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
    `SearchOptions` fields: temperature, logp_kind, ...). `radii_km`: the "within X km" events fitted, and
    always the bundle's `probability_within_km` (the probability predict reports first). Returns the
    calibration report (ECE before and after, on the same images: held-out figures come from `geotoken
    evaluate`).
    """
    if select is not None and select not in CALIBRATION_SELECTORS:
        raise GeoTokenError(f"calibration: select {select!r}: choose from {', '.join(CALIBRATION_SELECTORS)}")
    # before the search, not after it; with the bundle's headline radius, whose probability predict reports
    radii_km = sorted({*check_radii(radii_km), float(geo.probability_within_km)})
    emb, nbrs, lat, lon = load_queries(
        queries_dir, list(geo.model.cfg.modalities), neighbours_dir, geo.made_by
    )
    if len(lat) == 0:
        raise GeoTokenError(f"{queries_dir}: no usable query rows to calibrate on")
    searched = {"strategy": strategy, "select": select, "constrain": constrain, **options}
    res = geo.search(emb, nbrs, progress=progress, **searched)
    cfg = geo.model.cfg
    tokens = latlon_to_tokens(lat, lon, cfg.level, cfg.group)
    data = calibration_data(res.pool, res.selection, lat, lon, tokens, radii_km=radii_km, group=cfg.group)
    cal = fit_calibration(data, search=geo.options.replace(**searched))
    if geo.calibration is not None:  # (said: a calibration fitted on the validation split replaced unseen)
        warnings.warn(
            f"{geo.root}: replacing its calibration with this one, fitted on {queries_dir}", stacklevel=2
        )
    cal.save(geo.root / "calibration.json")
    set_bundle_part(geo.root, "calibration", "calibration.json")
    return calibration_report(data, cal, plot=plot)


# ----------------------------------------------------------------------------- reward scorer
def reward_candidates(geo: Geolocator, embeddings, neighbours, rows, cfg: RewardConfig, progress: bool):
    """Beam + sample + retrieved candidates of the images `rows` (as many of each as `cfg` says, samples at
    `cfg.temperature`, under the gallery constraint if `cfg.constrain`, None: the bundle's choice)."""
    constrain = geo.options.constrain if cfg.constrain is None else cfg.constrain
    constraint = geo.constraint if constrain else None
    out = []
    for s in tqdm(range(0, len(rows), cfg.batch_size), desc="reward: candidates", disable=not progress):
        part = rows[s : s + cfg.batch_size]
        batch = _batch(geo, embeddings, neighbours, part)
        with torch.no_grad():
            memory = geo.model.encode(batch)
            pools = []
            if cfg.beam_width:
                pools.append(beam_search(geo.model, memory, cfg.beam_width, constraint=constraint))
            if cfg.num_samples:
                g = torch.Generator().manual_seed(cfg.seed + s)
                pools.append(sample(geo.model, memory, cfg.num_samples, cfg.temperature, generator=g,
                                    constraint=constraint))  # fmt: skip
            r = min(cfg.retrieved, geo.model.cfg.k)
            if r > 0:
                pools.append(score_sequences(geo.model, memory, batch.nbr_tokens[:, :r]))
        out.append(Candidates.concat(pools))
    return Candidates.join(out)


def _batch(geo: Geolocator, embeddings, neighbours, rows):
    return geo.batch(
        {m: v[rows] for m, v in embeddings.items()}, None if neighbours is None else neighbours[rows]
    )


@own_random_state
def train_reward(
    geo: Geolocator,
    embeddings: dict[str, np.ndarray],
    neighbours: np.ndarray | None,
    lat: np.ndarray,
    lon: np.ndarray,
    config: RewardConfig | None = None,
    progress: bool = True,
) -> tuple[RewardScorer | DecoderRewardScorer, dict]:
    """Train a scorer of `config.kind` on training images (aligned embeddings {m: (N, D)}, neighbour rows
    (N, k) that exclude each image itself, true lat/lon (N,)). The head kind leaves the GeoToken model
    frozen; the decoder kind fine-tunes a copy of all of it (`geo.model` itself is not changed).

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
    if cfg.kind == "decoder":
        scorer = DecoderRewardScorer(copy.deepcopy(model), cfg).to(geo.device).train()
    else:
        scorer = RewardScorer(model.cfg.d_model, model.cfg.vocab_sizes, cfg).to(geo.device)
    opt = torch.optim.AdamW(scorer.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    tokens = torch.as_tensor(train_pool.tokens, dtype=torch.long)
    level_logp = torch.as_tensor(np.log(np.maximum(train_pool.level_probs, 1e-300)), dtype=torch.float32)
    y = torch.as_tensor(train_y, dtype=torch.float32)
    share = y.mean().item()
    # the rarer outcome weighs more (clamped), so neither kind learns to call every candidate far
    pos_weight = torch.tensor((1 - share) / max(share, 1e-3)).clamp(0.1, 10.0)
    bin_weight = torch.stack([pos_weight, torch.tensor(1.0)]).to(geo.device)  # bin 0: within, bin 1: not
    losses, steps = [], 0
    for epoch in range(cfg.epochs):
        order = rng.permutation(len(train_rows))
        bar = tqdm(
            range(0, len(order), cfg.batch_size), desc=f"reward: epoch {epoch + 1}", disable=not progress
        )
        total, seen = 0.0, 0
        for s in bar:
            if cfg.max_steps and steps >= cfg.max_steps:
                break
            idx = order[s : s + cfg.batch_size]
            batch = _batch(geo, embeddings, neighbours, train_rows[idx])
            target = y[idx].to(geo.device)
            if cfg.kind == "decoder":
                logits = scorer(batch, tokens[idx].to(geo.device))  # (b, N, 2)
                bins = (1 - target).long()  # bin 0 = within the radius
                loss = F.cross_entropy(logits.reshape(-1, 2), bins.reshape(-1), weight=bin_weight)
            else:
                with torch.no_grad():
                    memory = model.encode(batch).float()  # (b, S, d), frozen
                logits = scorer(memory, tokens[idx].to(geo.device), level_logp[idx].to(geo.device))
                loss = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            total, seen = total + loss.item() * len(idx), seen + len(idx)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if seen:
            losses.append(total / seen)
    scorer.eval()
    metrics = {
        "kind": cfg.kind,
        "train_images": int(len(train_rows)),
        "train_candidates_per_image": int(tokens.shape[1]),
        "train_steps": steps,
        "train_loss": losses,
        "train_positive_share": float(share),
    }
    if n_val:
        pool, within = labelled(val_rows)
        probs, ranks = [], []
        for s in range(0, len(val_rows), cfg.batch_size):
            part = val_rows[s : s + cfg.batch_size]
            batch, sub = _batch(geo, embeddings, neighbours, part), pool.images(s, s + len(part))
            with torch.no_grad():
                memory = model.encode(batch) if cfg.kind == "head" else None
                probs.append(scorer.score(memory, sub) if cfg.kind == "head" else scorer.score(batch, sub))
                ranks.append(scorer.selection_scores(sub, memory, batch))
        p = np.concatenate(probs)  # (n_val, N) P(within)
        r = np.arange(n_val)
        by_reward = from_scores(pool, np.concatenate(ranks)).index
        by_logp = select_logp(pool).index
        eps = 1e-7
        metrics.update(
            val_images=int(n_val),
            val_within_logp=float(within[r, by_logp].mean()),
            val_within_reward=float(within[r, by_reward].mean()),
            val_within_oracle=float(within.any(1).mean()),
            val_log_loss=float(-(within * np.log(p + eps) + (~within) * np.log(1 - p + eps)).mean()),
            val_bin_accuracy=float(((p >= 0.5) == within).mean()),
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
    emb, nbrs, lat, lon = load_queries(
        queries_dir, list(geo.model.cfg.modalities), neighbours_dir, geo.made_by, training=True
    )
    scorer, metrics = train_reward(geo, emb, nbrs, lat, lon, config, progress=progress)
    if geo.reward is not None:
        warnings.warn(
            f"{geo.root}: replacing its reward scorer with this one, trained on {queries_dir}", stacklevel=2
        )
    scorer.save(geo.root / "reward", metrics=metrics, queries=str(queries_dir))
    set_bundle_part(geo.root, "reward", "reward")
    return metrics

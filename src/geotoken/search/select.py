"""Choosing one answer from a pool of decoded candidates (beams and/or samples).

A selector turns a `geotoken.search.candidates.Candidates` pool into a `Selection`: a score per
candidate (higher is better, used to rank the pool), the chosen index and its coordinate.

- `logp`: the most likely candidate (what the model alone would answer), by the model's own log-probability
  (`logp_kind="t1"`) or by the sampling distribution's (`"scaled"`, the authors' sum of temperature-scaled
  log-probabilities).
- `consensus`: the candidate with the most probability mass within R km, or the geometric medoid;
  several beams or samples that agree on a region outvote one sharp but isolated guess.
- `vote`: the model's probability times the retrieved neighbours' support (how close the k neighbours lie,
  a kernel of width R km): a candidate the model likes and the neighbours back wins, so on places unlike the
  gallery's the retrieval evidence corrects the model's prior (pair it with `sample+retrieval` pools).
- `gate`: the model's own answer (the greedy one of a `greedy+sample+retrieval` pool) where the model is
  sure of the region, `vote` elsewhere: sure means P(its first `gate_tokens` tokens) >= `gate_p` (2 tokens:
  a cube face and a cell of ~2,500 km). On places like the training data the model's coarse guess is
  better than its neighbours' (kNN), on places unlike them worse: the model's own confidence tells which
  (`benchmarks/selection.py`: tuned on `val`, at least greedy on all three EarthViews test splits).
- `reward` (`geotoken.search.reward`): a learned scorer of "is this candidate within X km".
- `mllm` (`geotoken.search.mllm`): a multimodal LLM behind an OpenAI-compatible endpoint.
"""

from __future__ import annotations

import numpy as np

from geotoken.errors import GeoTokenError
from geotoken.geo import haversine_km
from geotoken.search.candidates import Candidates, Selection, from_scores, pool_weights, select_logp
from geotoken.search.mllm import select_mllm
from geotoken.search.reward import select_reward

__all__ = [
    "SELECTORS",
    "select",
    "select_consensus",
    "select_vote",
    "select_gate",
    "neighbour_support",
    "select_logp",
    "consensus_mass",
    "pairwise_km",
]

SELECTORS = ("logp", "consensus", "vote", "gate", "reward", "mllm")


def pairwise_km(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """(B, N) coordinates -> (B, N, N) great-circle distances in km."""
    return haversine_km(lat[:, :, None], lon[:, :, None], lat[:, None, :], lon[:, None, :])


def consensus_mass(pool: Candidates, radius_km: float) -> np.ndarray:
    """(B, N) probability mass of the pool's distinct candidates within `radius_km` of each candidate."""
    within = pairwise_km(pool.lat, pool.lon) <= radius_km  # (B, N, N)
    return np.einsum("bij,bj->bi", within.astype(np.float64), pool_weights(pool))


def select_consensus(pool: Candidates, radius_km: float = 200.0, medoid: bool = False) -> Selection:
    """The candidate with the most probability mass within `radius_km`; or (medoid=True) the candidate
    minimising the probability-weighted sum of distances to the others."""
    if medoid:
        cost = np.einsum("bij,bj->bi", pairwise_km(pool.lat, pool.lon), pool_weights(pool))
        return from_scores(pool, -cost)
    if not radius_km > 0:
        raise GeoTokenError(f"consensus radius_km must be > 0, got {radius_km}")
    return from_scores(pool, consensus_mass(pool, radius_km))


def neighbour_support(pool: Candidates, neighbours_latlon: np.ndarray, radius_km: float) -> np.ndarray:
    """(B, N) mean over the k neighbours (B, k, 2) of exp(-distance / radius_km) to each candidate."""
    d = haversine_km(
        pool.lat[:, :, None],
        pool.lon[:, :, None],
        neighbours_latlon[:, None, :, 0],
        neighbours_latlon[:, None, :, 1],
    )  # (B, N, k)
    return np.exp(-d / radius_km).mean(axis=2)


def select_vote(
    pool: Candidates, neighbours_latlon: np.ndarray | None, radius_km: float = 200.0
) -> Selection:
    """The candidate maximising log P_model + log support: the model's probability times its neighbours'."""
    if neighbours_latlon is None:
        raise GeoTokenError("select='vote' needs the retrieved neighbours (a model with k > 0)")
    if not radius_km > 0:
        raise GeoTokenError(f"vote radius_km must be > 0, got {radius_km}")
    support = neighbour_support(pool, np.asarray(neighbours_latlon, dtype=np.float64), radius_km)
    return from_scores(pool, pool.logp + np.log(support + 1e-300))


def select_gate(
    pool: Candidates,
    neighbours_latlon: np.ndarray | None,
    radius_km: float = 200.0,
    gate_p: float = 0.3,
    gate_tokens: int = 2,
    own_index: int | None = 0,
) -> Selection:
    """The model's own answer where P(its first `gate_tokens` tokens) >= `gate_p`, else `select_vote`.

    own_index: the pool's position of the model's own answer (0 in greedy-first pools); None: its most
    likely candidate. Without neighbours (a model with k 0) there is nothing to vote with: the own answer.
    """
    if not 0.0 <= gate_p <= 1.0:
        raise GeoTokenError(f"gate_p must be in [0, 1], got {gate_p}")
    if not 1 <= gate_tokens <= pool.tokens.shape[-1]:
        raise GeoTokenError(f"gate_tokens must be in 1..{pool.tokens.shape[-1]}, got {gate_tokens}")
    own = select_logp(pool) if own_index is None else from_scores(pool, _one_hot(pool, own_index))
    if neighbours_latlon is None:
        return own
    vote = select_vote(pool, neighbours_latlon, radius_km)
    rows = np.arange(len(own.index))
    sure = np.prod(pool.level_probs[rows, own.index, :gate_tokens], axis=1) >= gate_p  # (B,)
    index = np.where(sure, own.index, vote.index)
    scores = np.where(sure[:, None], own.scores, vote.scores)
    choices = np.isfinite(pool.logp).sum(axis=1)  # (B,) a pool of one (greedy) leaves nothing to vote on
    notes = [
        "" if c < 2 else "model sure of the region" if s else "neighbours voted"
        for s, c in zip(sure, choices)
    ]
    return Selection(index, pool.lat[rows, index], pool.lon[rows, index], scores, notes)


def _one_hot(pool: Candidates, index: int) -> np.ndarray:
    """(B, N) scores that rank candidate `index` first, the rest by log-probability."""
    B, N = pool.shape
    if not 0 <= index < N:
        raise GeoTokenError(f"own_index {index} is outside the pool of {N} candidates")
    scores = pool.logp.astype(np.float64).copy()
    scores[:, index] = np.inf
    return scores


def select(pool: Candidates, method: str = "logp", **options) -> Selection:
    """Dispatch by name. `logp` takes `logp_kind=` ("t1" or "scaled"); `reward` needs `scorer=`, `memory=`
    (and `batch=` for the decoder scorer); `mllm` needs `images=` (see those modules)."""
    if method == "logp":
        return select_logp(pool, **options)
    if method == "consensus":
        return select_consensus(pool, **options)
    if method == "vote":
        return select_vote(pool, **options)
    if method == "gate":
        return select_gate(pool, **options)
    if method == "reward":
        return select_reward(pool, **options)
    if method == "mllm":
        return select_mllm(pool, **options)
    raise GeoTokenError(f"unknown selector {method!r}; choose one of {', '.join(SELECTORS)}")

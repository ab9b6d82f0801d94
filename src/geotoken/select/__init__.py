"""Choosing one answer from a pool of decoded candidates (beams and/or samples).

A `Candidates` pool holds, per image, N token sequences with their log-probabilities, cell-centre
coordinates and the per-level probabilities of each path. A selector turns a pool into a `Selection`:
a score per candidate (higher is better, used to rank the pool), the chosen index and its coordinate.

- `logp`: the most likely candidate (what the model alone would answer).
- `consensus`: the candidate with the most probability mass within R km, or the geometric medoid;
  several beams or samples that agree on a region outvote one sharp but isolated guess.
- `reward` (`geotoken.select.reward`): a learned scorer of "is this candidate within X km".
- `mllm` (`geotoken.select.mllm`): a multimodal LLM behind an OpenAI-compatible endpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from geotoken.errors import GeoTokenError

SELECTORS = ("logp", "consensus", "reward", "mllm")
# How a pool is made (`geotoken.decode.generate`): "beam+sample" pools `width` beams and `n` samples;
# "sample+retrieval" pools `n` samples and the cells of the first `retrieved` retrieved neighbours.
STRATEGIES = ("greedy", "beam", "sample", "beam+sample", "sample+retrieval")


@dataclass
class Candidates:
    """A pool of N candidates for each of B images. NumPy arrays, best-first order not required."""

    tokens: np.ndarray  # (B, N, T) int64 location tokens
    logp: np.ndarray  # (B, N) float64 log-probability of the whole sequence
    lat: np.ndarray  # (B, N) float64 degrees, centre of the decoded cell
    lon: np.ndarray  # (B, N) float64 degrees
    level_probs: np.ndarray  # (B, N, T) float64 P(token_t | tokens_<t) along each path

    def __post_init__(self) -> None:
        B, N, T = self.tokens.shape
        for name in ("logp", "lat", "lon"):
            if getattr(self, name).shape != (B, N):
                raise GeoTokenError(
                    f"Candidates.{name} has shape {getattr(self, name).shape}, expected {(B, N)}"
                )
        if self.level_probs.shape != (B, N, T):
            raise GeoTokenError(
                f"Candidates.level_probs has shape {self.level_probs.shape}, expected {(B, N, T)}"
            )

    @property
    def shape(self) -> tuple[int, int]:
        return self.logp.shape

    def take(self, order: np.ndarray) -> Candidates:
        """Reorder / subset the pool per image: `order` (B, M) candidate indices."""
        rows = np.arange(order.shape[0])[:, None]
        return Candidates(
            self.tokens[rows, order],
            self.logp[rows, order],
            self.lat[rows, order],
            self.lon[rows, order],
            self.level_probs[rows, order],
        )

    @staticmethod
    def concat(pools: list[Candidates]) -> Candidates:
        """Join pools of the same images along the candidate axis (e.g. beams + samples)."""
        return Candidates(*(np.concatenate([getattr(p, f) for p in pools], axis=1) for f in _FIELDS))


_FIELDS = ("tokens", "logp", "lat", "lon", "level_probs")


@dataclass
class Selection:
    """What a selector chose for each of B images."""

    index: np.ndarray  # (B,) int64 chosen candidate; -1 when the answer is not from the pool (MLLM free mode)
    lat: np.ndarray  # (B,) float64
    lon: np.ndarray  # (B,) float64
    scores: np.ndarray  # (B, N) float64, higher is better; ranks the pool (duplicates get -inf)
    notes: list[str] = field(default_factory=list)  # per image: why (e.g. a fallback), "" when nothing to say


def duplicate_mask(tokens: np.ndarray) -> np.ndarray:
    """(B, N) bool: True where a candidate repeats an earlier one of the same image (samples often do)."""
    same = (tokens[:, :, None, :] == tokens[:, None, :, :]).all(-1)  # (B, N, N)
    earlier = np.tril(np.ones(same.shape[1:], dtype=bool), k=-1)  # j < i
    return (same & earlier).any(-1)


def pool_weights(pool: Candidates) -> np.ndarray:
    """(B, N) probability of each distinct candidate (exp logp), 0 for repeats, so mass is not double counted."""
    return np.where(duplicate_mask(pool.tokens), 0.0, np.exp(pool.logp))


def _from_scores(pool: Candidates, scores: np.ndarray, notes: list[str] | None = None) -> Selection:
    """Pick the best score per image; ties go to the higher log-probability."""
    scores = np.where(duplicate_mask(pool.tokens), -np.inf, scores)
    # Lexicographic argmax over (score, logp): sort by logp, then stable argmax of the score.
    order = np.argsort(-pool.logp, axis=1, kind="stable")
    rows = np.arange(scores.shape[0])
    best = order[rows, np.argmax(np.take_along_axis(scores, order, axis=1), axis=1)]
    return Selection(
        index=best.astype(np.int64),
        lat=pool.lat[rows, best],
        lon=pool.lon[rows, best],
        scores=scores,
        notes=notes if notes is not None else [""] * len(rows),
    )


def select_logp(pool: Candidates) -> Selection:
    """The most likely candidate."""
    return _from_scores(pool, pool.logp.astype(np.float64))


def pairwise_km(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """(B, N) coordinates -> (B, N, N) great-circle distances in km."""
    from geotoken.geo import haversine_km

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
        return _from_scores(pool, -cost)
    if not radius_km > 0:
        raise GeoTokenError(f"consensus radius_km must be > 0, got {radius_km}")
    return _from_scores(pool, consensus_mass(pool, radius_km))


def select(pool: Candidates, method: str = "logp", **options) -> Selection:
    """Dispatch by name. `reward` needs `scorer=`, `memory=`; `mllm` needs `images=` (see those modules)."""
    if method == "logp":
        return select_logp(pool)
    if method == "consensus":
        return select_consensus(pool, **options)
    if method == "reward":
        from geotoken.select.reward import select_reward

        return select_reward(pool, **options)
    if method == "mllm":
        from geotoken.select.mllm import select_mllm

        return select_mllm(pool, **options)
    raise GeoTokenError(f"unknown selector {method!r}; choose one of {', '.join(SELECTORS)}")

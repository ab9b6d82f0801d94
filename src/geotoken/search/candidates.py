"""The candidate pool of test-time search and a selector's choice: what decoding makes and selection reads.

A `Candidates` pool holds, per image, N token sequences with their log-probabilities, cell-centre
coordinates and the per-level probabilities of each path. Two log-probabilities: `logp`, the model's own
(temperature 1, what beams rank by and what consensus weighs), and `logp_scaled`, under the distribution
each candidate was drawn from (a sample at temperature 0.7: the sum of log softmax(logits / 0.7), what the
authors rank samples by; beams, greedy answers and retrieved cells: the model's own, equal to `logp`). A selector turns a pool into a `Selection`:
a score per candidate (higher is better, used to rank the pool), the chosen index and its coordinate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from geotoken.errors import GeoTokenError

# How a pool is made (`geotoken.search.decode.generate`): "beam+sample" pools `beam_width` beams and
# `num_samples` samples; "greedy+sample" the greedy answer (first) and `num_samples` samples (the authors'
# MLLM pool: their best guess and their other guesses); "sample+retrieval" pools `num_samples` samples and
# the cells of the first `retrieved` retrieved neighbours; "greedy+sample+retrieval" the greedy answer
# (first), the samples and the retrieved cells (the `gate` selector's pool).
STRATEGIES = (
    "greedy",
    "beam",
    "sample",
    "beam+sample",
    "greedy+sample",
    "sample+retrieval",
    "greedy+sample+retrieval",
)
# strategies whose pool starts with the model's own answer (greedy, or the best beam)
OWN_ANSWER_FIRST = ("greedy", "beam", "beam+sample", "greedy+sample", "greedy+sample+retrieval")


@dataclass
class Candidates:
    """A pool of N candidates for each of B images. NumPy arrays, best-first order not required."""

    tokens: np.ndarray  # (B, N, T) int64 location tokens
    logp: np.ndarray  # (B, N) float64 log-probability of the whole sequence
    lat: np.ndarray  # (B, N) float64 degrees, centre of the decoded cell
    lon: np.ndarray  # (B, N) float64 degrees
    level_probs: np.ndarray  # (B, N, T) float64 P(token_t | tokens_<t) along each path
    logp_scaled: np.ndarray | None = None  # (B, N) float64 under the sampling distribution (None: = logp)

    def __post_init__(self) -> None:
        B, N, T = self.tokens.shape
        if self.logp_scaled is None:
            self.logp_scaled = np.asarray(self.logp, dtype=np.float64).copy()
        for name in ("logp", "lat", "lon", "logp_scaled"):
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
            self.logp_scaled[rows, order],
        )

    def images(self, start: int, stop: int) -> Candidates:
        """The pools of images start..stop-1."""
        return Candidates(*(getattr(self, f)[start:stop] for f in _FIELDS))

    @staticmethod
    def concat(pools: list[Candidates]) -> Candidates:
        """Join pools of the same images along the candidate axis (e.g. beams + samples)."""
        return Candidates(*(np.concatenate([getattr(p, f) for p in pools], axis=1) for f in _FIELDS))

    @staticmethod
    def join(pools: list[Candidates]) -> Candidates:
        """Join pools of successive batches of images along the image axis."""
        if len(pools) == 1:
            return pools[0]
        return Candidates(*(np.concatenate([getattr(p, f) for p in pools], axis=0) for f in _FIELDS))


_FIELDS = ("tokens", "logp", "lat", "lon", "level_probs", "logp_scaled")
# which log-probability `logp` selection ranks by: "t1" the model's own (temperature 1), "scaled" the
# sampling distribution's (the authors' sum of temperature-scaled log-probabilities)
LOGP_KINDS = ("t1", "scaled")


@dataclass
class Selection:
    """What a selector chose for each of B images."""

    index: np.ndarray  # (B,) int64 chosen candidate; -1 when the answer is not from the pool (MLLM free mode)
    lat: np.ndarray  # (B,) float64
    lon: np.ndarray  # (B,) float64
    scores: np.ndarray  # (B, N) float64, higher is better; ranks the pool (duplicates get -inf)
    notes: list[str] = field(default_factory=list)  # per image: why (e.g. a fallback), "" when nothing to say

    @staticmethod
    def join(selections: list[Selection]) -> Selection:
        """Join the selections of successive batches of images."""
        if len(selections) == 1:
            return selections[0]
        cat = [np.concatenate([getattr(s, f) for s in selections]) for f in ("index", "lat", "lon", "scores")]
        return Selection(*cat, notes=[n for s in selections for n in s.notes])


def duplicate_mask(tokens: np.ndarray) -> np.ndarray:
    """(B, N) bool: True where a candidate repeats an earlier one of the same image (samples often do)."""
    same = (tokens[:, :, None, :] == tokens[:, None, :, :]).all(-1)  # (B, N, N)
    earlier = np.tril(np.ones(same.shape[1:], dtype=bool), k=-1)  # j < i
    return (same & earlier).any(-1)


def pool_weights(pool: Candidates) -> np.ndarray:
    """(B, N) probability of each distinct candidate (exp logp), 0 for repeats, so mass is not double counted."""
    return np.where(duplicate_mask(pool.tokens), 0.0, np.exp(pool.logp))


def from_scores(pool: Candidates, scores: np.ndarray, notes: list[str] | None = None) -> Selection:
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


def select_logp(pool: Candidates, logp_kind: str = "t1") -> Selection:
    """The most likely candidate, by the model's own log-probability ("t1") or by the one under the
    distribution it was sampled from ("scaled", as the authors rank samples; ties: higher T=1 logp)."""
    if logp_kind not in LOGP_KINDS:
        raise GeoTokenError(f"logp_kind {logp_kind!r}: choose one of {', '.join(LOGP_KINDS)}")
    scores = pool.logp if logp_kind == "t1" else pool.logp_scaled
    return from_scores(pool, scores.astype(np.float64))

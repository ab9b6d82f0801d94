"""What every predictor returns: a `Prediction` per photo holding ranked `Candidate`s, and where it runs
(`resolve_device`, from `geotoken.devices`).

`geotoken.predict.Geolocator` (a GeoToken bundle) and `geotoken.pretrained.GeoCLIPPredictor` (GeoCLIP's
weights) both answer with these, so the CLI, the server and the web page serve either.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from geotoken.devices import resolve_device as resolve_device  # re-exported: predictors take it from here
from geotoken.errors import GeoTokenError
from geotoken.io import is_whole, plain

# Candidates a prediction may ask for: beyond this they mean nothing, and GeoCLIP's per-candidate
# probability masses (candidates x 100K gallery rows each) would only cost memory and minutes.
MAX_TOP_K = 1000


def check_top_k(top_k) -> int:
    """`top_k` of a predictor's `predict`: a whole number in 1..MAX_TOP_K (a NumPy integer too), as an int."""
    top_k = plain(top_k)
    if not is_whole(top_k, 1, MAX_TOP_K):
        raise GeoTokenError(f"top_k must be a whole number in 1..{MAX_TOP_K}, got {top_k!r}")
    return top_k


@dataclass
class Candidate:
    """One ranked answer for an image (`to_dict()` is its JSON form). Candidates come in the selector's order
    (`Prediction.select`: consensus, a vote, the reward scorer, ...); `probability` is each one's calibrated
    chance, an estimate beside that ranking, so it need not decrease down the list."""

    lat: float
    lon: float
    probability: float  # P(true location within `probability_within_km`), calibrated where the model is
    probability_within_km: float
    within: dict[str, float]  # {"25km": p, "200km": p, "750km": p}
    logp: float | None  # the model's log-probability of the cell (None: an MLLM answer outside the pool)
    cell: str  # S2 cell token at `level`
    level: int
    polygon: list[list[float]]  # the cell's 4 vertices [[lat, lon] x 4]
    place: dict  # {city, region, country, country_code, distance_km}
    level_confidence: list[float] | None  # calibrated probability of the prefix up to each token level
    source: str  # "pool", "mllm" or "geoclip"
    # the log-probability under the distribution it was sampled from (temperature-scaled; = logp for beams)
    logp_scaled: float | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Prediction:
    """The answer for one image: `candidates` best first, timings in ms."""

    candidates: list[Candidate]
    timings_ms: dict[str, float]
    strategy: str
    select: str
    note: str = ""  # e.g. why the MLLM selector fell back

    @property
    def lat(self) -> float:
        return self.candidates[0].lat

    @property
    def lon(self) -> float:
        return self.candidates[0].lon

    def to_dict(self) -> dict:
        return {
            "lat": self.lat,
            "lon": self.lon,
            "candidates": [c.to_dict() for c in self.candidates],
            "strategy": self.strategy,
            "select": self.select,
            "note": self.note,
            "timings_ms": self.timings_ms,
        }

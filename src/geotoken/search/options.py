"""How a search runs: `SearchOptions` (decoding strategy, its sizes, the selector, precision), checked
where they are set; `sampling_temperature` ("paper" = the authors' 0.7); which options a strategy reads."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from geotoken import DTYPES
from geotoken.errors import GeoTokenError
from geotoken.io import check_types, is_whole
from geotoken.search.candidates import LOGP_KINDS, STRATEGIES
from geotoken.search.mllm import MLLMConfig
from geotoken.search.select import SELECTORS

_RENAMED = {"width": "beam_width", "samples": "num_samples"}  # search option names before one vocabulary
PAPER_TEMPERATURE = 0.7  # the authors' sampling temperature (their runs' file names)


def sampling_temperature(value) -> float:
    """A sampling temperature from a number or "paper" (the authors' 0.7); for configs and the CLIs."""
    if isinstance(value, str) and value.strip().lower() == "paper":
        return PAPER_TEMPERATURE
    try:
        t = float(value)
    except (TypeError, ValueError):
        raise GeoTokenError(
            f"temperature {value!r}: a number >= 0 or 'paper' ({PAPER_TEMPERATURE})"
        ) from None
    if not t >= 0:
        raise GeoTokenError(f"temperature {value!r}: must be >= 0")
    return t


# the part of a strategy's name ("beam+sample" -> beam, sample) that reads each option: set for another
# strategy, the option changes nothing (`unused_options`)
STRATEGY_OPTIONS = {
    "beam_width": "beam",
    "num_samples": "sample",
    "temperature": "sample",
    "sample_top_k": "sample",
    "top_p": "sample",
    "retrieved": "retrieval",
}


def unused_options(strategy: str, given) -> list[str]:
    """The options among `given` (names) that `strategy` does not read, e.g. num_samples under beam."""
    parts = set(strategy.split("+"))
    return [name for name in given if name in STRATEGY_OPTIONS and STRATEGY_OPTIONS[name] not in parts]


@dataclass
class SearchOptions:
    """How to decode and select. Defaults: beam 5, gallery-constrained, most likely candidate."""

    strategy: str = "beam"  # one of geotoken.search.STRATEGIES
    beam_width: int = 5
    num_samples: int = 10  # samples per image
    retrieved: int = 5  # sample+retrieval: neighbours' cells added to the pool
    temperature: float = 1.0  # sampling temperature; "paper" = PAPER_TEMPERATURE (the authors' 0.7)
    sample_top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int = 0
    constrain: bool = True  # only cells that occur in the gallery
    select: str = "logp"  # one of geotoken.search.SELECTORS
    logp_kind: str = "t1"  # logp selection by the model's own log-probability, or "scaled" (the authors')
    radius_km: float = 200.0  # consensus radius; the width of the vote kernel
    gate_p: float = 0.3  # gate: keep the model's own answer where P(first gate_tokens tokens) >= gate_p
    gate_tokens: int = 2
    medoid: bool = False
    batch_size: int = 32
    dtype: str = "fp32"  # matmul precision of the model; "bf16" is ~2x faster on CPUs with AVX-512 BF16, GPUs
    mllm: MLLMConfig = field(default_factory=MLLMConfig)

    def __post_init__(self) -> None:
        """Every option checked where it is set (the library, a bundle, the server), not where it is used:
        constrain="no" would be truthy, num_samples=0 would fail inside the decoder."""
        self.temperature = sampling_temperature(self.temperature)
        if isinstance(self.mllm, dict):  # mllm={"mode": "free"}, as JSON and YAML give it
            self.mllm = MLLMConfig().replace(**self.mllm)
        check_types(self, "search option")
        choices = {"strategy": STRATEGIES, "select": SELECTORS, "logp_kind": LOGP_KINDS, "dtype": DTYPES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise GeoTokenError(
                    f"search option {name} {getattr(self, name)!r}: choose one of {', '.join(allowed)}"
                )
        ranges = {
            "beam_width": (1, None),
            "num_samples": (1, None),
            "retrieved": (0, None),
            "sample_top_k": (0, None),
            "gate_tokens": (1, None),
            "batch_size": (1, None),
            "seed": (0, 2**62),
        }  # fmt: skip  (seed + an image's key is an int64)
        for name, (low, high) in ranges.items():
            if not is_whole(getattr(self, name), low, high):
                within = f">= {low}" if high is None else f"in {low}..{high}"
                raise GeoTokenError(
                    f"search option {name} must be a whole number {within}, got {getattr(self, name)!r}"
                )
        for name, ok, bounds in (("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
                                 ("gate_p", 0 <= self.gate_p <= 1, "in [0, 1]"),
                                 ("radius_km", self.radius_km > 0, "> 0")):  # fmt: skip
            if not ok:
                raise GeoTokenError(f"search option {name} must be {bounds}, got {getattr(self, name)!r}")

    def replace(self, **changes) -> SearchOptions:
        """A copy with `changes` applied; None values are ignored; unknown names are an error."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise GeoTokenError(f"unknown search option(s) {unknown}; known: {sorted(names)}")
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["mllm"] = {k: v for k, v in d["mllm"].items() if k != "api_key"}  # never write secrets
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SearchOptions:
        d = {_RENAMED.get(k, k): v for k, v in d.items()}  # bundles written before the rename
        mllm = MLLMConfig().replace(**d.pop("mllm", {}))
        return cls().replace(**d, mllm=mllm)


def describe_search(search: dict) -> str:
    """One line for the model card, e.g. "greedy+sample+retrieval (10 samples, 15 retrieved cells)"."""
    strategy = str(search.get("strategy"))
    parts = [f"width {search.get('beam_width')}"] if "beam" in strategy else []
    parts += [f"{search.get('num_samples')} samples"] if "sample" in strategy else []
    parts += [f"{search.get('retrieved')} retrieved cells"] if "retrieval" in strategy else []
    return strategy + (f" ({', '.join(parts)})" if parts else "")

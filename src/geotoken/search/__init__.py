"""Test-time search: decode candidate pools from the model, then select one answer.

- `candidates`: the pool (`Candidates`), a selector's choice (`Selection`), `STRATEGIES`
- `decode`: cached greedy / beam / sampling / retrieved cells scored by the model, gallery-prefix constraint
- `select`: `logp`, `consensus`, `reward` (`reward`: the learned scorer), `mllm` (`mllm`)
- `calibration`: calibrated "within X km" and per-level confidences
- `options`: `SearchOptions`, how a search runs (strategy, sizes, selector, precision), checked when set
"""

from geotoken.search.candidates import LOGP_KINDS, STRATEGIES, Candidates, Selection
from geotoken.search.select import SELECTORS, select

__all__ = ["LOGP_KINDS", "SELECTORS", "STRATEGIES", "Candidates", "Selection", "select"]

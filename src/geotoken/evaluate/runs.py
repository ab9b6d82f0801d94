"""What one evaluated method leaves behind, shared by the baselines' driver and the model's rows.

- `MethodRun`: one evaluated method (or one strategy x selector of the model): predictions and scores.
- `slug(label)`: the file-name form of a method label (cache/<slug>.<key>.npz, map_<slug>.png, ...).
- `load_cached` / `save_cached`: a method's predictions in the evaluation's cache folder, as .npz files
  of numeric arrays only (no pickles), so a rerun skips the methods that already finished.
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from geotoken.evaluate.baselines import Predictions
from geotoken.evaluate.metrics import MethodMetrics
from geotoken.io import atomic_path


@dataclass
class MethodRun:
    """One evaluated method (or one strategy x selector of the model): its predictions and scores."""

    label: str
    method: str
    strategy: str
    config: dict
    pred: Predictions
    errors_km: np.ndarray
    metrics: MethodMetrics | None = None
    seconds: float = 0.0
    cached: bool = False


def slug(label: str) -> str:
    """File-name form of a method label, e.g. 'geotoken beam5+logp' -> 'geotoken_beam5_logp'."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_")


def load_cached(path: Path, n: int) -> Predictions | None:
    """The predictions `save_cached` wrote to `path`, or None if absent, not for `n` queries, or unreadable
    (an empty or truncated file from a crash or a full disk is recomputed, like a missing one)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if z["lat"].shape != (n,) or z["lon"].shape != (n,):
                return None
            extra = {k[2:]: z[k] for k in z.files if k.startswith("x_")}
            return Predictions(z["lat"], z["lon"], z["score"] if "score" in z else None, extra)
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile):
        return None


def save_cached(path: Path, pred: Predictions) -> None:
    """Write `pred` (lat, lon, score and the extra arrays) to `path` atomically."""
    arrays = {"lat": pred.lat, "lon": pred.lon}
    if pred.score is not None:
        arrays["score"] = pred.score
    arrays.update({f"x_{k}": np.asarray(v) for k, v in pred.extra.items()})  # numeric arrays only: no pickles
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)

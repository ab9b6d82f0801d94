"""Reading a run or evaluation folder for the report: every file the report uses, checked, in one place.

`read_run(RUN_DIR) -> RunFolder` reads either
    a run folder        run.json (config, stage timings, `eval` {split: folder}, `samples` of a demo run)
                        + those folders (`geotoken demo`, `geotoken run`)
    an eval folder      what `geotoken evaluate` writes: metrics.json, predictions.csv, error_cdf.png,
                        map_<method>.png, reliability_<method>.png

metrics.json's method and paired entries are read by `geotoken.evaluate.metrics` (`MethodMetrics.from_dict`,
`PairedComparison.from_dict`), the same code that writes them. Optional parts that are absent are listed in
`RunFolder.missing` (in the order the report shows them); a file that is present but malformed is a
GeoTokenError naming the file, row and field.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from geotoken.data.images import open_image
from geotoken.errors import GeoTokenError
from geotoken.evaluate.metrics import MethodMetrics, PairedComparison
from geotoken.evaluate.runs import slug
from geotoken.geo import THRESHOLDS_KM
from geotoken.io import read_json, split_ref

PREDICTION_COLUMNS = ("id", "lat", "lon", "pred_lat", "pred_lon", "error_km", "method", "strategy")


# ---------------------------------------------------------------------------------------------- checks
def _need(obj, key: str, kind: type | tuple, path: Path, where: str = ""):
    """obj[key], checked to be of `kind`; a clear error naming file and field otherwise."""
    name = f"{where}.{key}" if where else key
    if not isinstance(obj, dict) or key not in obj:
        raise GeoTokenError(f"{path}: missing field {name!r}")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind in (int, float, (int, float)):
        raise GeoTokenError(f"{path}: field {name!r} should be {_kind_name(kind)}, got {value!r:.80}")
    return value


def _kind_name(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({dict: "an object", list: "a list", str: "a string"}.get(k, "a number") for k in kinds)


# ---------------------------------------------------------------------------------------------- metrics.json
@dataclass
class MethodRow:
    """One method entry of metrics.json."""

    label: str
    strategy: str
    seconds: float | None
    metrics: MethodMetrics
    # P(within r km) of the model's rows: (key, e.g. 'within_200km', [accuracy, mean confidence, ECE raw,
    # ECE]); a value that is not a number is None
    calibration: list[tuple[str, list[float | None]]] = field(default_factory=list)
    # the search the bundle's calibration was fitted under, where this row searched otherwise ({} if alike)
    calibrated_for: dict = field(default_factory=dict)


@dataclass
class Metrics:
    """metrics.json: the table rows in file order, the paired comparisons, and the header counts."""

    thresholds: list[float]
    rows: list[MethodRow]
    pairs: list[PairedComparison]
    queries_rows: Any = "?"  # as written (the report shows them as text)
    gallery_rows: Any = "?"
    n_boot: Any = "?"
    intervals: str = "percentile bootstrap"  # metrics.json written before its "intervals" field


def _calibration(entry: dict) -> list[tuple[str, list[float | None]]]:
    cal = entry.get("calibration")
    if not isinstance(cal, dict):
        return []
    rows = []
    for key, c in cal.items():
        if key.startswith("within_") and isinstance(c, dict):
            vals = [c.get(k) for k in ("accuracy", "mean_confidence", "ece_raw", "ece")]
            rows.append((key, [v if isinstance(v, (int, float)) else None for v in vals]))
    return rows


def read_metrics(path: Path) -> Metrics:
    """metrics.json, checked: every method has every threshold of `thresholds_km`, and so has every pair."""
    m = read_json(path)
    if not isinstance(m, dict):
        raise GeoTokenError(f"{path}: expected a JSON object, got {type(m).__name__}")
    thresholds = [float(t) for t in m.get("thresholds_km", THRESHOLDS_KM)]
    methods = _need(m, "methods", dict, path)
    if not methods:
        raise GeoTokenError(f"{path}: field 'methods' is empty")
    rows = []
    for label, entry in methods.items():
        where = f"methods.{label}"
        try:
            metrics = MethodMetrics.from_dict(entry, where)
        except GeoTokenError as exc:
            raise GeoTokenError(f"{path}: {exc}") from None
        for t in thresholds:
            if t not in metrics.accuracy:
                raise GeoTokenError(f"{path}: missing field '{where}.accuracy.{t:g}' (threshold {t:g} km)")
        seconds = entry.get("seconds")
        rows.append(
            MethodRow(
                label=str(label),
                strategy=str(entry.get("strategy", "")),
                seconds=seconds if isinstance(seconds, (int, float)) else None,
                metrics=metrics,
                calibration=_calibration(entry),
                calibrated_for=dict((entry.get("config") or {}).get("calibration_fitted_for") or {}),
            )
        )
    pairs = m.get("paired") or []
    if not isinstance(pairs, list):
        raise GeoTokenError(f"{path}: field 'paired' should be a list, got {pairs!r:.80}")
    paired = []
    for i, pair in enumerate(pairs):
        where = f"paired[{i}]"
        try:
            p = PairedComparison.from_dict(pair, where)
        except GeoTokenError as exc:
            raise GeoTokenError(f"{path}: {exc}") from None
        for t in thresholds:
            if t not in p.accuracy:
                raise GeoTokenError(f"{path}: missing field '{where}.accuracy_diff.{t:g}'")
        paired.append(p)
    q, g = m.get("queries", {}), m.get("gallery", {})
    return Metrics(
        thresholds,
        rows,
        paired,
        q.get("rows", "?")
        if not q.get("skipped")
        else f"{q.get('rows', '?')} ({q['skipped']} unreadable images left out)",
        g.get("rows", "?"),
        m.get("bootstrap", {}).get("n_boot", "?"),
        str(m.get("intervals", Metrics.intervals)),
    )


# ---------------------------------------------------------------------------------------------- predictions.csv
def read_predictions(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """predictions.csv -> {method: {"lat", "lon", "pred_lat", "pred_lon", "error_km": float64 (n,)}} (strict)."""
    numeric = ("lat", "lon", "pred_lat", "pred_lon", "error_km")
    out: dict[str, dict[str, list[float]]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[: len(PREDICTION_COLUMNS)]] != list(
            PREDICTION_COLUMNS
        ):
            raise GeoTokenError(
                f"{path}: header should start with {','.join(PREDICTION_COLUMNS)}, got {header}"
            )
        for row_no, row in enumerate(reader, start=2):
            if len(row) < len(PREDICTION_COLUMNS):
                raise GeoTokenError(
                    f"{path}, row {row_no}: {len(row)} fields, expected {len(PREDICTION_COLUMNS)}"
                )
            rec = dict(zip(PREDICTION_COLUMNS, row))
            cols = out.setdefault(rec["method"], {k: [] for k in numeric})
            for k in numeric:
                try:
                    v = float(rec[k])
                except ValueError:
                    raise GeoTokenError(
                        f"{path}, row {row_no}, field {k!r}: not a number: {rec[k]!r}"
                    ) from None
                if not math.isfinite(v) or (k == "error_km" and v < 0):
                    raise GeoTokenError(f"{path}, row {row_no}, field {k!r}: invalid value {rec[k]!r}")
                cols[k].append(v)
    return {m: {k: np.asarray(v, dtype=np.float64) for k, v in cols.items()} for m, cols in out.items()}


# ---------------------------------------------------------------------------------------------- one evaluation
@dataclass
class Evaluation:
    """One evaluation folder: its metrics, predictions (if any) and the plot files that exist."""

    name: str
    folder: Path
    metrics: Metrics
    predictions: dict[str, dict[str, np.ndarray]] | None  # None: no predictions.csv
    cdf: Path | None  # error_cdf.png, if present
    maps: dict[str, Path]  # method label -> map_<slug>.png, for the methods that have one
    reliability: list[Path]  # reliability_*.png, sorted


def read_evaluation(name: str, folder: Path, missing: list[str]) -> Evaluation | None:
    """An evaluation folder, or None (listed in `missing`) when it has no metrics.json."""
    metrics_path = folder / "metrics.json"
    if not metrics_path.is_file():
        missing.append(f"{metrics_path} (evaluation '{name}' has no metrics; section left out)")
        return None
    metrics = read_metrics(metrics_path)
    labels = [r.label for r in metrics.rows]
    preds = None
    if (folder / "predictions.csv").is_file():
        preds = read_predictions(folder / "predictions.csv")
        unknown = sorted(set(preds) - set(labels))
        if unknown:
            raise GeoTokenError(
                f"{folder / 'predictions.csv'}: method(s) {unknown} are not in {metrics_path}"
            )
    else:
        missing.append(f"{folder / 'predictions.csv'} (maps and CDF only from existing plots)")
    cdf = folder / "error_cdf.png"
    if not cdf.is_file() and not preds:  # with predictions, the report draws the CDF itself
        missing.append(f"{cdf} (no error CDF for '{name}')")
    maps = {label: folder / f"map_{slug(label)}.png" for label in labels}
    maps = {label: path for label, path in maps.items() if path.is_file()}
    if not maps and not (preds and any(label in preds for label in labels)):  # nothing to show or draw
        missing.append(f"{folder}/map_*.png (no world map for '{name}')")
    return Evaluation(
        name,
        folder,
        metrics,
        preds,
        cdf if cdf.is_file() else None,
        maps,
        sorted(folder.glob("reliability_*.png")),
    )


# ---------------------------------------------------------------------------------------------- run.json
@dataclass
class Example:
    """One of run.json's `samples` (candidates checked to have lat and lon) and its photo, if readable."""

    record: dict
    image: Image.Image | None


@dataclass
class RunSummary:
    """What run.json says about the run besides its evaluations and examples."""

    config: dict | None
    timings: dict | None  # stage -> seconds
    stages: dict  # stage -> {"folder": ...}
    total: Any
    extra: dict  # bundle, align_metrics


@dataclass
class RunFolder:
    """Everything the report shows, read from a run folder (summary set) or an evaluation folder."""

    root: Path
    evaluations: list[Evaluation]
    summary: RunSummary | None = None  # None: an evaluation folder (no run.json)
    examples: list[Example] | None = None  # None: no `samples` in run.json
    missing: list[str] = field(default_factory=list)
    tables: list[tuple[str, str]] = field(default_factory=list)  # (stage, table.md's text) of `table` stages


def _relocate(path: str, old_root: str | None, root: Path) -> Path:
    """A path written into run.json, found again if the run folder was moved or copied since."""
    p = Path(path)
    if not p.is_absolute():
        return root / p
    if old_root:  # prefer the copy inside this folder
        try:
            moved = root / p.relative_to(old_root)
        except ValueError:
            return p
        if moved.exists() or not p.exists():
            return moved
    return p


def read_examples(
    samples: list, root: Path, old_root: str | None, path: Path, missing: list[str]
) -> list[Example]:
    """run.json's `samples`, checked, each with its photo (a photo that cannot be read is listed missing)."""
    examples = []
    for i, s in enumerate(samples):
        where = f"samples[{i}]"
        cands = _need(s, "candidates", list, path, where)
        for j, c in enumerate(cands):
            for key in ("lat", "lon"):
                _need(c, key, (int, float), path, f"{where}.candidates[{j}]")
        image = None
        ref = s.get("image")
        if ref:
            file_part, member = split_ref(str(ref))
            ref = os.fspath(_relocate(file_part, old_root, root)) + (
                f"#{member}" if member is not None else ""
            )
            try:
                image = open_image(ref)
            except GeoTokenError as exc:
                missing.append(f"example image {ref} ({exc})")
        examples.append(Example(s, image))
    return examples


def _read_run_json(root: Path) -> RunFolder:
    path = root / "run.json"
    run = RunFolder(root, [])
    summary = read_json(path)
    if not isinstance(summary, dict):
        raise GeoTokenError(f"{path}: expected a JSON object, got {type(summary).__name__}")
    if "train" in summary and "model" in summary and not {"eval", "stages"} & set(summary):
        raise GeoTokenError(
            f"{path}: the record of a training run (`geotoken train`: its validation is in log.jsonl), not of "
            "a `geotoken demo` / `geotoken run` run; evaluate the model (`geotoken evaluate`) and report that"
        )
    old_root = summary.get("run_dir")
    evals = summary.get("eval")
    if evals is None:
        run.missing.append(f"{path}: field 'eval' (no evaluation in this run)")
        evals = {}
    if not isinstance(evals, dict):
        raise GeoTokenError(f"{path}: field 'eval' should be an object {{split: folder}}, got {evals!r:.80}")
    for name, folder in evals.items():
        if not isinstance(folder, str):
            raise GeoTokenError(f"{path}: field 'eval.{name}' should be a folder path, got {folder!r:.80}")
        evaluation = read_evaluation(str(name), _relocate(folder, old_root, root), run.missing)
        if evaluation is not None:
            run.evaluations.append(evaluation)
    for name, table in (summary.get("tables") or {}).items():
        found = _relocate(str(table), old_root, root)
        if found.is_file():
            run.tables.append((str(name), found.read_text(encoding="utf-8")))
        else:
            run.missing.append(f"{found} (the {name} stage's Table I)")
    samples = summary.get("samples")
    if samples:
        if not isinstance(samples, list):
            raise GeoTokenError(f"{path}: field 'samples' should be a list, got {samples!r:.80}")
        run.examples = read_examples(samples, root, old_root, path, run.missing)
    else:
        run.missing.append(f"{path}: field 'samples' (no example photos)")
    config = summary.get("config") if isinstance(summary.get("config"), dict) else None
    if config is None:
        run.missing.append(f"{path}: field 'config'")
    timings = summary.get("timings_s") if isinstance(summary.get("timings_s"), dict) else None
    if timings is None:
        run.missing.append(f"{path}: field 'timings_s'")
    run.summary = RunSummary(
        config=config,
        timings=timings,
        stages=summary.get("stages") if isinstance(summary.get("stages"), dict) else {},
        total=summary.get("total_s"),
        extra={k: summary[k] for k in ("bundle", "align_metrics") if k in summary},
    )
    return run


def read_run(run_dir: str | os.PathLike) -> RunFolder:
    """A run folder (run.json: `geotoken demo`, `geotoken run`) or an evaluation folder (metrics.json), read
    and checked."""
    root = Path(run_dir)
    if not root.is_dir():
        raise GeoTokenError(f"{root}: no such folder")
    if (root / "run.json").is_file():
        return _read_run_json(root)
    if (root / "metrics.json").is_file():
        run = RunFolder(root, [])
        run.evaluations.append(read_evaluation(root.name, root, run.missing))  # metrics.json is there
        run.missing.append(
            f"{root / 'run.json'} (an evaluation folder: no run configuration, timings or examples)"
        )
        return run
    message = (
        f"{root}: neither run.json (a `geotoken demo` or `geotoken run` run) nor metrics.json "
        f"(`geotoken evaluate`)"
    )
    below = sorted(p.parent for pattern in ("*/metrics.json", "*/*/metrics.json") for p in root.glob(pattern))
    below = [folder for folder in below if _evaluation(folder)]
    if below:  # a run folder from before `geotoken run` wrote run.json: its evaluate stage's split folders
        message += (
            f"; its evaluation folders, each a report of its own: {', '.join(map(str, below))} (or rerun "
            f"`geotoken run` on it: every finished stage is reused and it writes run.json)"
        )
    raise GeoTokenError(message)


def _evaluation(folder: Path) -> bool:
    """Whether `folder` is what `geotoken evaluate` writes (a model checkpoint's metrics.json is not)."""
    try:
        return "methods" in read_json(folder / "metrics.json")
    except (GeoTokenError, TypeError):
        return False

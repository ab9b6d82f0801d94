"""The project's model as an evaluation method: every decoding strategy x selector is one table row.

Runs `geotoken.predict.Geolocator.search` over the query set's aligned embeddings (neighbours from the
bundle's gallery index, computed once and shared by all rows), so the paper's comparisons (greedy vs
beam vs N samples, each with logp / consensus / reward / MLLM selection) are one command. Each row also
carries what calibration reporting needs (raw "within X km" confidences and per-level prefix
confidences with their outcomes, and the bundle's temperatures), so `metrics.json` reports expected
calibration error and a reliability plot per row.

Each row is decoded either under the gallery-prefix constraint (every answer is the cell of a gallery
photo; the label ends in `+gallery`, e.g. 'geotoken greedy+gallery') or freely, as the paper's authors
decode (no suffix, e.g. 'geotoken greedy'); the decoding is part of the row's config and cache key.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np

from geotoken.bundle import gallery_dir, gallery_tokens_path, read_bundle
from geotoken.data.images import open_image
from geotoken.errors import GeoTokenError
from geotoken.evaluate.baselines import Predictions, Split
from geotoken.evaluate.runs import MethodRun, load_cached, save_cached, slug
from geotoken.geo import haversine_km
from geotoken.io import sha256_file, sha256_json
from geotoken.predict import Geolocator
from geotoken.s2 import latlon_to_tokens
from geotoken.search import STRATEGIES
from geotoken.search.calibration import RADII_KM, Calibration, calibration_data, calibration_report
from geotoken.search.mllm import fell_back
from geotoken.search.options import SearchOptions, sampling_temperature

# the label suffix of a row decoded under the gallery-prefix constraint (every answer a gallery photo's cell)
GALLERY_SUFFIX = "+gallery"


def row_label(strategy: str, select: str, cfg, constrain: bool = True) -> str:
    """Table label of one strategy x selector x decoding, e.g. 'geotoken beam5+consensus+gallery'
    (gallery-constrained) or 'geotoken greedy' (free decoding, as the paper's authors decode)."""
    suffix = GALLERY_SUFFIX if constrain else ""
    if select == "logp" and getattr(cfg, "logp_kind", "t1") == "scaled":
        select = "logp-scaled"  # the authors' ranking: the temperature-scaled log-probability
    if select == "mllm" and getattr(cfg, "mllm", {}).get("mode") == "free":  # the paper's two MLLM rows
        select = "mllm-free"
    if strategy == "greedy":
        return f"geotoken greedy{suffix}"
    if strategy.endswith("sample+retrieval"):  # e.g. 'geotoken sample10+nbr5+reward+gallery'
        first = "greedy+" if strategy.startswith("greedy+") else ""
        return f"geotoken {first}sample{cfg.num_samples}+nbr{cfg.retrieved}+{select}{suffix}"
    if strategy == "beam+sample":  # both pool sizes, e.g. 'geotoken beam5+sample10+consensus'
        return f"geotoken beam{cfg.beam_width}+sample{cfg.num_samples}+{select}{suffix}"
    size = cfg.beam_width if strategy == "beam" else cfg.num_samples
    return f"geotoken {strategy}{size}+{select}{suffix}"


def rows_to_run(cfg) -> list[tuple[str, str, bool]]:
    """(strategy, selector, constrain) rows: greedy has one candidate, so selection does not apply to it.

    Every strategy is decoded with each of `cfg.constrain` (True: gallery-constrained, False: free), and
    the strategies of `cfg.free_strategies` also free; free rows come first within a strategy."""
    strategies = (*cfg.strategies, *cfg.free_strategies)
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise GeoTokenError(f"evaluation strategies {unknown}: choose from {', '.join(STRATEGIES)}")
    if not cfg.constrain:
        raise GeoTokenError(
            "evaluation: constrain needs at least one of True (gallery-constrained), False (free)"
        )
    rows = []
    for strategy in dict.fromkeys(strategies):
        variants = set(cfg.constrain) if strategy in cfg.strategies else set()
        variants |= {False} if strategy in cfg.free_strategies else set()
        for constrain in sorted(variants):  # False (free) before True (+gallery)
            for select in ["logp"] if strategy == "greedy" else dict.fromkeys(cfg.selectors):
                rows.append((strategy, select, constrain))
    return rows


def _search_defaults(bundle: Path | None, geo) -> SearchOptions:
    """The search options a row starts from: the bundle's defaults (read from its bundle.json when not loaded
    yet), or those of the given geolocator."""
    if geo is not None:
        return geo.options
    return SearchOptions.from_dict(read_bundle(bundle).get("search", {}))


def _calibration(bundle: Path | None, geo) -> Calibration | None:
    """The bundle's calibration (None: it has none), read from its file when the bundle is not loaded yet."""
    if geo is not None:
        return geo.calibration
    spec = read_bundle(bundle)
    return Calibration.load(bundle / spec["calibration"]) if spec.get("calibration") else None


def _bundle_identity(path: Path) -> dict:
    """What the cache key needs to know about a bundle: hashes of its spec, model, calibration, reward
    scorer, and gallery (store header and tokens; the large embedding arrays are covered by the header)."""
    if not (path / "bundle.json").is_file():
        raise GeoTokenError(f"{path}: not a model bundle (no bundle.json)")
    spec = read_bundle(path)
    files = {  # named as in a copied bundle, whether the gallery is copied or linked
        "bundle.json": path / "bundle.json",
        "calibration.json": path / "calibration.json",
        "gallery/store.json": gallery_dir(path, spec) / "store.json",
        "gallery/tokens.npy": gallery_tokens_path(path, spec),
    }
    for f in [*sorted((path / "model").glob("*")), *sorted((path / "reward").glob("*"))]:
        files[str(f.relative_to(path))] = f
    return {name: sha256_file(f) for name, f in files.items() if f.is_file()}


def _calibration_arrays(geo, res, queries: Split) -> dict[str, np.ndarray]:
    """Raw confidences and outcomes of the run (see geotoken.search.calibration.calibration_data), as arrays."""

    cfg = geo.model.cfg
    true_tokens = latlon_to_tokens(queries.lat, queries.lon, cfg.level, cfg.group)
    fitted = (
        geo.calibration.radii_km if geo.calibration is not None else []
    )  # (scored at the radii it fitted)
    radii = sorted({*RADII_KM, *map(float, fitted)})
    data = calibration_data(res.pool, res.selection, queries.lat, queries.lon, true_tokens, radii_km=radii)
    cal = geo.calibration or Calibration(radii_km=radii, within=[1.0] * len(radii))
    temps = dict(zip(cal.radii_km, cal.within))
    return {
        "cal_radii": np.asarray(radii, dtype=np.float64),
        "cal_within_conf": np.stack([data["within"][r][0] for r in radii]),  # (R, B)
        "cal_within_outcome": np.stack([data["within"][r][1] for r in radii]).astype(np.int8),  # (R, B)
        "cal_level_conf": np.asarray(data["levels"][0], dtype=np.float64),  # (B, T)
        "cal_level_correct": np.asarray(data["levels"][1]).astype(np.int8),  # (B, T)
        "cal_temps_within": np.asarray([temps.get(r, 1.0) for r in radii], dtype=np.float64),
        "cal_temps_levels": np.asarray(cal.levels, dtype=np.float64),
    }


def calibration_from_arrays(extra: dict, plot: str | Path | None = None) -> dict | None:
    """ECE report (and optionally a reliability PNG) from the arrays `_calibration_arrays` stored."""
    if "cal_radii" not in extra:
        return None
    radii = [float(r) for r in extra["cal_radii"]]
    data = {
        "within": {
            r: (extra["cal_within_conf"][i], extra["cal_within_outcome"][i].astype(bool))
            for i, r in enumerate(radii)
        },
        "levels": (extra["cal_level_conf"], extra["cal_level_correct"].astype(bool)),
    }
    cal = Calibration(
        radii_km=radii, within=extra["cal_temps_within"].tolist(), levels=extra["cal_temps_levels"].tolist()
    )
    return calibration_report(data, cal, plot=None if plot is None else str(plot))


def _images(queries: Split) -> list:
    if getattr(queries, "images", None) is None:
        raise GeoTokenError("--select mllm sends the photos: give --queries-manifest with image references")
    return [open_image(ref) for ref in queries.images]


def run_geotoken(
    gallery: Split,
    queries: Split,
    cfg,
    cache: Path | None = None,
    inputs: str = "",
    log=print,
    geolocator=None,
):
    """Yield one `MethodRun` per strategy x selector. `geolocator`: `cfg.model` (a bundle) already loaded, or
    a model of its own (no `cfg.model`: its rows are not cached, having no bundle files to key them by)."""
    if geolocator is None and not cfg.model:
        raise GeoTokenError("--method geotoken needs --model BUNDLE (a folder with bundle.json)")
    bundle = Path(cfg.model) if cfg.model else None
    identity = _bundle_identity(bundle) if bundle is not None else None
    # the bundle's search defaults and calibration, read once (from its files until it is loaded)
    defaults, calibration = _search_defaults(bundle, geolocator), _calibration(bundle, geolocator)
    geo, neighbours, embeddings = geolocator, None, None
    for strategy, select, constrain in rows_to_run(cfg):
        label = row_label(strategy, select, cfg, constrain)
        options = {"strategy": strategy, "select": select, "beam_width": cfg.beam_width, "num_samples": cfg.num_samples,
                   "temperature": sampling_temperature(cfg.temperature), "batch_size": cfg.batch_size,
                   "dtype": cfg.dtype, "retrieved": cfg.retrieved, "constrain": constrain,
                   "logp_kind": cfg.logp_kind}  # fmt: skip
        conf = {"model": cfg.model, **options}
        if select == "mllm":  # its endpoint and model (the environment's too) decide the answers
            mllm = defaults.mllm.replace(**cfg.mllm)
            options["mllm"], conf["mllm"] = mllm, mllm.identity()
        key = sha256_json({"method": "geotoken", "config": conf, "bundle": identity, "inputs": inputs})[:16]
        path = cache / f"{slug(label)}.{key}.npz" if cache is not None and identity is not None else None
        pred = load_cached(path, len(queries)) if path is not None else None
        t0 = time.perf_counter()
        cached = pred is not None
        if pred is None:
            if geo is None:  # (loaded once, on the first row not in the cache)
                log(f"geotoken: loading bundle {bundle}")
                geo = Geolocator.from_bundle(bundle, device=cfg.device)
            if embeddings is None:
                if queries.store is not None:
                    queries.store.check_heads(geo.made_by, f"the alignment heads of model {cfg.model}")
                embeddings = {
                    m: np.asarray(queries.array(m), dtype=np.float32) for m in geo.model.cfg.modalities
                }
                neighbours = geo.neighbours(embeddings) if geo.model.cfg.k else None  # shared by all rows
            log(f"{label}: decoding {len(queries)} queries")
            images = _images(queries) if select == "mllm" else None
            res = geo.search(embeddings, neighbours, images, progress=True, **options)
            score = np.exp(res.pool.logp[np.arange(len(queries)), np.maximum(res.selection.index, 0)])
            extra = _calibration_arrays(geo, res, queries)
            if select == "mllm":  # an answer that could not be used: the image kept its logp choice
                extra["mllm_fell_back"] = np.array([fell_back(n) for n in res.selection.notes], dtype=bool)
            pred = Predictions(res.selection.lat, res.selection.lon, score, extra)
            if path is not None:
                save_cached(path, pred)
        other = calibration.other_search(defaults.replace(**options)) if calibration else {}
        if other:  # (after the cache key: a fact about the bundle, not an option of the row)
            conf = {**conf, "calibration_fitted_for": {k: then for k, (then, _) in other.items()}}
        if "mllm_fell_back" in pred.extra:
            fell = pred.extra["mllm_fell_back"]
            conf = {**conf, "mllm_fell_back": int(fell.sum())}  # in metrics.json, cached or not
            if fell.any():
                first = next((n for n in res.selection.notes if fell_back(n)), "") if not cached else ""
                warnings.warn(
                    f"{label}: {int(fell.sum())} of {len(fell)} images fell back to logp (the MLLM's answer "
                    f"could not be used{': ' + first if first else ''})",
                    stacklevel=2,
                )
        errors = haversine_km(queries.lat, queries.lon, pred.lat, pred.lon)
        shown = "logp-scaled" if select == "logp" and cfg.logp_kind == "scaled" else select
        strategy_text = "greedy" if strategy == "greedy" else f"{strategy}+{shown}"
        strategy_text += GALLERY_SUFFIX if constrain else ""
        yield MethodRun(
            label,
            "geotoken",
            strategy_text,
            conf,
            pred,
            errors,
            seconds=time.perf_counter() - t0,
            cached=cached,
        )

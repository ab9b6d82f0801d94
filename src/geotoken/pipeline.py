"""The whole method, end to end, on the built-in offline dataset: what `geotoken demo` runs.

The demo is a graph of the library's stages (`geotoken.stages`), declared by `demo_pipeline` from a
`DemoConfig`; `run_demo` runs it in a run folder, then geolocates a few held-out photos and writes the
summary (`run.json`) and the report. Each stage has its own folder, named after the content hash of its
configuration and of the stages it reads, so that a second run reuses every finished stage and a changed
option redoes only what depends on it:

    data      EarthViews views of the Earth at real MP16 photo coordinates (WebDataset shards + manifests):
              clean gallery views, photo-like training queries of the gallery's places, val and test splits
    features  frozen-backbone features of every split (float16 feature stores)
    align     contrastive heads, and aligned stores of every split (visual / GPS-aligned / text-aligned)
    index     FAISS index over the gallery; neighbour tables of every split (training queries never see a
              gallery view of their own place, as test photos never do)
    model     the GeoToken encoder-decoder, trained on the train queries against the gallery, validated on val
    bundle    everything `geotoken predict` / `geotoken serve` need, in one folder
    eval      baselines and the model (greedy, beam, sampling + selectors) on the three test splits (random,
              spatially disjoint, distribution shift) beside the nearest-gallery-coordinate ceiling, decoded
              under the gallery constraint (+gallery rows), greedy also free
    report    one self-contained HTML file

A stage is finished when its `stage.json` exists (written last, atomically); stages that are resumable by
themselves (dataset shards, embedding chunks, training checkpoints) also pick up a killed run mid-way.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from geotoken.data.earthviews import PRESETS as EV_PRESETS
from geotoken.data.earthviews import EarthViewsConfig
from geotoken.data.images import open_image
from geotoken.data.manifest import read_manifest
from geotoken.errors import GeoTokenError
from geotoken.evaluate.metrics import MethodMetrics, print_tables
from geotoken.geo import haversine_km
from geotoken.io import read_json, write_json
from geotoken.predict import Geolocator
from geotoken.report import write_report
from geotoken.stages import (
    TEST_SPLITS,
    AlignStageConfig,
    BundleStageConfig,
    DataStageConfig,
    EvalStageConfig,
    FeaturesStageConfig,
    IndexStageConfig,
    ModelStageConfig,
    Pipeline,
    Run,
    StageSpec,
    run_pipeline,
)
from geotoken.stages.config import run_summary, write_run_summary

__all__ = [
    "PRESETS",
    "DemoConfig",
    "Run",
    "demo_config",
    "demo_earthviews",
    "demo_pipeline",
    "load_summary",
    "print_summary",
    "run_demo",
]


@dataclass
class DemoConfig:
    """Sizes and options of the demo. `preset` names a size (`demo`, `fast`, `full`); fields override it."""

    dataset: str = "demo"  # EarthViews preset: tiny | demo | full
    dataset_size: int | None = 10_000  # gallery views (None: the preset's)
    n_test: int | None = 1000  # views per val/test split (None: the preset's)
    image_size: int | None = None  # EarthViews pixels per side (None: the preset's)
    train_views: int = 2  # photo-like training queries per gallery place (0: train on gallery views, as MP16)
    seed: int = 0
    backbone: str = "efficientnet-lite0"
    backbone_image_size: int | None = None  # None: the dataset's image size
    align_epochs: int = 10
    index_embedding: str = "visual+gps"  # what retrieval searches (a store array or a '+' concatenation)
    k: int = 5  # neighbours per query (the paper: 15; 5 keeps CPU training inside the demo's budget)
    model_preset: str = "tiny"
    arch: str = "ours"  # model layers (geotoken.model.ARCHS); "authors": the paper's nn.Transformer layers
    # training recipe (geotoken.train.recipes: "paper" = the authors' AdamW, StepLR, batch 2048, bf16); ""
    # none. The demo's epochs and batch size (the micro-batch) still apply; lr and dtype below, when set.
    recipe: str = ""
    epochs: int = 6
    batch_size: int = 128
    lr: float | None = None  # None: 1e-3, or the recipe's
    # training precision; "bf16": autocast (fast on GPUs and on CPUs with AVX-512 BF16 / AMX); None: fp32,
    # or the recipe's
    dtype: str | None = None
    label_smoothing: float = 0.0  # training: over each token's siblings
    drop_near_km: float = 0.0  # training: a share of queries lose their neighbours within this many km
    drop_near_share: float = 0.5
    # the evaluation stage's rows: every strategy x selector gallery-constrained (labelled +gallery),
    # greedy also free (the authors' decoding)
    strategies: tuple[str, ...] = EvalStageConfig.strategies
    selectors: tuple[str, ...] = EvalStageConfig.selectors
    constrain: tuple[bool, ...] = EvalStageConfig.constrain
    free_strategies: tuple[str, ...] = EvalStageConfig.free_strategies
    reward_images: int = 2000  # training images of the reward scorer (0: no scorer)
    # ceiling: the nearest gallery coordinate to the true place (an oracle bound, not a method)
    baselines: tuple[str, ...] = ("prior", "nn", "knn", "cells", "gps-gallery", "ceiling")
    n_boot: int = 1000
    samples_to_predict: int = 3
    threads: int = 0  # torch threads (0: torch's default)
    workers: int = 2  # image-decoding / rendering processes

    def __post_init__(self) -> None:
        # checked here, before the first stage runs, not by the stage that would fail an hour later
        at_least = {"dataset_size": 1, "n_test": 1, "k": 1, "epochs": 1, "batch_size": 1, "align_epochs": 1,
                    "n_boot": 1, "reward_images": 0, "samples_to_predict": 0, "threads": 0, "workers": 0}  # fmt: skip
        for name, low in at_least.items():
            value = getattr(self, name)
            if value is not None and value < low:
                raise GeoTokenError(f"demo option {name} {value} must be >= {low}")


# Named sizes: `demo` is the README's first command (about 15 minutes on 2 cores: 10K gallery views,
# the `tiny` model, k = 5); `fast` is the smoke version the test suite runs (about 1 minute); `full` uses a
# 100K-view gallery, the `small` model and the paper's k = 15 (hours on a CPU, minutes on a GPU).
PRESETS: dict[str, dict[str, Any]] = {
    "demo": {},
    "fast": dict(
        dataset="tiny",
        dataset_size=300,
        n_test=30,
        align_epochs=2,
        epochs=2,
        batch_size=64,
        n_boot=50,
        reward_images=100,
        samples_to_predict=2,
        workers=0,
    ),
    "full": dict(
        dataset="full",
        dataset_size=None,
        n_test=None,
        model_preset="small",
        k=15,
        epochs=20,
        batch_size=256,
        align_epochs=20,
    ),
}


def demo_config(preset: str = "demo", **overrides: Any) -> DemoConfig:
    if preset not in PRESETS:
        raise GeoTokenError(f"unknown demo preset {preset!r}; choose one of {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(DemoConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise GeoTokenError(f"unknown demo option(s) {unknown}")
    return DemoConfig(**{**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}})


def demo_earthviews(cfg: DemoConfig) -> EarthViewsConfig:
    """The EarthViews build of the demo: the dataset preset, resized by the demo's options."""
    changes: dict[str, Any] = {"seed": cfg.seed, "train_views": cfg.train_views}
    if cfg.dataset_size is not None:
        changes["size"] = cfg.dataset_size
    if cfg.n_test is not None:
        changes.update(
            n_val=cfg.n_test, n_test=cfg.n_test, n_test_disjoint=cfg.n_test, n_test_shift=cfg.n_test
        )
    if cfg.image_size is not None:
        changes["image_size"] = cfg.image_size
    return dataclasses.replace(EV_PRESETS[cfg.dataset], **changes)


def demo_pipeline(cfg: DemoConfig) -> Pipeline:
    """The demo's stage graph: (name, kind, config, inputs) per stage; inputs left out read the stages of
    the same names."""
    ev = demo_earthviews(cfg)
    queries = "train" if cfg.train_views else "gallery"  # the model's (and reward scorer's) training queries
    splits = tuple(s for s in TEST_SPLITS if ev.sizes()[s])  # the test splits the build has
    lr = cfg.lr if cfg.lr is not None or cfg.recipe else 1e-3  # None with a recipe: the recipe's
    dtype = cfg.dtype if cfg.dtype is not None or cfg.recipe else "fp32"
    return Pipeline((
        StageSpec("data", "data", DataStageConfig(ev, workers=max(1, cfg.workers))),
        StageSpec("features", "features", FeaturesStageConfig(
            cfg.backbone, image_size=cfg.backbone_image_size or ev.image_size, workers=cfg.workers)),
        StageSpec("align", "align", AlignStageConfig(epochs=cfg.align_epochs, seed=cfg.seed)),
        StageSpec("index", "index", IndexStageConfig(embedding=cfg.index_embedding, k=cfg.k)),
        StageSpec("model", "model", ModelStageConfig(
            preset=cfg.model_preset, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=lr, dtype=dtype,
            seed=cfg.seed, queries=queries, arch=cfg.arch, recipe=cfg.recipe,
            label_smoothing=cfg.label_smoothing,
            drop_near_km=cfg.drop_near_km, drop_near_share=cfg.drop_near_share)),
        StageSpec("bundle", "bundle", BundleStageConfig(
            reward_images=cfg.reward_images, reward_queries=queries, seed=cfg.seed)),
        StageSpec("eval", "evaluate", EvalStageConfig(
            splits=splits, baselines=cfg.baselines, strategies=cfg.strategies, selectors=cfg.selectors,
            constrain=cfg.constrain, free_strategies=cfg.free_strategies, n_boot=cfg.n_boot, seed=cfg.seed)),
    ))  # fmt: skip


def run_demo(
    cfg: DemoConfig,
    run_dir: str | Path,
    report: bool = True,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> dict:
    """Run every stage (reusing finished ones) and return a summary with the evaluation tables' paths."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run = Run(run_dir, log, progress)
    t_start = time.perf_counter()
    pipeline = demo_pipeline(cfg)
    stages = run_pipeline(pipeline, run)
    data_dir, bundle = stages["data"].folder, stages["bundle"]

    # a few photos through `predict`
    test = read_manifest(data_dir / "test_disjoint.csv")
    rows = np.linspace(0, len(test) - 1, num=min(cfg.samples_to_predict, len(test))).astype(int)
    samples = _predict_samples(Geolocator.from_bundle(bundle.folder), test, rows)

    summary = {
        **run_summary(pipeline, run, stages, time.perf_counter() - t_start),
        "config": dataclasses.asdict(cfg),
        "align_metrics": stages["align"].info.get("metrics"),
        "bundle_info": bundle.info,
        "samples": samples,
    }
    write_run_summary(run.root, summary, run.log)
    if report:
        summary["report"] = str(write_report(run.root))
        write_json(run.root / "run.json", summary)
    return summary


def _predict_samples(geolocator, manifest, rows) -> list[dict]:
    """Geolocate a few held-out views from their image files, exactly as `geotoken predict` does."""
    images = [open_image(manifest.images[r]) for r in rows]
    preds = geolocator.predict(images, top_k=3)
    out = []
    for r, pred in zip(rows, preds, strict=True):
        best = pred.candidates[0]
        err = float(haversine_km(manifest.lat[r], manifest.lon[r], best.lat, best.lon))
        out.append(
            {"id": str(manifest.ids[r]), "image": str(manifest.images[r]), "true": [float(manifest.lat[r]),
             float(manifest.lon[r])], "error_km": round(err, 1), **pred.to_dict()}
        )  # fmt: skip
    return out


def print_summary(summary: dict) -> None:
    """The evaluation tables of every test split, the sample predictions and where everything is."""
    console = Console() if Console().is_terminal else Console(width=150)
    for split, folder in summary["eval"].items():
        metrics = read_json(Path(folder) / "metrics.json")
        console.rule(
            f"EarthViews {split}: {metrics['queries']['rows']} images, gallery {metrics['gallery']['rows']}"
        )
        results = {label: MethodMetrics.from_dict(m) for label, m in metrics["methods"].items()}
        print_tables(results, console=console)
    console.rule("sample predictions (held-out views, spatially disjoint split)")
    for s in summary.get("samples", []):
        best = s["candidates"][0]
        place = best.get("place") or {}
        where = ", ".join(dict.fromkeys(p for p in (place.get("city"), place.get("country")) if p))
        console.print(
            f"{s['id']}: true {s['true'][0]:.2f}, {s['true'][1]:.2f} -> predicted {best['lat']:.2f}, {best['lon']:.2f}"
            f" (p={best.get('probability', float('nan')):.2f}, {where}) error {s['error_km']:.0f} km"
        )
    console.print(
        f"run folder: {summary['run_dir']} ({summary['total_s']:.0f} s this time); bundle: {summary['bundle']}"
    )
    if summary.get("report"):
        console.print(f"report: {summary['report']}")


def load_summary(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "run.json"
    if not path.exists():
        raise GeoTokenError(f"{run_dir}: no run.json; run `geotoken demo --run-dir {run_dir}` first")
    return json.loads(path.read_text())

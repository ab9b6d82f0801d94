"""The whole method, end to end, on the built-in offline dataset: what `geotoken demo` runs.

Stages, each in its own folder of the run directory, named after the content hash of its configuration and
of the stages it reads, so that a second run reuses every finished stage and a changed option redoes only
what depends on it:

    data      EarthViews views of the Earth at real MP16 photo coordinates (WebDataset shards + manifests):
              clean gallery views, photo-like training queries of the gallery's places, val and test splits
    features  frozen-backbone features of every split (float16 feature stores)
    align     contrastive heads -> visual / GPS-aligned / text-aligned embeddings, written into the stores
    index     FAISS index over the gallery; neighbour tables of every split (training queries never see a
              gallery view of their own place, as test photos never do)
    model     the GeoToken encoder-decoder, trained on the train queries against the gallery, validated on val
    bundle    everything `geotoken predict` / `geotoken serve` need, in one folder
    eval      baselines and the model (greedy, beam, sampling + selectors) on both test splits
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

from geotoken.errors import GeoTokenError
from geotoken.io import read_json, sha256_json, write_json

TEST_SPLITS = ("test", "test_disjoint")
ALL_SPLITS = ("gallery", "train", "val", *TEST_SPLITS)


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
    epochs: int = 6
    batch_size: int = 128
    lr: float = 1e-3
    # training precision; "bf16": autocast (fast on GPUs and on CPUs with AVX-512 BF16 / AMX)
    dtype: str = "fp32"
    strategies: tuple[str, ...] = ("greedy", "beam", "sample", "sample+retrieval")
    selectors: tuple[str, ...] = ("logp", "consensus", "reward")
    reward_images: int = 2000  # training images of the reward scorer (0: no scorer)
    baselines: tuple[str, ...] = ("prior", "nn", "knn", "cells", "gps-gallery")
    n_boot: int = 1000
    samples_to_predict: int = 3
    threads: int = 0  # torch threads (0: torch's default)
    workers: int = 2  # image-decoding / rendering processes

    def stage(self, *names: str) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {n: d[n] for n in names}


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


class Run:
    """A run folder: stage folders named by content hash, a log of timings, reuse of finished stages."""

    def __init__(self, root: str | Path, log: Callable[[str], None] = print):
        self.root = Path(root).resolve()  # run.json records absolute paths; the report re-roots a moved run
        self.root.mkdir(parents=True, exist_ok=True)
        self.log = log
        self.timings: dict[str, float] = {}
        self.stages: dict[str, dict] = {}

    def stage(self, name: str, identity: dict, build: Callable[[Path], dict | None]) -> tuple[Path, dict]:
        """Run `build(folder)` unless the stage with this identity is finished; return (folder, its record)."""
        digest = sha256_json(identity)[:12]
        folder = self.root / f"{name}-{digest}"
        marker = folder / "stage.json"
        t0 = time.perf_counter()
        if marker.exists():
            record = read_json(marker)
            self.log(f"[{name}] reused {folder.name}")
        else:
            self.log(f"[{name}] running -> {folder.name}")
            folder.mkdir(parents=True, exist_ok=True)
            info = build(folder) or {}
            seconds = round(time.perf_counter() - t0, 2)
            record = {"stage": name, "hash": digest, "identity": identity, "seconds": seconds, "info": info}
            write_json(marker, record)
        self.timings[name] = round(time.perf_counter() - t0, 2)
        self.stages[name] = {"folder": folder.name, "hash": digest, "built_seconds": record["seconds"]}
        return folder, record


def _torch_threads(n: int) -> None:
    import torch

    if n:
        torch.set_num_threads(n)


def run_demo(
    cfg: DemoConfig, run_dir: str | Path, report: bool = True, log: Callable[[str], None] = print
) -> dict:
    """Run every stage (reusing finished ones) and return a summary with the evaluation tables' paths."""
    import numpy as np

    from geotoken.data.earthviews import PRESETS as EV_PRESETS
    from geotoken.data.earthviews import build_earthviews
    from geotoken.data.manifest import read_manifest

    _torch_threads(cfg.threads)
    run = Run(run_dir, log)
    t_start = time.perf_counter()

    # ------------------------------------------------------------------ data
    ev = EV_PRESETS[cfg.dataset]
    changes = {"seed": cfg.seed, "train_views": cfg.train_views}
    if cfg.dataset_size is not None:
        changes["size"] = cfg.dataset_size
    if cfg.n_test is not None:
        changes.update(n_val=cfg.n_test, n_test=cfg.n_test, n_test_disjoint=cfg.n_test)
    if cfg.image_size is not None:
        changes["image_size"] = cfg.image_size
    ev = dataclasses.replace(ev, **changes)
    data_id = {"earthviews": ev.to_dict()}

    def build_data(folder: Path) -> dict:
        info = build_earthviews(folder, ev, workers=max(1, cfg.workers))
        return {"sizes": ev.sizes(), "content_sha256": info.get("content_sha256")}

    data_dir, _ = run.stage("data", data_id, build_data)
    splits = [s for s in ALL_SPLITS if s != "train" or cfg.train_views]
    manifests = {s: read_manifest(data_dir / f"{s}.csv") for s in splits}
    train_split = "train" if cfg.train_views else "gallery"  # the model's training queries

    # ------------------------------------------------------------------ features
    from geotoken.encoders import load_backbone
    from geotoken.features import FeatureStore, embed

    backbone_opts = {"image_size": cfg.backbone_image_size or ev.image_size}
    feat_id = {"data": data_id, "backbone": cfg.backbone, **backbone_opts}

    def build_features(folder: Path) -> dict:
        backbone = load_backbone(cfg.backbone, **backbone_opts).eval()
        for split in splits:
            log(f"  embedding {split} ({len(manifests[split])} images)")
            embed(manifests[split], backbone, folder / split, batch_size=64, num_workers=cfg.workers)
        return {"backbone": backbone.config()}

    feat_dir, feat_rec = run.stage("features", feat_id, build_features)

    # ------------------------------------------------------------------ align
    from geotoken.align import AlignConfig, AlignHeads, apply_heads, train_heads

    align_id = {"features": feat_id, "epochs": cfg.align_epochs, "seed": cfg.seed}

    def build_align(folder: Path) -> dict:
        cfg_a = AlignConfig(epochs=cfg.align_epochs, seed=cfg.seed)
        gallery = FeatureStore.open(feat_dir / "gallery")
        # the held-out image->GPS metric scores against the gallery's own coordinates (not MP16's 100K)
        _, metrics = train_heads(gallery, folder / "heads", cfg_a, gallery_coords=np.asarray(gallery.coords))
        return {"metrics": metrics}

    align_dir, align_rec = run.stage("align", align_id, build_align)
    heads = AlignHeads.load(align_dir / "heads")
    stores = {}
    for split in splits:  # the aligned arrays live in the feature stores; redo them if the heads changed
        stamp = feat_dir / split / "aligned_by.json"
        if not (stamp.exists() and read_json(stamp).get("align") == align_rec["hash"]):
            apply_heads(heads, FeatureStore.open(feat_dir / split))
            write_json(stamp, {"align": align_rec["hash"]})
        stores[split] = FeatureStore.open(feat_dir / split)

    # ------------------------------------------------------------------ index + neighbour tables
    from geotoken.retrieval import NeighbourIndex, StoreEmbeddings, neighbour_table

    index_id = {"align": align_id, "embedding": cfg.index_embedding, "k": cfg.k}

    def build_index(folder: Path) -> dict:
        gallery = stores["gallery"]
        emb = StoreEmbeddings(gallery, cfg.index_embedding)
        index = NeighbourIndex.build(
            emb,
            kind="flat",
            valid=gallery.valid,
            meta={"store": str(gallery.root), "embedding": cfg.index_embedding},
        )
        index.save(folder / "index")
        for split in splits:  # training queries: without their own id, exact duplicates, (train) own place
            neighbour_table(
                stores[split], index, cfg.k, folder / split,
                exclude_self_ids=(split in ("gallery", "train")), exclude_same_place=(split == "train"),
                gallery_store=gallery, embedding=cfg.index_embedding,
            )  # fmt: skip
        return {}

    index_dir, _ = run.stage("index", index_id, build_index)

    # ------------------------------------------------------------------ model
    from geotoken.model import preset
    from geotoken.train import TrainConfig, TrainData, train

    modalities = ["visual", "gps", "text"]
    model_id = {"index": index_id, **cfg.stage("model_preset", "epochs", "batch_size", "lr", "dtype", "seed")}

    def build_model(folder: Path) -> dict:
        # training queries: photo-like views of the gallery's places, against the gallery without that place
        data = TrainData.load(
            feat_dir / train_split, index_dir / train_split, feat_dir / "gallery", modalities
        )
        val = TrainData.load(feat_dir / "val", index_dir / "val", feat_dir / "gallery", modalities)
        dims = {m: data.query[m].shape[1] for m in modalities}
        model_cfg = preset(cfg.model_preset, modalities=dims, k=cfg.k)
        steps = max(1, cfg.epochs * int(np.ceil(data.rows / cfg.batch_size)))
        tcfg = TrainConfig(
            lr=cfg.lr, batch_size=cfg.batch_size, epochs=cfg.epochs, seed=cfg.seed, dtype=cfg.dtype,
            warmup_steps=min(100, steps // 10), checkpoint_every=max(50, steps // 4), tensorboard=False,
        )  # fmt: skip
        sources = {
            "queries": train_split,
            "gallery": "gallery",
            "neighbours": f"{index_dir.name}/{train_split}",
        }
        train(
            model_cfg, tcfg, data, folder, np.arange(data.rows), val, np.arange(val.rows), resume=True,
            sources=sources,
        )  # fmt: skip
        return {
            "model": model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dataclasses.asdict(model_cfg)
        }

    model_dir, _ = run.stage("model", model_id, build_model)

    # ------------------------------------------------------------------ bundle
    from geotoken.bundle import save_bundle
    from geotoken.model import GeoToken
    from geotoken.predict import Geolocator

    bundle_id = {"model": model_id, "reward_images": cfg.reward_images}

    def build_bundle(folder: Path) -> dict:
        from geotoken.fit import calibrate_bundle, train_bundle_reward
        from geotoken.search.reward import RewardConfig

        model = GeoToken.load(model_dir / "best")
        save_bundle(
            folder, model=model, backbone_config=feat_rec["info"]["backbone"], heads=heads,
            gallery_store=stores["gallery"], index=NeighbourIndex.load(index_dir / "index"),
            query_modalities=cfg.index_embedding.split("+"),
        )  # fmt: skip
        info = {}
        if cfg.reward_images:  # the learned candidate scorer (select=reward), trained on training queries
            reward_cfg = RewardConfig(max_images=cfg.reward_images, seed=cfg.seed)
            geo = Geolocator.from_bundle(folder)
            info["reward"] = train_bundle_reward(
                geo, feat_dir / train_split, index_dir / train_split, reward_cfg
            )
        # calibrated confidences, fitted on the validation split (held-out figures come from the evaluation)
        info["calibration"] = calibrate_bundle(
            Geolocator.from_bundle(folder), feat_dir / "val", index_dir / "val"
        )
        return info

    bundle_dir, bundle_rec = run.stage("bundle", bundle_id, build_bundle)

    # ------------------------------------------------------------------ evaluation
    from geotoken.evaluate.evaluate import EvalConfig, GeoTokenMethodConfig, evaluate, load_split

    eval_id = {"bundle": bundle_id, **cfg.stage("strategies", "selectors", "baselines", "n_boot", "seed")}

    def build_eval(folder: Path) -> dict:
        geolocator = Geolocator.from_bundle(bundle_dir)
        ecfg = EvalConfig(
            methods=(*cfg.baselines, "geotoken"),
            n_boot=cfg.n_boot,
            seed=cfg.seed,
            reference="knn" if "knn" in cfg.baselines else None,
            geotoken=GeoTokenMethodConfig(
                model=str(bundle_dir), strategies=cfg.strategies, selectors=cfg.selectors
            ),
        )
        gallery = load_split(feat_dir / "gallery", data_dir / "gallery.csv", name="gallery")
        out = {}
        for split in TEST_SPLITS:
            queries = load_split(feat_dir / split, data_dir / f"{split}.csv", name=split)
            nb = index_dir / split
            neighbours = (np.load(nb / "index.npy", mmap_mode="r"), np.load(nb / "sims.npy", mmap_mode="r"))
            log(f"  evaluating on {split} ({len(queries)} images)")
            evaluate(
                gallery, queries, folder / split, ecfg, neighbours=neighbours, geolocator=geolocator, log=log
            )
            out[split] = str((folder / split).relative_to(run.root))
        return out

    eval_dir, _ = run.stage("eval", eval_id, build_eval)

    # ------------------------------------------------------------------ a few photos through `predict`
    geolocator = Geolocator.from_bundle(bundle_dir)
    test = manifests["test_disjoint"]
    rows = np.linspace(0, len(test) - 1, num=min(cfg.samples_to_predict, len(test))).astype(int)
    samples = _predict_samples(geolocator, test, rows)

    # ------------------------------------------------------------------ summary
    summary = {
        "run_dir": str(run.root),
        "config": dataclasses.asdict(cfg),
        "stages": run.stages,
        "timings_s": run.timings,
        "total_s": round(time.perf_counter() - t_start, 2),
        "bundle": str(bundle_dir),
        "eval": {s: str(eval_dir / s) for s in TEST_SPLITS},
        "align_metrics": align_rec["info"].get("metrics"),
        "bundle_info": bundle_rec["info"],
        "samples": samples,
    }
    write_json(run.root / "run.json", summary)
    if report:
        from geotoken.report import write_report

        summary["report"] = str(write_report(run.root))
        write_json(run.root / "run.json", summary)
    return summary


def _predict_samples(geolocator, manifest, rows) -> list[dict]:
    """Geolocate a few held-out views from their image files, exactly as `geotoken predict` does."""
    from geotoken.data.images import open_image
    from geotoken.geo import haversine_km

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
    """The evaluation tables of both test splits, the sample predictions and where everything is."""
    from rich.console import Console

    from geotoken.evaluate.metrics import MethodMetrics, print_tables

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

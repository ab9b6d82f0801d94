"""The method's stages as library functions, one per stage, each writing only its own folder `out`.

    kind      reads                            writes into `out`
    data      -                                EarthViews shards + SPLIT.csv manifests + dataset.json
    features  data                             SPLIT/: feature store of raw backbone features, every split
    align     data, features                   heads/ (trained on the gallery) and SPLIT/: aligned stores
                                               (ids, coords, skipped rows, visual/gps/text), every split
    index     align                            index/ (FAISS over the gallery) and SPLIT/: neighbour tables
    model     align, index                     the trained GeoToken model (best/, last/, run.json, log)
    bundle    model, align, index              a `geotoken predict` bundle + reward scorer + calibration
    evaluate  data, features, align, index,    SPLIT/: `geotoken evaluate` outputs (metrics.md, ...) on
              bundle                           each test split

Earlier stages' folders are only read: the aligned arrays live in the align stage's own stores, not in the
feature stores they were computed from. Split names are EarthViews' (`GALLERY` is searched; `TRAIN`
queries are photo-like views of gallery places, so their neighbour tables drop their own place).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from geotoken import DTYPES
from geotoken.align import GPS_HEADS, AlignConfig, AlignHeads, apply_heads, train_heads
from geotoken.bundle import assemble_bundle
from geotoken.data.datasets import read_texts
from geotoken.data.earthviews import SPLITS, EarthViewsConfig, build_earthviews
from geotoken.data.manifest import read_manifest
from geotoken.encoders import BACKBONES, check_backbone_options, load_backbone
from geotoken.encoders.efficientnet import IMAGE_SIZES
from geotoken.encoders.text import TEXT_ENCODERS
from geotoken.errors import GeoTokenError
from geotoken.evaluate import BASELINES, METHODS, EvalConfig, Split, evaluate, load_neighbours, load_split
from geotoken.evaluate.evaluate import GeoTokenMethodConfig
from geotoken.evaluate.metrics import INTERVALS
from geotoken.features import FeatureStore, embed
from geotoken.fit import calibrate_bundle, train_bundle_reward
from geotoken.io import is_whole, read_json
from geotoken.model import ARCHS, PRESETS, preset
from geotoken.predict import Geolocator
from geotoken.retrieval import (
    KINDS,
    REFINE,
    NeighbourIndex,
    NeighbourTable,
    build_store_index,
    neighbour_table,
)
from geotoken.search import SELECTORS, STRATEGIES
from geotoken.search.reward import RewardConfig
from geotoken.stages.runner import added_field, runtime_field, stage_kind
from geotoken.train import TrainData, grad_accum_for, train
from geotoken.train.data import steps_per_epoch
from geotoken.train.recipes import load_recipe, resolve_train_config

GALLERY, TRAIN = "gallery", "train"
DROP_NEAR_DEPTH = 64  # neighbours searched per training query when the near ones are dropped
TEST_SPLITS = ("test", "test_disjoint", "test_shift")  # random, spatially disjoint, distribution shift
Log = Callable[[str], None]


def check_fields(config, choices: dict | None = None, least: dict | None = None) -> None:
    """A stage config's own check, run when it is built (so `geotoken run --dry-run` refuses what the stage
    would refuse hours later): each of `choices` {field: allowed} (a tuple field: each item) and of `least`
    {field: lowest whole number}; a field left None (the library's default) passes."""
    for name, allowed in (choices or {}).items():
        value = getattr(config, name)
        items = value if isinstance(value, tuple) else () if value is None else (value,)
        bad = [v for v in items if v not in allowed]
        if bad:
            shown = bad if isinstance(value, tuple) else repr(value)
            raise GeoTokenError(f"{name} {shown}: choose from {', '.join(map(str, allowed))}")
    for name, low in (least or {}).items():
        value = getattr(config, name)
        if value is not None and not is_whole(value, low):
            raise GeoTokenError(f"{name} must be a whole number >= {low}, got {value!r}")


def dataset_splits(data: Path) -> list[str]:
    """The non-empty splits of a data stage folder (dataset.json), in EarthViews' order."""
    sizes = read_json(data / "dataset.json")["sizes"]
    return [s for s in sizes if sizes[s] > 0]


def store_splits(folder: Path) -> list[str]:
    """The splits of a features or align stage folder: its sub-folders that are feature stores."""
    names = [p.name for p in folder.iterdir() if (p / "store.json").is_file()]
    return sorted(names, key=lambda n: (SPLITS.index(n) if n in SPLITS else len(SPLITS), n))


# ---------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class DataStageConfig:
    earthviews: EarthViewsConfig = field(default_factory=EarthViewsConfig)  # decides the dataset's bytes
    workers: int = runtime_field(1)  # rendering processes


@stage_kind("data", DataStageConfig)
def build_data(config: DataStageConfig, out: Path, *, log: Log = print, progress: bool = True) -> dict:
    """Render EarthViews into `out` (resumable shard by shard)."""
    info = build_earthviews(out, config.earthviews, workers=max(1, config.workers))
    return {"sizes": config.earthviews.sizes(), "content_hash": info.get("content_hash")}


# ---------------------------------------------------------------------------------------------- features
@dataclass(frozen=True)
class FeaturesStageConfig:
    backbone: str = "efficientnet-lite0"
    image_size: int | None = None  # backbone input pixels (None: the backbone's default)
    batch_size: int = 64  # images per forward pass (recorded in each store, which resumes on it)
    workers: int = runtime_field(2)  # image-decoding processes
    clip: str | None = None  # the clip backbone's weights: a hub id or a local folder (None: the default)
    skip_bad: bool = False  # unreadable images: recorded and skipped (their rows NaN) instead of an error

    def __post_init__(self) -> None:
        check_fields(
            self,
            {"backbone": tuple(BACKBONES)},
            {"image_size": IMAGE_SIZES[0], "batch_size": 1, "workers": 0},
        )
        check_backbone_options(self.backbone, self.clip, self.image_size)


@stage_kind("features", FeaturesStageConfig)
def embed_features(
    config: FeaturesStageConfig, out: Path, *, data: Path, log: Log = print, progress: bool = True
) -> dict:
    """Embed every split of the dataset with the frozen backbone: `out/SPLIT/` feature stores."""
    options = {} if config.image_size is None else {"image_size": config.image_size}
    if config.clip is not None:
        options["clip"] = config.clip
    backbone = load_backbone(config.backbone, **options).eval()
    for split in dataset_splits(data):
        manifest = read_manifest(data / f"{split}.csv")
        log(f"  embedding {split} ({len(manifest)} images)")
        embed(
            manifest, backbone, out / split, batch_size=config.batch_size, num_workers=config.workers,
            skip_bad=config.skip_bad, progress=progress,
        )  # fmt: skip
    return {"backbone": backbone.config()}


# ---------------------------------------------------------------------------------------------- align
@dataclass(frozen=True)
class AlignStageConfig:
    epochs: int = 20
    seed: int = 0
    # text-aligned targets: "auto" (the data stage's place texts of the gallery when it wrote them, e.g.
    # MP16-Pro's city / state / country, else offline place names), "dataset" (those texts, required),
    # "places" (offline place names of the coordinates)
    texts: str = "auto"
    text_encoder: str | None = None  # None: clip for a clip backbone, else minilm (align train's default)
    gps_head: str = "train"  # geotoken.align.GPS_HEADS

    def __post_init__(self) -> None:
        choices = {"texts": TEXT_SOURCES, "text_encoder": tuple(TEXT_ENCODERS), "gps_head": GPS_HEADS}
        check_fields(self, choices, {"epochs": 1})


TEXT_SOURCES = ("auto", "dataset", "places")


def texts_path(data: Path, split: str) -> Path:
    """Where a data stage keeps the place texts of a split (`id,text`; absent when its layout has none)."""
    return data / f"{split}.texts.csv"


def gallery_texts(config: AlignStageConfig, data: Path, store: FeatureStore) -> list[str] | None:
    """The gallery's text targets by `config.texts`, in store order (None: offline place names)."""
    if config.texts not in TEXT_SOURCES:
        raise GeoTokenError(f"align: texts must be one of {TEXT_SOURCES}, got {config.texts!r}")
    path = texts_path(data, GALLERY)
    if config.texts == "places" or (config.texts == "auto" and not path.is_file()):
        return None
    if not path.is_file():
        raise GeoTokenError(f"{path}: texts 'dataset', but the data stage wrote no texts for the gallery")
    return read_texts(path, store.ids)


@stage_kind("align", AlignStageConfig)
def align_features(
    config: AlignStageConfig,
    out: Path,
    *,
    data: Path,
    features: Path,
    log: Log = print,
    progress: bool = True,
) -> dict:
    """Train the heads on the gallery's features, then write an aligned store `out/SPLIT/` for every split."""
    gallery = FeatureStore.open(features / GALLERY)
    cfg = AlignConfig(epochs=config.epochs, seed=config.seed)
    heads_config: dict = {"gps_head": config.gps_head}
    if config.text_encoder is not None:
        heads_config["text_encoder"] = config.text_encoder
    texts = gallery_texts(config, data, gallery)
    log("  text targets: " + ("the data stage's place texts" if texts else "offline place names"))
    # the held-out image->GPS metric scores against the gallery's own coordinates (not MP16's 100K)
    _, metrics = train_heads(
        gallery,
        out / "heads",
        cfg,
        heads_config,
        gallery_coords=np.asarray(gallery.coords),
        texts=texts,
        progress=progress,
        overwrite=True,  # (its own folder: heads left by a run killed before the stage was marked done)
    )
    heads = AlignHeads.load(out / "heads")
    for split in store_splits(features):
        store = FeatureStore.open(features / split)
        apply_heads(heads, store, out=out / split, info={"heads": "../heads"}, progress=progress)
    return {"metrics": metrics}


# ---------------------------------------------------------------------------------------------- index
@dataclass(frozen=True)
class IndexStageConfig:
    embedding: str = "visual+gps"  # what retrieval searches (a store array or a '+' concatenation)
    k: int = 15  # neighbours per query
    kind: str = "flat"  # FAISS index kind (geotoken.retrieval.KINDS)
    refine: int = added_field(REFINE)  # ivfpq / hnsw: tables re-rank refine x k candidates by exact vectors

    def __post_init__(self) -> None:
        check_fields(self, {"kind": KINDS}, {"k": 1, "refine": 1})
        parts = self.embedding.split("+")
        if not all(parts) or not set(parts) <= {"visual", "gps", "text"}:
            raise GeoTokenError(
                f"embedding {self.embedding!r}: aligned arrays visual, gps, text joined by '+'"
            )


@stage_kind("index", IndexStageConfig)
def index_gallery(
    config: IndexStageConfig, out: Path, *, align: Path, log: Log = print, progress: bool = True
) -> dict:
    """A FAISS index over the aligned gallery (`out/index/`) and the neighbour table of every split."""
    stores = {split: FeatureStore.open(align / split) for split in store_splits(align)}
    gallery = stores[GALLERY]
    index = build_store_index(gallery, config.embedding, config.kind, recall_k=config.k, progress=progress)
    index.save(out / "index")
    for split, store in stores.items():
        neighbour_table(
            store, index, config.k, out / split, **excluded(split), gallery_store=gallery,
            embedding=config.embedding, refine=config.refine, progress=progress,
        )  # fmt: skip
    return {key: value for key, value in index.meta.items() if key.startswith("recall")}


def excluded(split: str) -> dict[str, bool]:
    """What a split's neighbour table leaves out of the gallery: training queries their own id and exact
    duplicates (the gallery's rows are the MP16 photos themselves), and photo-like train views their place."""
    return {"exclude_self_ids": split in (GALLERY, TRAIN), "exclude_same_place": split == TRAIN}


# ---------------------------------------------------------------------------------------------- model
@dataclass(frozen=True)
class ModelStageConfig:
    """The model stage's options. Training options: TrainConfig's defaults, then `recipe` (a name of
    `geotoken.train.recipes.RECIPES` or a YAML path; "" none), then the fields below that are set (None:
    not set). `epochs` always applies (the run's size decides how long to train), and `batch_size` is the
    micro-batch: a recipe's `effective_batch_size` is reached by gradient accumulation, at most one step
    over all training rows per epoch (`geotoken.train.grad_accum_for`)."""

    preset: str = "small"  # geotoken.model preset
    epochs: int = 10
    batch_size: int = 256
    lr: float | None = None  # None: the recipe's, else TrainConfig's (3e-4)
    dtype: str | None = None  # training precision, "bf16": autocast; None: the recipe's, else "fp32"
    seed: int = 0
    modalities: tuple[str, ...] = ("visual", "gps", "text")
    queries: str = TRAIN  # the training queries' split (GALLERY: train on gallery views, as on MP16)
    val: str = "val"  # the validation split
    k: int | None = None  # neighbours the model reads (None: the index's k)
    warmup_steps: int | None = None  # None: min(100, steps // 10)
    checkpoint_every: int | None = None  # None: a quarter of the run, at least once an epoch (>= 50 steps)
    label_smoothing: float = added_field(0.0)  # over each token's siblings (its position's vocabulary)
    drop_near_km: float = added_field(
        0.0
    )  # > 0: a share of training queries lose neighbours within this many km
    drop_near_share: float = added_field(0.5)
    arch: str = added_field("ours")  # geotoken.model.ARCHS: "authors" = the paper's nn.Transformer layers
    val_constrain: bool = added_field(False)  # validate with the +gallery (constrained) greedy decoder
    recipe: str = added_field("")  # training recipe ("" none; "paper": the authors' optimizer and batch)

    def __post_init__(self) -> None:
        choices = {
            "preset": tuple(PRESETS),
            "arch": ARCHS,
            "dtype": DTYPES,
            "modalities": ("visual", "gps", "text"),
        }
        check_fields(
            self, choices, {"epochs": 1, "batch_size": 1, "k": 0, "checkpoint_every": 1, "warmup_steps": 0}
        )
        if self.recipe:
            load_recipe(self.recipe)  # a name or a YAML file, its fields checked

    def content_identity(self) -> dict:
        """The recipe's fields, not only its name: training redoes when the file changes."""
        return {"recipe_fields": sorted(load_recipe(self.recipe).items())} if self.recipe else {}


@stage_kind("model", ModelStageConfig)
def train_model(
    config: ModelStageConfig, out: Path, *, align: Path, index: Path, log: Log = print, progress: bool = True
) -> dict:
    """Train GeoToken on the training queries against the gallery, validated on the validation split."""
    modalities = list(config.modalities)
    q = config.queries
    table = index / q
    k = np.load(table / "index.npy", mmap_mode="r").shape[1] if config.k is None else config.k  # the index's
    if config.drop_near_km > 0:  # a deeper table, so that k neighbours are left after the near ones go
        refine = NeighbourTable.open(table).meta["config"].get("refine", 1)  # as the index stage's tables
        table = out / "neighbours"
        neighbour_table(
            FeatureStore.open(align / q), NeighbourIndex.load(index / "index"), DROP_NEAR_DEPTH, table,
            **excluded(q), gallery_store=FeatureStore.open(align / GALLERY), progress=False, refine=refine,
        )  # fmt: skip
    data = TrainData.load(align / q, table, align / GALLERY, modalities)
    val = TrainData.load(align / config.val, index / config.val, align / GALLERY, modalities)
    dims = {m: data.query[m].shape[1] for m in modalities}
    model_cfg = preset(config.preset, modalities=dims, k=k, arch=config.arch)
    tcfg = dataclasses.replace(model_train_config(config, data.rows), progress=progress)
    sources = {"queries": q, "gallery": GALLERY, "neighbours": str(table.relative_to(table.parents[1]))}
    train(
        model_cfg, tcfg, data, out, np.arange(data.rows), val, np.arange(val.rows), resume=True,
        sources=sources,
    )  # fmt: skip
    return {"model": model_cfg.to_dict()}


def model_train_config(config: ModelStageConfig, rows: int):
    """The stage's `TrainConfig` for `rows` training queries: defaults < recipe < the stage's fields;
    warm-up (the loop's default, min(100, steps // 10)) and the checkpoint interval scale with the run when
    neither the stage nor the recipe sets them, counted as the loop counts its steps (one process)."""
    given = dict(lr=config.lr, dtype=config.dtype, batch_size=config.batch_size, epochs=config.epochs)
    given.update(label_smoothing=config.label_smoothing, drop_near_km=config.drop_near_km)
    given.update(drop_near_share=config.drop_near_share, val_constrain=config.val_constrain)
    tcfg = resolve_train_config(config.recipe or None, **given, seed=config.seed, tensorboard=False)
    step_rows = config.batch_size * grad_accum_for(tcfg, rows)
    per_epoch = steps_per_epoch(rows, step_rows) if rows >= step_rows else 1  # (too few: the loop says so)
    steps = max(1, config.epochs * per_epoch)
    warmup = config.warmup_steps if config.warmup_steps is not None else tcfg.warmup_steps
    every = config.checkpoint_every
    if every is None:  # a quarter of the run, but at least once an epoch (a killed 50-epoch MP16 run
        every = min(max(50, steps // 4), max(50, per_epoch))  # loses < 1 epoch, not 12), >= 50 steps apart
    return dataclasses.replace(tcfg, warmup_steps=warmup, checkpoint_every=every)


# ---------------------------------------------------------------------------------------------- bundle
@dataclass(frozen=True)
class BundleStageConfig:
    reward_images: int = 2000  # training images of the reward scorer (0: no scorer)
    reward_queries: str = TRAIN  # the split the reward scorer trains on
    calibration: str = "val"  # the split the confidences are calibrated on
    seed: int = 0

    def __post_init__(self) -> None:
        check_fields(self, least={"reward_images": 0})


@stage_kind("bundle", BundleStageConfig)
def make_bundle(
    config: BundleStageConfig,
    out: Path,
    *,
    model: Path,
    align: Path,
    index: Path,
    log: Log = print,
    progress: bool = True,
) -> dict:
    """Everything `geotoken predict` needs in `out`, plus the reward scorer and the calibrated confidences."""
    assemble_bundle(
        out,
        model=model / "best",
        align=align / "heads",
        gallery=align / GALLERY,
        index=index / "index",
        overwrite=True,  # a rerun after a kill: the stage's own folder
    )
    info = {}
    if config.reward_images:  # the learned candidate scorer (select=reward), trained on training queries
        reward_cfg = RewardConfig(max_images=config.reward_images, seed=config.seed)
        q = config.reward_queries
        info["reward"] = train_bundle_reward(
            Geolocator.from_bundle(out), align / q, index / q, reward_cfg, progress=progress
        )
    # calibrated confidences, fitted on the validation split (held-out figures come from the evaluation)
    c = config.calibration
    info["calibration"] = calibrate_bundle(
        Geolocator.from_bundle(out), align / c, index / c, progress=progress
    )
    return info


# ---------------------------------------------------------------------------------------------- evaluate
@dataclass(frozen=True)
class EvalStageConfig:
    splits: tuple[str, ...] = TEST_SPLITS  # query splits, each evaluated against the gallery
    baselines: tuple[str, ...] = BASELINES
    strategies: tuple[str, ...] = ("greedy", "beam", "sample", "sample+retrieval", "greedy+sample+retrieval")
    selectors: tuple[str, ...] = ("logp", "consensus", "vote", "gate", "reward")
    # decodings (True: gallery-constrained, rows labelled +gallery; False: free, as the paper's authors)
    constrain: tuple[bool, ...] = (True,)
    free_strategies: tuple[str, ...] = ("greedy",)  # also decoded free: the authors' decoding beside ours
    n_boot: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        choices = {"baselines": tuple(m for m in METHODS if m != "geotoken"), "strategies": STRATEGIES,
                   "free_strategies": STRATEGIES, "selectors": SELECTORS}  # fmt: skip
        check_fields(self, choices, {"n_boot": 1})
        if not self.constrain or not self.splits:
            raise GeoTokenError("constrain and splits need at least one value each")

    def content_identity(self) -> dict:
        """How the intervals are computed: an evaluation scored otherwise (the percentile bootstrap of
        accuracies, before 2026-12-08) is scored again, from the cached predictions, not reused."""
        return {"intervals": INTERVALS}


def evaluation_split(data: Path, features: Path, align: Path, split: str) -> Split:
    """A split as the evaluation sees it: the raw features and the aligned arrays, true coordinates."""
    aligned = load_split(align / split, data / f"{split}.csv", name=split)
    raw = load_split(features / split, data / f"{split}.csv", name=split)
    return dataclasses.replace(aligned, arrays={**raw.arrays, **aligned.arrays})


@stage_kind("evaluate", EvalStageConfig)
def evaluate_bundle(
    config: EvalStageConfig,
    out: Path,
    *,
    data: Path,
    features: Path,
    align: Path,
    index: Path,
    bundle: Path,
    log: Log = print,
    progress: bool = True,
) -> dict:
    """Baselines and the bundle's model (every strategy x selector) on each query split: `out/SPLIT/`."""
    have = sorted(p.parent.name for p in align.glob("*/store.json") if p.parent.name != GALLERY)
    missing = [s for s in config.splits if s not in have]
    if missing:  # (before an hour of the others: a typo, or a split the data stage does not make)
        raise GeoTokenError(f"evaluate: no split {', '.join(map(repr, missing))}; the data stage made {have}")
    geolocator = Geolocator.from_bundle(bundle)
    ecfg = EvalConfig(
        methods=(*config.baselines, "geotoken"),
        n_boot=config.n_boot,
        seed=config.seed,
        reference="knn" if "knn" in config.baselines else None,
        geotoken=GeoTokenMethodConfig(
            model=str(bundle),
            strategies=config.strategies,
            selectors=config.selectors,
            constrain=config.constrain,
            free_strategies=config.free_strategies,
        ),
    )
    gallery = evaluation_split(data, features, align, GALLERY)
    # the predictions cached beside the stage folders: another n_boot or baseline list re-scores them
    cache = out.parent / "cache" / "evaluate"
    for split in config.splits:
        queries = evaluation_split(data, features, align, split)
        nb = index / split
        neighbours = load_neighbours(nb, gallery, queries)
        k = np.shape(neighbours[0])[1]  # knn votes over the index stage's k neighbours
        split_cfg = dataclasses.replace(ecfg, retrieval=dataclasses.replace(ecfg.retrieval, k=k))
        log(f"  evaluating on {split} ({len(queries)} images)")
        evaluate(
            gallery,
            queries,
            out / split,
            split_cfg,
            neighbours,
            geolocator=geolocator,
            log=log,
            cache_dir=cache,
            progress=progress,
        )
    return {"splits": list(config.splits)}

"""Which training options generalise beyond the gallery's places? Paired ablations on three test splits.

    python benchmarks/generalise.py --data DATA --features FEATURES --align ALIGN --index INDEX -o OUT
    python benchmarks/generalise.py ... --variants default drop250 smooth --epochs 2   # fewer epochs: say so

DATA, FEATURES, ALIGN, INDEX are a demo run's stage folders (`runs/demo/data-*`, ...). A test split that the
features / align / index folders lack but DATA has (`test_shift`, for a run built before it existed) is
embedded, aligned with ALIGN's heads and searched in INDEX's index into OUT/extra/, as its stages would.
Each variant is the demo's model stage (`geotoken.stages.train_model`, the demo's training options unless
the variant changes them, same seed) trained into OUT/model-NAME/, bundled without reward scorer, and
evaluated with greedy decoding (gallery-constrained and free) beside kNN and the ceiling (nearest gallery
coordinate) on every split. Printed and written to OUT/generalise.md / .json: accuracy within 25 / 200 /
750 / 2500 km, and paired differences on the same images with 95% bootstrap CIs, against the default
variant and against kNN. Finished models and evaluations are reused by a rerun.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from geotoken.align import AlignHeads, apply_heads
from geotoken.bundle import assemble_bundle
from geotoken.data.manifest import read_manifest
from geotoken.encoders import load_backbone
from geotoken.evaluate import EvalConfig, GeoTokenMethodConfig, evaluate, paired_comparison
from geotoken.features import FeatureStore, embed
from geotoken.predict import Geolocator
from geotoken.retrieval import NeighbourIndex, neighbour_table
from geotoken.stages import ModelStageConfig
from geotoken.stages.method import evaluation_split, train_model

SPLITS = ("test", "test_disjoint", "test_shift")
THRESHOLDS = (25.0, 200.0, 750.0, 2500.0)
# the demo's model stage (tiny, k 5, 6 epochs, batch 128, lr 1e-3) changed by one option at a time
DEMO_MODEL = ModelStageConfig(preset="tiny", epochs=6, batch_size=128, lr=1e-3)
VARIANTS = {
    "default": {},
    "drop250": {"drop_near_km": 250.0, "drop_near_share": 0.5},  # the disjoint condition, half the queries
    "drop250all": {"drop_near_km": 250.0, "drop_near_share": 1.0},
    "smooth": {"label_smoothing": 0.1},  # over sibling cells
}
ROWS = ("geotoken greedy+gallery", "geotoken greedy")


def extend_split(split: str, data: Path, features: Path, align: Path, index: Path, extra: Path) -> Path:
    """The folder holding `split`'s features / aligned store / neighbours: the run's, or OUT/extra/."""
    if (align / split / "store.json").is_file():
        return Path()  # the run has it
    header = FeatureStore.open(features / "gallery").header["backbone"]
    backbone = load_backbone(header["name"], image_size=header["image_size"])
    store = embed(read_manifest(data / f"{split}.csv"), backbone, extra / "features" / split, batch_size=64)
    apply_heads(
        AlignHeads.load(align / "heads"), store, out=extra / "align" / split, info={"heads": str(align)}
    )
    k = np.load(index / "test" / "index.npy", mmap_mode="r").shape[1]
    gallery = FeatureStore.open(align / "gallery")
    neighbour_table(FeatureStore.open(extra / "align" / split), NeighbourIndex.load(index / "index"), k,
                    extra / "index" / split, exclude_self_ids=False, gallery_store=gallery)  # fmt: skip
    return extra


def read_errors(path: Path) -> dict[str, np.ndarray]:
    """{method label: km errors in query order} from an evaluation's predictions.csv."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    out: dict[str, list[float]] = {}
    for r in rows:
        out.setdefault(r["method"], []).append(float(r["error_km"]))
    return {k: np.asarray(v) for k, v in out.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("data", "features", "align", "index"):
        p.add_argument(f"--{name}", required=True, type=Path, help=f"the run's {name} stage folder")
    p.add_argument("-o", "--out", required=True, type=Path)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--epochs", type=int, default=DEMO_MODEL.epochs, help="training epochs of every variant")
    p.add_argument("--splits", nargs="+", default=list(SPLITS))
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's choice)")
    p.add_argument("--models", nargs="*", default=[], metavar="NAME=DIR",
                   help="a finished model stage folder to use for a variant (e.g. the run's own model for default)")  # fmt: skip
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    where = {
        s: extend_split(s, args.data, args.features, args.align, args.index, out / "extra")
        for s in args.splits
    }
    gallery = evaluation_split(args.data, args.features, args.align, "gallery")
    queries, neighbours = {}, {}
    for s in args.splits:
        root = where[s]
        f, a, i = (
            (args.features, args.align, args.index)
            if root == Path()
            else (root / "features", root / "align", root / "index")
        )
        queries[s] = evaluation_split(args.data, f, a, s)
        neighbours[s] = (np.load(i / s / "index.npy"), np.load(i / s / "sims.npy"))

    errors: dict[str, dict[str, np.ndarray]] = {s: {} for s in args.splits}
    given = dict(m.split("=", 1) for m in args.models)
    for name in args.variants:
        cfg = dataclasses.replace(DEMO_MODEL, epochs=args.epochs, **VARIANTS[name])
        model = Path(given[name]) if name in given else out / f"model-{name}"
        if name in given:  # trained elsewhere: it must be this variant's training
            trained = json.loads((model / "run.json").read_text())["train"]
            want = {"epochs": cfg.epochs, "lr": cfg.lr, "batch_size": cfg.batch_size, "seed": cfg.seed}
            want.update(label_smoothing=cfg.label_smoothing, drop_near_km=cfg.drop_near_km)
            bad = {k: (trained.get(k, 0.0), v) for k, v in want.items() if trained.get(k, 0.0) != v}
            if bad:
                raise SystemExit(f"{model}: not the {name} variant's training: {bad}")
        elif not (model / "done.json").is_file():
            print(
                f"training {name}: {VARIANTS[name] or 'the demo defaults'}, {args.epochs} epochs", flush=True
            )
            info = train_model(cfg, model, align=args.align, index=args.index)
            (model / "done.json").write_text(json.dumps({"config": dataclasses.asdict(cfg), **info}))
        bundle = out / f"bundle-{name}"
        if not (bundle / "bundle.json").is_file():
            assemble_bundle(bundle, model=model / "best", align=args.align / "heads",
                            gallery=args.align / "gallery", index=args.index / "index")  # fmt: skip
        geo = (
            Geolocator.from_bundle(bundle)
            if not all((out / f"eval-{name}" / s / "metrics.json").is_file() for s in args.splits)
            else None
        )
        ecfg = EvalConfig(
            methods=("knn", "ceiling", "geotoken"), n_boot=args.n_boot, reference="knn", plots=False,
            geotoken=GeoTokenMethodConfig(model=str(bundle), strategies=("greedy",), selectors=("logp",),
                                          constrain=(True,), free_strategies=("greedy",)),
        )  # fmt: skip
        for s in args.splits:
            folder = out / f"eval-{name}" / s
            if not (folder / "metrics.json").is_file():  # a finished evaluation is read back, not redone
                evaluate(gallery, queries[s], folder, ecfg, neighbours=neighbours[s], geolocator=geo,
                         progress=False, log=lambda *_: None)  # fmt: skip
            for label, err in read_errors(folder / "predictions.csv").items():
                key = label if label in ("knn", "ceiling") else f"{name}: {label}"
                errors[s][key] = err

    lines, report = [], {}
    for s in args.splits:
        e = errors[s]
        lines += [f"\n### {s} ({len(queries[s])} images); % within km, paired a - b in pp [95% CI]\n"]
        head = (
            "| row | "
            + " | ".join(f"{t:g} km" for t in THRESHOLDS)
            + " | vs default (200 / 750 / 2500) | vs knn (25 / 200 / 750 / 2500) |"
        )
        lines += [head, "|" + "---|" * (len(THRESHOLDS) + 3)]
        report[s] = {}
        for key, err in e.items():
            acc = " | ".join(f"{100 * np.mean(err <= t):.1f}" for t in THRESHOLDS)
            cells = {}
            for ref, ts in ((None, (200.0, 750.0, 2500.0)), ("knn", THRESHOLDS)):
                if key in ("knn", "ceiling"):
                    cells[ref] = ""
                    continue
                rkey = ref or f"default: {key.split(': ', 1)[1]}"
                if rkey not in e or rkey == key:
                    cells[ref] = ""
                    continue
                pc = paired_comparison(err, e[rkey], (key, rkey), ts, args.n_boot, 0)
                cells[ref] = " / ".join(
                    f"{100 * pc.accuracy[t].value:+.1f} [{100 * pc.accuracy[t].lo:+.1f}, {100 * pc.accuracy[t].hi:+.1f}]"
                    for t in ts
                )
                report[s].setdefault(key, {})[f"vs {ref or 'default'}"] = pc.to_dict()
            report[s].setdefault(key, {})["accuracy"] = {
                f"{t:g}": float(np.mean(err <= t)) for t in THRESHOLDS
            }
            lines.append(f"| {key} | {acc} | {cells[None]} | {cells['knn']} |")
    text = "\n".join(lines)
    print(text)
    (out / "generalise.md").write_text(f"epochs: {args.epochs}\n{text}\n")
    (out / "generalise.json").write_text(json.dumps({"epochs": args.epochs, "splits": report}, indent=1))


if __name__ == "__main__":
    main()

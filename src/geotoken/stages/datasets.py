"""Stage kinds for real datasets: `dataset` (annotation files and images on disk -> the SPLIT.csv manifests
the features stage reads) and `table` (the evaluation as the paper's Table I, beside the paper's figures).

    kind      reads              writes into its folder
    dataset   -                  SPLIT.csv manifests (images referenced where they are), SPLIT.texts.csv
                                 (place texts, when the layout has them), SPLIT.report.csv (every row or
                                 image left out, with its reason), dataset.json (sizes, counts, hashes)
    table     data, evaluate     table.md / table.json: both test sets side by side, 95% CIs, n per split,
                                 and the paper's own rows (`geotoken/configs/paper_table1.yaml`)
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from geotoken.data.datasets import (
    ARCHIVES,
    DatasetSource,
    describe_left_out,
    read_source,
    write_report,
    write_texts,
)
from geotoken.errors import GeoTokenError
from geotoken.evaluate.metrics import INTERVALS, MethodMetrics, markdown_table
from geotoken.geo import THRESHOLDS_KM
from geotoken.io import atomic_open, read_json, sha256_file, write_json
from geotoken.stages.method import GALLERY, Log, texts_path
from geotoken.stages.runner import stage_kind

CONFIGS = Path(__file__).resolve().parent.parent / "configs"  # package data: named run configs, paper figures
PAPER_TABLE = CONFIGS / "paper_table1.yaml"


# ---------------------------------------------------------------------------------------------- dataset
@dataclass(frozen=True)
class HoldoutConfig:
    """Move `size` seeded random rows of split `source` into a new split `split` (e.g. a validation split
    carved out of the MP16 gallery, which then never sees them)."""

    split: str = "val"
    source: str = GALLERY
    size: int = 1000
    seed: int = 0


@dataclass(frozen=True)
class DatasetStageConfig:
    sources: tuple[DatasetSource, ...] = ()
    holdout: HoldoutConfig | None = None


def _annotation_files(config: DatasetStageConfig, then: dict | None = None) -> dict[str, dict]:
    """{annotation file: {bytes, mtime_ns, sha256}}: what the stage records to notice an edited file on reuse.
    The hash decides (a one-digit fix keeps the size); a file whose size and time are as recorded is not
    read again, and one copied to another disk (new time, same bytes) stays reusable."""
    out = {}
    for path in (s.annotations for s in config.sources if s.annotations):
        if not os.path.isfile(path):
            continue
        st = os.stat(path)
        known = (then or {}).get(path) or {}
        same = known.get("bytes") == st.st_size and known.get("mtime_ns") == st.st_mtime_ns
        digest = known["sha256"] if same and "sha256" in known else sha256_file(path)
        out[path] = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    return out


def changed_annotations(config: DatasetStageConfig, info: dict) -> list[str]:
    """The annotation files whose bytes differ from when the stage ran (stages from before the hash: their
    size; from before that: none)."""
    if "annotation_files" not in info:
        now = {p: f["bytes"] for p, f in _annotation_files(config).items()}
        return [
            f"{path} had {size:,} bytes, now {now[path]:,}" if path in now else f"{path} is gone"
            for path, size in (info.get("annotation_bytes") or {}).items()
            if now.get(path) != size
        ]
    then = info["annotation_files"]
    now = _annotation_files(config, then)
    return [
        f"{path} is gone" if path not in now
        else f"{path} had {f['bytes']:,} bytes, now {now[path]['bytes']:,}" if now[path]["bytes"] != f["bytes"]
        else f"{path} was edited (same size, other bytes)"
        for path, f in then.items()
        if path not in now or now[path]["sha256"] != f["sha256"]
    ]  # fmt: skip


@stage_kind("dataset", DatasetStageConfig, changed=changed_annotations)
def read_datasets(
    config: DatasetStageConfig,
    out: Path,
    info_name: str = "dataset.json",
    *,
    log: Log = print,
    progress: bool = True,
) -> dict:
    """Read every source from disk into `out/SPLIT.csv` (+ texts, + report); images stay where they are.
    `info_name`: the summary's file (`geotoken manifest` names it after its split, so calls writing into one
    folder keep each other's)."""
    if not config.sources:
        raise GeoTokenError("dataset stage: no sources")
    splits = [s.split for s in config.sources]
    if len(set(splits)) != len(splits):
        raise GeoTokenError(f"dataset stage: split names must be unique, got {splits}")
    results = {}
    for source in config.sources:
        log(f"  reading {source.split} ({source.format}: {source.annotations or source.images})")
        results[source.split] = read_source(source, out)
        if len(results[source.split].manifest) == 0:  # before the holdout, whose size check would hide it
            _no_images(source.split, source, results[source.split], out)
    if config.holdout is not None:
        _holdout(config.holdout, results)
    info: dict[str, Any] = {"sizes": {}, "sources": {}, "content_hash": {}}
    info["annotation_files"] = _annotation_files(config)
    for split, r in results.items():
        r.manifest.write_csv(out / f"{split}.csv")
        if r.texts is not None:
            write_texts(texts_path(out, split), r.manifest.ids, r.texts)
        write_report(out / f"{split}.report.csv", r.report)
        if r.matched_by_name:
            s, image = r.matched_by_name[0]
            log(f"  {split}: {r.counts['matched_by_file_name']:,} rows matched an image by file name in "
                f"another folder than they name (first: {s!r} -> {image}); check the images")  # fmt: skip
        info["sizes"][split] = len(r.manifest)
        info["sources"][split] = {**r.counts, "left_out": len(r.report), "texts": r.texts is not None}
        info["content_hash"][split] = r.manifest.content_hash()
        log(f"  {split}: {len(r.manifest):,} rows with an image; left out: {describe_left_out(r.counts)} "
            f"({split}.report.csv)")  # fmt: skip
    write_json(out / info_name, info)
    return info


# byte-split pieces of one archive: mp-16-images00, mp-16-images01 (the Hub's MP16-Pro), x.tar.001, x.part2
_CHUNK = re.compile(r"^(?P<stem>.*?\D)(?:[._-]?part)?[._-]?\d{1,3}$")


def _no_images(split: str, source: DatasetSource, r, out: Path) -> None:
    """A split without one row that has an image: write its report, then say what the images path holds
    instead (files that are neither images nor archives, e.g. an archive still in byte-split chunks)."""
    images = source.images or os.path.dirname(source.annotations or "")
    skipped = [
        (images, name, "neither an image nor a .tar / .zip archive: skipped") for name in r.other_files
    ]
    report = out / f"{split}.report.csv"
    write_report(report, r.report + skipped)
    message = f"dataset stage: split {split!r} has no row with an image (see {report})"
    images_named_by_id = source.format not in ("csv", "shards")
    if images_named_by_id and not r.other_count and not r.counts.get("images_without_label"):
        message += f"; {images} holds no image files (.jpg, .png, ...) nor .tar / .zip archives at all"
    if r.other_count:
        shown = ", ".join(r.other_files[:5]) + (", ..." if r.other_count > 5 else "")
        message += (f"; {images} holds no image the rows name, and {r.other_count} files there are neither "
                    f"images nor .tar / .zip archives: {shown}")  # fmt: skip
        pieces: dict[str, list[str]] = {}
        for name in r.other_files:
            m = _CHUNK.match(posixpath.basename(name))
            if m:
                pieces.setdefault(posixpath.join(posixpath.dirname(name), m["stem"]), []).append(name)
        stem = next((stem for stem, names in pieces.items() if len(names) > 1), None)
        if stem:
            target = stem if stem.lower().endswith(ARCHIVES) else stem.rstrip("._-") + ".tar"
            names = ", ".join(pieces[stem][:3]) + (", ..." if len(pieces[stem]) > 3 else "")
            message += (f". {names} look like the pieces of one split archive: join them first "
                        f"(cat {os.path.join(images, stem)}* > {os.path.join(images, target)}) and give that "
                        f"archive as the images")  # fmt: skip
    raise GeoTokenError(message)


def _holdout(h: HoldoutConfig, results: dict) -> None:
    if h.source not in results:
        raise GeoTokenError(f"dataset stage: holdout from {h.source!r}, which is not a source split")
    if h.split in results:
        raise GeoTokenError(f"dataset stage: holdout split {h.split!r} is already a source split")
    src = results[h.source]
    n = len(src.manifest)
    if not 0 < h.size < n:
        raise GeoTokenError(
            f"dataset stage: holdout size {h.size} must be in 1..{n - 1}: split {h.source!r} has {n:,} rows "
            f"with an image, and some must stay in it"
        )
    held = np.sort(np.random.default_rng(h.seed).choice(n, h.size, replace=False))
    keep = np.setdiff1d(np.arange(n), held)
    texts = None if src.texts is None else np.asarray(src.texts, dtype=object)
    results[h.split] = dataclasses.replace(
        src,
        manifest=src.manifest.subset(held),
        texts=None if texts is None else texts[held].tolist(),
        report=[],
        counts={"held_out_of": h.source, "kept": h.size},
        matched_by_name=[],
    )
    results[h.source] = dataclasses.replace(
        src, manifest=src.manifest.subset(keep), texts=None if texts is None else texts[keep].tolist(),
        counts={**src.counts, "kept": len(keep), "held_out": h.size},
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------- table
@dataclass(frozen=True)
class TableStageConfig:
    """Which evaluated splits (columns, side by side) and methods (rows; empty: every evaluated row)."""

    splits: tuple[str, ...] = ("im2gps3k", "yfcc4k")
    methods: tuple[str, ...] = ()
    paper: bool = True  # add the paper's own rows (PAPER_TABLE) under ours


def paper_figures(path: Path = PAPER_TABLE) -> dict:
    """The paper's Table I / II figures (% within THRESHOLDS_KM per system and test set) and their source."""
    with open(path, encoding="utf-8") as f:
        table = yaml.safe_load(f)
    if list(table.get("thresholds_km", [])) != list(THRESHOLDS_KM):
        raise GeoTokenError(f"{path}: thresholds_km must be {list(THRESHOLDS_KM)}")
    return table


def table_markdown(
    results: dict[str, dict[str, MethodMetrics]],
    names: dict[str, str],
    notes: list[str],
    paper: dict | None,
) -> str:
    """Table I's layout: one row per method, each test set's five accuracies and median error side by side;
    ours with their CI, the paper's as published (no CI; the paper gives no median)."""
    splits = list(results)
    header = ["method"] + [
        f"{names[s]} {c}" for s in splits for c in [*(f"{t:g} km" for t in THRESHOLDS_KM), "median km"]
    ]
    rows = []
    methods = list(dict.fromkeys(m for s in splits for m in results[s]))
    for m in methods:
        cells = [m]
        for s in splits:
            r = results[s].get(m)
            for t in THRESHOLDS_KM:
                e = None if r is None else r.accuracy.get(float(t))
                cells.append(
                    "-" if e is None else f"{100 * e.value:.1f} [{100 * e.lo:.1f}, {100 * e.hi:.1f}]"
                )
            e = None if r is None else r.median_km
            cells.append("-" if e is None else f"{e.value:,.0f} [{e.lo:,.0f}, {e.hi:,.0f}]")
        rows.append(cells)
    if paper:
        for row in paper["rows"]:
            cells = [f"{row['system']} (paper)"]
            for s in splits:
                values = row.get(s)
                cells += ["-"] * len(THRESHOLDS_KM) if values is None else [f"{v:.1f}" for v in values]
                cells.append("-")
            rows.append(cells)
    level = next((r.level for s in splits for r in results[s].values()), 0.95)
    out = [
        f"% of images within each distance; ours with {100 * level:.0f}% confidence intervals ({INTERVALS})."
        + (" Rows marked (paper) are the published figures (no CI): " + paper["source"] if paper else ""),
        "",
        markdown_table(header, rows),
        *notes,
    ]
    return "\n".join(out).rstrip() + "\n"


@stage_kind("table", TableStageConfig)
def paper_table(
    config: TableStageConfig,
    out: Path,
    *,
    data: Path,
    evaluate: Path,
    log: Log = print,
    progress: bool = True,
) -> dict:
    """The evaluation of every split in `config.splits` as one table (`out/table.md`, `out/table.json`)."""
    dataset = read_json(data / "dataset.json")
    paper = paper_figures() if config.paper else None
    if paper and not set(config.splits) & set(paper.get("test_sets", {})):
        paper = None  # none of the paper's test sets: its rows would be dashes
    names = {s: (paper or {}).get("test_sets", {}).get(s, s) for s in config.splits}
    results: dict[str, dict[str, MethodMetrics]] = {}
    notes = []
    for split in config.splits:
        path = evaluate / split / "metrics.json"
        if not path.is_file():
            raise GeoTokenError(
                f"{path}: no evaluation of split {split!r} (is it in the evaluate stage's splits?)"
            )
        metrics = read_json(path)
        wanted = config.methods or tuple(metrics["methods"])
        missing = sorted(set(wanted) - set(metrics["methods"]))
        if missing:
            raise GeoTokenError(f"{path}: no method(s) {missing}; evaluated: {sorted(metrics['methods'])}")
        results[split] = {m: MethodMetrics.from_dict(metrics["methods"][m], f"methods.{m}") for m in wanted}
        n = metrics["queries"]["rows"]
        names[split] = f"{names[split]} (n = {n:,})"
        details = (data / f"{split}.report.csv").is_file()
        notes.append(_split_note(split, n, metrics, dataset.get("sources", {}).get(split, {}), details))
    text = table_markdown(results, names, [""] + notes, paper)
    with atomic_open(out / "table.md", "w", encoding="utf-8") as f:
        f.write(text)
    write_json(out / "table.json", {
        "splits": {s: {"name": names[s], "methods": {m: r.to_dict() for m, r in results[s].items()}}
                   for s in results},
        "paper": paper,
    })  # fmt: skip
    log(f"  wrote {out / 'table.md'}")
    return {"splits": list(config.splits)}


def _split_note(split: str, n: int, metrics: dict, counts: dict, details: bool = True) -> str:
    """Where each split's n comes from: rows listed, bad rows, rows without an image, images without a row."""
    parts = [f"- {split}: n = {n:,} images evaluated"]
    if counts.get("rows"):
        parts.append(f"of {counts['rows']:,} annotation rows")
    left_out = {k: v for k, v in counts.items() if k != "left_out"}  # the kinds, not their sum
    if describe_left_out(left_out) != "nothing":
        parts.append(f"left out: {describe_left_out(left_out)}")
    if metrics["queries"].get("skipped"):
        parts.append(f"{metrics['queries']['skipped']:,} unreadable images skipped at embedding")
    where = f" (details: {split}.report.csv in the dataset stage's folder)" if details else ""
    return "; ".join(parts) + where


__all__ = [
    "CONFIGS",
    "PAPER_TABLE",
    "DatasetStageConfig",
    "HoldoutConfig",
    "TableStageConfig",
    "paper_figures",
    "paper_table",
    "read_datasets",
    "table_markdown",
    "texts_path",
]

"""Run configs: a stage graph in a YAML file (what `geotoken run CONFIG` reads), its variables, and its plan.

A config file holds `stages:` (the list `Pipeline.from_dict` reads), an optional `run_dir:` and an optional
`variables:` mapping of defaults. Any string in it may contain `${NAME}` (or `${NAME:-default}`): the places
where the user's data paths (or any other value) go. A variable's value is, first to last: `--set NAME=VALUE`
on the command line, the environment variable NAME, the file's `variables:` default, the inline default.
A value that fills a whole scalar is read as YAML (`k: ${K}` with K=15 is the number 15). A variable with no
value, or a `--set` name the file never uses, is an error naming it.

`plan_run` is the dry run: each stage's folder (the same content hash `run_pipeline` gives it), whether it is
finished, its inputs, and estimates of its rows, disk and work; it reads nothing but annotation files'
line counts and checks that data paths exist.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from geotoken.encoders.clip import PAPER_MODEL
from geotoken.encoders.geoclip import clip_mismatch
from geotoken.errors import GeoTokenError
from geotoken.io import load_yaml, read_json, sha256_json, write_json
from geotoken.model import GeoToken, preset
from geotoken.stages.datasets import CONFIGS
from geotoken.stages.method import GALLERY
from geotoken.stages.runner import Pipeline, Run, StageResult, run_pipeline, stage_identity

VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
KEYS = ("description", "variables", "run_dir", "stages")


@dataclass
class RunConfig:
    """A loaded config: the stage graph, the run folder, and the variables it was filled with."""

    pipeline: Pipeline
    run_dir: str
    path: Path
    variables: dict[str, str] = field(default_factory=dict)
    description: str = ""


def packaged_configs() -> list[str]:
    """The named configs shipped with the package (`geotoken/configs/*.yaml`, less data files)."""
    return sorted(p.stem for p in CONFIGS.glob("*.yaml") if not p.stem.startswith("paper_table"))


def find_config(name: str | os.PathLike) -> Path:
    """A config file: an existing path, else a packaged config by name (`paper`, `configs/paper.yaml`)."""
    path = Path(name)
    if path.is_file():
        return path
    packaged = CONFIGS / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
    if packaged.is_file():
        return packaged
    raise GeoTokenError(
        f"{name}: no such config file, and no packaged config of that name {packaged_configs()}"
    )


def substitute(value: Any, values: Mapping[str, str], used: set[str], missing: set[str]) -> Any:
    """`value` with every `${NAME}` replaced, recursively through lists and mappings."""
    if isinstance(value, Mapping):
        return {k: substitute(v, values, used, missing) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, values, used, missing) for v in value]
    if not isinstance(value, str) or "${" not in value:
        return value

    def fill(m: re.Match) -> str:
        name, default = m.group(1), m.group(2)
        used.add(name)
        if name in values:
            return values[name]
        if default is not None:
            return default
        missing.add(name)
        return m.group(0)

    whole = VARIABLE.fullmatch(value)
    out = VARIABLE.sub(fill, value)
    return load_yaml(out, f"the value {out!r}") if whole and out != value and out.strip() else out


def load_run_config(
    name: str | os.PathLike,
    overrides: Mapping[str, str] | None = None,
    environ: Mapping[str, str] | None = None,
    run_dir: str | None = None,
) -> RunConfig:
    """Read a config file (`find_config`), fill its variables and build its pipeline."""
    path = find_config(name)
    raw = load_yaml(path.read_text(encoding="utf-8"), str(path))
    if not isinstance(raw, Mapping):
        raise GeoTokenError(f"{path}: a run config is a mapping with a 'stages' list")
    unknown = sorted(set(raw) - set(KEYS))
    if unknown:  # (before 'stages' is missing: `stage:` for `stages:` names the typo)
        raise GeoTokenError(f"{path}: unknown key(s) {unknown}; a run config has {list(KEYS)}")
    if "stages" not in raw:
        raise GeoTokenError(f"{path}: a run config is a mapping with a 'stages' list")
    overrides = dict(overrides or {})
    environ = os.environ if environ is None else environ
    defaults = {k: str(v) for k, v in (raw.get("variables") or {}).items() if v is not None}
    names = {m[0] for m in VARIABLE.findall(yaml.safe_dump(raw))}
    values = {**defaults, **{n: environ[n] for n in names if n in environ}, **overrides}
    used: set[str] = set()
    missing: set[str] = set()
    body = substitute({k: raw[k] for k in ("run_dir", "stages") if k in raw}, values, used, missing)
    if missing:
        how = " ".join(f"--set {n}=..." for n in sorted(missing))
        raise GeoTokenError(f"{path}: variable(s) {sorted(missing)} have no value; give them: {how} "
                            f"(or set them in the environment)")  # fmt: skip
    stray = sorted(set(overrides) - used)
    if stray:
        raise GeoTokenError(
            f"{path}: --set {stray}: no such variable in this config (it uses {sorted(used)})"
        )
    try:
        pipeline = Pipeline.from_dict({"stages": body["stages"]})
    except GeoTokenError as exc:
        raise GeoTokenError(f"{path}: {exc}") from None
    return RunConfig(
        pipeline,
        run_dir or body.get("run_dir") or f"runs/{path.stem}",
        path,
        {n: values[n] for n in sorted(used) if n in values},
        str(raw.get("description") or ""),
    )


def parse_assignments(items: list[str] | None) -> dict[str, str]:
    """['NAME=VALUE', ...] (the CLI's --set) -> {NAME: VALUE}."""
    out = {}
    for item in items or []:
        name, eq, value = item.partition("=")
        if not eq or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise GeoTokenError(f"--set {item!r}: expected NAME=VALUE")
        out[name] = value
    return out


def sparse_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as plain values, less the fields left at their defaults (nested ones too): what a
    config file needs to say, and nothing a later default change would contradict."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        default = (
            f.default if f.default is not dataclasses.MISSING
            else f.default_factory() if f.default_factory is not dataclasses.MISSING
            else dataclasses.MISSING
        )  # fmt: skip
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            nested = sparse_dict(value)
            if nested or default is dataclasses.MISSING or value != default:
                out[f.name] = nested
        elif value != default:
            out[f.name] = [sparse_dict(v) if dataclasses.is_dataclass(v) else v for v in value] if isinstance(
                value, tuple) else value  # fmt: skip
    return out


def pipeline_yaml(pipeline: Pipeline) -> str:
    """A pipeline as the `stages:` of a run config, fields at their defaults left out; `load_run_config`
    reads it back into an equal pipeline."""
    stages = []
    for spec in pipeline.stages:
        d: dict[str, Any] = {"name": spec.name}
        if spec.kind != spec.name:
            d["kind"] = spec.kind
        if any(i != src for i, src in spec.inputs.items()):
            d["inputs"] = dict(spec.inputs)
        config = sparse_dict(spec.config)
        if config:
            d["config"] = config
        stages.append(d)
    return yaml.safe_dump({"stages": stages}, sort_keys=False, default_flow_style=None, width=100)


# ---------------------------------------------------------------------------------------------- run
def run_summary(pipeline: Pipeline, run: Run, results: Mapping[str, StageResult], seconds: float) -> dict:
    """What a finished run's run.json says (`geotoken report RUN_DIR` reads it): its stages' folders and
    timings, the evaluation folders {split: folder} of its evaluate stage(s) ("STAGE/SPLIT" when there are
    several), and its bundle."""
    evaluations = [spec.name for spec in pipeline.stages if spec.kind == "evaluate"]
    bundles = [spec.name for spec in pipeline.stages if spec.kind == "bundle"]
    summary: dict[str, Any] = {
        "run_dir": str(run.root),
        "stages": run.stages,
        "timings_s": run.timings,
        "total_s": round(seconds, 2),
        "eval": {
            (split if len(evaluations) == 1 else f"{name}/{split}"): str(results[name].folder / split)
            for name in evaluations
            for split in results[name].info.get("splits", [])
        },
    }
    if bundles:
        summary["bundle"] = str(results[bundles[-1]].folder)
    tables = {
        spec.name: str(results[spec.name].folder / "table.md")
        for spec in pipeline.stages
        if spec.kind == "table"
    }
    if tables:  # the paper's Table I layout, which the report shows first
        summary["tables"] = tables
    return summary


def write_run_summary(root: Path, summary: dict, log=print) -> None:
    """RUN_DIR/run.json; a report.html of an earlier run beside it is removed (it would show that run's
    evaluation beside this run's summary), and said."""
    write_json(root / "run.json", summary)
    stale = root / "report.html"
    if stale.is_file():
        stale.unlink()
        log(f"removed {stale}: it reported an earlier run (geotoken report {root} writes this run's)")


def run_stages(
    cfg: RunConfig, log=print, progress: bool = True, check: bool = True
) -> dict[str, StageResult]:
    """Run the config's stages in its run folder (reusing finished ones) and write RUN_DIR/run.json: the
    run's summary, with the config file, its variables and each stage's options. `check`: first refuse a
    plan with problems (`plan_run`: a missing file, a holdout larger than its source...), before any stage
    runs rather than when the stage that meets it comes, hours in."""
    if check:
        problems = [f"[{p.name}] {x}" for p in plan_run(cfg) for x in p.problems]
        if problems:
            raise GeoTokenError(
                f"{cfg.path}: " + "; ".join(problems) + " (geotoken run --dry-run shows the plan)"
            )
    run = Run(cfg.run_dir, log, progress)
    t0 = time.perf_counter()
    results = run_pipeline(cfg.pipeline, run)
    summary = run_summary(cfg.pipeline, run, results, time.perf_counter() - t0)
    config = {"file": str(cfg.path), "variables": cfg.variables}
    summary["config"] = {**config, **{spec.name: sparse_dict(spec.config) for spec in cfg.pipeline.stages}}
    write_run_summary(run.root, summary, log)
    return results


# ---------------------------------------------------------------------------------------------- plan
@dataclass
class StagePlan:
    """What the dry run says about one stage."""

    name: str
    kind: str
    folder: str
    done: bool
    inputs: dict[str, str]
    rows: dict[str, int] = field(default_factory=dict)  # split -> rows (at most: before images are checked)
    disk_bytes: int = 0
    work: str = ""
    problems: list[str] = field(default_factory=list)


def stage_folders(pipeline: Pipeline) -> dict[str, str]:
    """{stage name: folder name}, exactly as `run_pipeline` names them (NAME-HASH of the derived identity)."""
    folders: dict[str, str] = {}
    for spec in pipeline.stages:
        identity = stage_identity(spec.config, {i: folders[src] for i, src in spec.inputs.items()})
        folders[spec.name] = f"{spec.name}-{sha256_json(identity)[:12]}"
    return folders


def _lines(path: str) -> int:
    count = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            count += block.count(b"\n")
    return count


def _source_rows(source, problems: list[str]) -> int:
    """Rows of a source's annotation file (an upper bound: rows without an image are dropped later)."""
    for what in ("annotations", "images"):
        value = getattr(source, what)
        if value and not os.path.exists(value):
            problems.append(f"{source.split}: {what} {value} does not exist")
    if source.annotations and os.path.isfile(source.annotations):
        n = max(0, _lines(source.annotations) - 1)
        return n if source.limit is None else min(n, source.limit)
    return 0


def _backbone_dim(config) -> int:
    if config.backbone != "clip":
        return 1280  # EfficientNet-Lite0's pooled features
    local = Path(config.clip or "openai/clip-vit-large-patch14") / "config.json"
    if local.is_file():
        d = json.loads(local.read_text())
        return int(d.get("projection_dim") or d.get("vision_config", {}).get("projection_dim") or 768)
    return 768  # CLIP ViT-L/14's projection


def _hub_note(clip: str, problems: list[str]) -> str:
    """CLIP weights named by a hub id that are not in the local Hugging Face cache: downloaded when the
    stage starts, or (offline) a problem now rather than after the stages before it."""
    if Path(clip).expanduser().exists() or clip.count("/") != 1:
        return ""  # a local folder (checked where it is read), or not a hub id
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(clip, "config.json"), str):
        return ""
    if constants.HF_HUB_OFFLINE:
        problems.append(f"CLIP {clip!r} is not in the Hugging Face cache and HF_HUB_OFFLINE is set: download it "
                        "first, or set CLIP to a local folder")  # fmt: skip
        return ""
    return f"; {clip} is not in the Hugging Face cache: downloaded when the stage starts"


def _model_params(config, dims: dict[str, int], k: int) -> int:
    """Parameters of the model stage's preset (the model is built once on the CPU: about a second at `paper`)."""
    with torch.no_grad():
        model = GeoToken(preset(config.preset, modalities=dims, k=k))
    return sum(p.numel() for p in model.parameters())


def plan_run(cfg: RunConfig) -> list[StagePlan]:
    """The dry run of a config: per stage its folder, status, inputs, row and disk estimates, and problems
    (missing data paths, a graph without a gallery split)."""
    folders = stage_folders(cfg.pipeline)
    root = Path(cfg.run_dir)
    plans: dict[str, StagePlan] = {}
    for spec in cfg.pipeline.stages:
        c = spec.config
        p = StagePlan(spec.name, spec.kind, folders[spec.name], (root / folders[spec.name] / "stage.json").is_file(),
                      dict(spec.inputs))  # fmt: skip
        if p.done and spec.stage_kind.changed:
            record = read_json(root / folders[spec.name] / "stage.json")
            p.problems += [
                f"changed since this stage ran: {x}" for x in spec.stage_kind.changed(c, record["info"])
            ]
        upstream = {i: plans[src] for i, src in spec.inputs.items()}
        rows = next((u.rows for u in upstream.values() if u.rows), {})
        total = sum(rows.values())
        if spec.kind == "data":
            p.rows = {s: n for s, n in c.earthviews.sizes().items() if n > 0}
            side = c.earthviews.image_size
            p.disk_bytes = sum(p.rows.values()) * side * side * 3 // 10  # JPEG: about a tenth of raw RGB
            p.work = f"render {sum(p.rows.values()):,} EarthViews images"
        elif spec.kind == "dataset":
            p.rows = {s.split: _source_rows(s, p.problems) for s in c.sources}
            if c.holdout is not None and c.holdout.source in p.rows:
                h, listed = c.holdout, p.rows[c.holdout.source]
                if listed and h.size >= listed:  # the stage would refuse it, after reading every image
                    variable = " (VAL_SIZE)" if "VAL_SIZE" in cfg.variables else ""
                    p.problems.append(f"holdout: {h.split} size {h.size:,} leaves nothing of {h.source}'s "
                                      f"{listed:,} annotation rows; hold out fewer: the stage's holdout "
                                      f"size{variable}")  # fmt: skip
                p.rows[h.source] = max(0, listed - h.size)
                p.rows[h.split] = min(h.size, listed)
            p.disk_bytes = sum(p.rows.values()) * 200  # manifests, texts, reports: about 200 B a row
            p.work = f"read {len(c.sources)} annotation file(s), check {sum(p.rows.values()):,} images exist"
        elif spec.kind == "features":
            p.rows, dim = rows, _backbone_dim(c)
            p.disk_bytes = total * dim * 2
            p.work = (
                f"{total:,} images through {c.backbone} {c.clip or ''}".rstrip() + f" ({dim}-d, fp16 stores)"
            )
            if c.backbone == "clip":
                p.work += _hub_note(c.clip or PAPER_MODEL, p.problems)
        elif spec.kind == "align":
            p.rows = rows
            features = next((s for s in cfg.pipeline.stages if s.kind == "features"), None)
            clip = c.text_encoder == "clip" or (
                c.text_encoder is None and features and features.config.backbone == "clip"
            )
            text_dim = 768 if clip else 384  # CLIP ViT-L/14's text projection, or MiniLM's
            p.disk_bytes = total * (512 + 512 + text_dim) * 2
            p.work = f"{c.epochs} epochs over {rows.get(GALLERY, 0):,} gallery rows, then apply to {total:,}"
        elif spec.kind == "index":
            p.rows = rows
            p.disk_bytes = rows.get(GALLERY, 0) * 1024 * 4 + total * c.k * 12
            p.work = (
                f"{c.kind} index over {rows.get(GALLERY, 0):,} rows, {c.k} neighbours for {total:,} queries"
            )
        elif spec.kind == "model":
            p.rows = rows
            index = next((s.config for s in cfg.pipeline.stages if s.name == spec.inputs.get("index")), None)
            index_k = getattr(index, "k", 15)
            k = index_k if c.k is None else c.k
            if k > index_k:  # the stage would refuse it once the index stage has run
                p.problems.append(f"k {k} is more than the {index_k} neighbours per query of the index stage: "
                                  "lower it, or raise the index stage's k")  # fmt: skip
            for field_name in ("queries", "val"):
                split = getattr(c, field_name)
                if rows and split not in rows:
                    p.problems.append(f"{field_name} {split!r}: no such split (the data has {sorted(rows)})")
            try:  # (768-d inputs: the size of the estimate, not of the run)
                params = _model_params(c, {m: 768 for m in c.modalities}, min(k, index_k))
            except GeoTokenError as exc:
                p.problems.append(str(exc))
                params = 0
            p.disk_bytes = params * 4 * 4  # best + last weights, AdamW's two moments in last/
            n = rows.get(c.queries, 0)
            p.work = f"{c.epochs} epochs x {n:,} queries ({c.preset}: {params / 1e6:.1f}M parameters)"
            if 0 < n < c.batch_size:  # the stage would refuse it after every stage before it has run
                p.problems.append(f"batch_size {c.batch_size:,} is more than the {n:,} training queries of split "
                                  f"{c.queries!r} (at most): lower it (BATCH_SIZE in the packaged configs)")  # fmt: skip
        elif spec.kind == "evaluate":
            p.rows = {s: rows.get(s, 0) for s in c.splits}
            decodes = len(c.strategies) * len(c.constrain) + len(c.free_strategies)
            p.work = f"{sum(p.rows.values()):,} queries x {decodes} decodings, {len(c.baselines)} baselines"
            p.disk_bytes = sum(p.rows.values()) * 2000
        elif spec.kind == "bundle":
            p.rows, p.disk_bytes = rows, rows.get(GALLERY, 0) * (512 + 512 + 768) * 2
            reward = min(c.reward_images, rows.get(c.reward_queries, c.reward_images))  # at most the split
            p.work = f"copy the gallery, train the reward scorer on {reward:,} images, calibrate"
        if spec.kind in ("align", "index") and rows and GALLERY not in rows:
            p.problems.append(f"{spec.kind} needs a '{GALLERY}' split; the data has {sorted(rows)}")
        if spec.kind == "evaluate" and rows:
            p.problems += [f"evaluate: no split {s!r} in the data" for s in c.splits if s not in rows]
        if spec.kind == "evaluate" and "geoclip" in c.baselines:  # it would fail after every other stage
            features = next((s for s in cfg.pipeline.stages if s.kind == "features"), None)
            clip = (
                (features.config.clip or PAPER_MODEL)
                if features and features.config.backbone == "clip"
                else None
            )
            problem = clip_mismatch(clip) if clip else "the features are not CLIP's"
            if problem:
                p.problems.append(f"evaluate: the geoclip baseline cannot read these features ({clip or 'no CLIP'}: "
                                  f"{problem}); leave it out of the baselines")  # fmt: skip
        plans[spec.name] = p
    return list(plans.values())


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n} B"


def plan_text(cfg: RunConfig, plans: list[StagePlan]) -> str:
    """The dry run as text: one block per stage, then the totals and any problem."""
    lines = [f"config {cfg.path} -> run folder {cfg.run_dir}"]
    if cfg.variables:
        lines.append("variables: " + ", ".join(f"{k}={v}" for k, v in cfg.variables.items()))
    for p in plans:
        status = "done (reused)" if p.done else "to run"
        inputs = ", ".join(f"{i} <- {s}" for i, s in p.inputs.items()) or "-"
        lines.append(f"[{p.name}] kind {p.kind}, folder {p.folder}, {status}; reads {inputs}")
        if p.rows:
            lines.append("    rows (at most): " + ", ".join(f"{s} {n:,}" for s, n in p.rows.items()))
        if p.work:
            lines.append(f"    work: {p.work}")
        lines.append(f"    disk: ~{human_bytes(p.disk_bytes)}")
        lines += [f"    PROBLEM: {x}" for x in p.problems]
    todo = sum(p.disk_bytes for p in plans if not p.done)
    lines.append(
        f"total disk still to write: ~{human_bytes(todo)} ({sum(not p.done for p in plans)} stage(s) to run)"
    )
    return "\n".join(lines)

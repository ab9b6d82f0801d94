"""The generic part: stage kinds, a pipeline of stage specs, and the run folder that executes them.

A stage kind is a library function `run(config, out, *, <inputs>, log)` registered with its config dataclass;
its inputs are the keyword-only parameters of the function (paths of the stage folders it reads). A
`StageSpec` names one use of a kind in a pipeline: its folder prefix, its config, and which earlier stage
provides each input. A `Pipeline` is a checked list of specs; it is plain data (`to_dict` / `from_dict`).

A stage's identity is derived, never written by hand: the fields of its config (less those marked
`runtime_field`, e.g. worker counts, that cannot change what it writes) plus, for each input, the folder
name of the stage that provides it (`NAME-HASH`, itself a hash of that stage's identity). `Run` names each
stage folder after the hash of its identity, writes `stage.json` last, and reuses a finished folder.
"""

from __future__ import annotations

import dataclasses
import inspect
import time
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from geotoken.errors import GeoTokenError
from geotoken.io import exclusive, read_json, sha256_json, type_name, value_fits, write_json

RUNTIME = "runtime"  # dataclass field metadata key: the field is not part of the stage's identity
ADDED = "added"  # metadata key: the field joins the identity only when it differs from its default


def runtime_field(default: Any) -> Any:
    """A config field that does not change a stage's outputs (processes, threads): left out of its identity."""
    return field(default=default, metadata={RUNTIME: True})


def added_field(default: Any) -> Any:
    """A config field added after runs exist: left out of the identity while it holds its default, so the
    stages finished before it existed keep their folders (and are reused)."""
    return field(default=default, metadata={ADDED: True})


# ---------------------------------------------------------------------------------------------- kinds
@dataclass(frozen=True)
class StageKind:
    """What a stage does: `run(config, out, *, <inputs>: Path, log, progress) -> info dict`, and its config
    class."""

    name: str
    run: Callable[..., dict | None]
    config: type
    inputs: tuple[str, ...]  # the stage folders it reads: run's keyword-only parameters (less `OUTPUT`)
    # (config, info of the finished stage) -> what changed on disk since it ran: files outside the run
    # (a dataset's annotations) are not in the identity, so reusing the folder needs this check
    changed: Callable[[Any, dict], list[str]] | None = None


STAGES: dict[str, StageKind] = {}
OUTPUT = ("log", "progress")  # what a stage says, not what it reads: every stage function takes both


def stage_kind(
    name: str, config: type, changed: Callable[[Any, dict], list[str]] | None = None
) -> Callable[[Callable], Callable]:
    """Decorator: register a stage function under `name` with its config dataclass (and `changed`, see
    `StageKind`)."""

    def register(run: Callable) -> Callable:
        params = inspect.signature(run).parameters.values()
        keywords = {p.name for p in params if p.kind is p.KEYWORD_ONLY}
        if not set(OUTPUT) <= keywords:
            raise TypeError(f"stage {name!r}: {run.__name__} must take keyword-only {' and '.join(OUTPUT)}")
        inputs = tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name not in OUTPUT)
        STAGES[name] = StageKind(name, run, config, inputs, changed)
        return run

    return register


# ---------------------------------------------------------------------------------------------- identity
def config_identity(config: Any) -> dict[str, Any]:
    """The config's fields as JSON-able values, less the runtime fields and the added fields at their
    defaults, plus what the config's `content_identity()` adds (the contents of files it names: a recipe
    file edited in place must not leave the stage it trained reused)."""
    values = dataclasses.asdict(config)
    own = {
        f.name: values[f.name]
        for f in dataclasses.fields(config)
        if not f.metadata.get(RUNTIME) and not (f.metadata.get(ADDED) and values[f.name] == f.default)
    }
    contents = config.content_identity() if hasattr(config, "content_identity") else {}
    return {**own, **contents}


def stage_identity(config: Any, inputs: Mapping[str, str]) -> dict[str, Any]:
    """A stage's identity: its config fields plus {input: folder name of the stage providing it}."""
    own = config_identity(config)
    clash = sorted(set(own) & set(inputs))
    if clash:
        raise GeoTokenError(f"{type(config).__name__}: field(s) {clash} have the names of stage inputs")
    return {**own, **inputs}


# ---------------------------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class StageSpec:
    """One stage of a pipeline: its name (folder prefix), kind (a key of STAGES), config and inputs.

    inputs: {input of the kind: name of an earlier stage}; None wires each input to the stage of that name.
    """

    name: str
    kind: str
    config: Any
    inputs: Mapping[str, str] | None = None

    def __post_init__(self) -> None:
        if self.kind not in STAGES:
            raise GeoTokenError(
                f"stage {self.name!r}: unknown kind {self.kind!r}; choose from {sorted(STAGES)}"
            )
        kind = STAGES[self.kind]
        if not isinstance(self.config, kind.config):
            raise GeoTokenError(
                f"stage {self.name!r}: config is a {type(self.config).__name__}, kind {self.kind!r} takes a "
                f"{kind.config.__name__}"
            )
        inputs = dict(self.inputs) if self.inputs is not None else {i: i for i in kind.inputs}
        if set(inputs) != set(kind.inputs):
            raise GeoTokenError(
                f"stage {self.name!r}: inputs {sorted(inputs)}, kind {self.kind!r} reads {sorted(kind.inputs)}"
            )
        object.__setattr__(self, "inputs", {i: inputs[i] for i in kind.inputs})

    @property
    def stage_kind(self) -> StageKind:
        return STAGES[self.kind]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "config": dataclasses.asdict(self.config),
                "inputs": dict(self.inputs)}  # fmt: skip

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StageSpec:
        """{"name", "kind" (default: the name), "config": {field: value} (default: all defaults),
        "inputs": {input: stage} or [stage, ...] (same names) (default: same names)}."""
        keys = ("name", "kind", "config", "inputs")
        if "name" not in d:
            raise GeoTokenError(f"stage {dict(d)}: needs a 'name'")
        unknown = sorted(set(d) - set(keys))
        if unknown:
            raise GeoTokenError(f"stage {d['name']!r}: unknown key(s) {unknown}; a stage has {list(keys)}")
        name, kind = d["name"], d.get("kind", d["name"])
        if kind not in STAGES:
            raise GeoTokenError(f"stage {name!r}: unknown kind {kind!r}; choose from {sorted(STAGES)}")
        inputs = d.get("inputs")
        if isinstance(inputs, list | tuple):
            inputs = {i: i for i in inputs}
        config = config_from_dict(STAGES[kind].config, d.get("config") or {}, where=f"stage {name!r}")
        return cls(name, kind, config, inputs)


@dataclass(frozen=True)
class Pipeline:
    """Stages in the order they run; every input names an earlier stage."""

    stages: tuple[StageSpec, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(self.stages))
        seen: set[str] = set()
        for spec in self.stages:
            if spec.name in seen:
                raise GeoTokenError(f"pipeline: two stages named {spec.name!r}")
            missing = sorted(src for src in spec.inputs.values() if src not in seen)
            if missing:
                raise GeoTokenError(
                    f"pipeline: stage {spec.name!r} reads {missing}, which no earlier stage is"
                )
            seen.add(spec.name)

    def __getitem__(self, name: str) -> StageSpec:
        for spec in self.stages:
            if spec.name == name:
                return spec
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {"stages": [s.to_dict() for s in self.stages]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Pipeline:
        if not isinstance(d.get("stages"), list):
            raise GeoTokenError("pipeline: needs a list 'stages'")
        for i, s in enumerate(d["stages"]):
            if not isinstance(s, Mapping):
                raise GeoTokenError(
                    f"pipeline: stage {i} is {s!r}; each stage is a mapping with 'name' (and 'kind', 'config', "
                    "'inputs')"
                )
        return cls(tuple(StageSpec.from_dict(s) for s in d["stages"]))


def config_from_dict(cls: type, d: Mapping[str, Any], where: str = "config") -> Any:
    """A config dataclass from plain values (JSON / YAML): nested dataclasses from dicts, tuples from lists."""
    if not isinstance(d, Mapping):
        raise GeoTokenError(f"{where}: expected a mapping of {cls.__name__} fields, got {d!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise GeoTokenError(f"{where}: unknown {cls.__name__} field(s) {unknown}; known: {sorted(names)}")
    values = {k: _value(hints[k], v, f"{where}.{k}") for k, v in d.items()}
    try:
        return cls(**values)
    except GeoTokenError as exc:  # a value its own checks refuse: say where it came from
        raise GeoTokenError(f"{where}: {exc}") from None


def _value(hint: Any, value: Any, where: str) -> Any:
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    options = typing.get_args(hint) if union else (hint,)
    for option in options:
        if dataclasses.is_dataclass(option) and isinstance(value, Mapping):
            return config_from_dict(option, value, where)
        if dataclasses.is_dataclass(option) and isinstance(value, str) and hasattr(option, "named"):
            try:  # a named value of the type (`test_style: strong`)
                return option.named(value)
            except GeoTokenError as exc:
                raise GeoTokenError(f"{where}: {exc}") from None
        if typing.get_origin(option) is tuple and isinstance(value, list | tuple):
            item = typing.get_args(option)[0] if typing.get_args(option) else None
            if dataclasses.is_dataclass(item):  # tuple[Config, ...]: each item from its mapping
                return tuple(
                    config_from_dict(item, v, f"{where}[{i}]") if isinstance(v, Mapping) else v
                    for i, v in enumerate(value)
                )
            return tuple(value)
    if not value_fits(hint, value):
        raise GeoTokenError(f"{where}: expected {type_name(hint)}, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------- running
class Run:
    """A run folder: stage folders named by content hash, a log of timings, reuse of finished stages."""

    def __init__(self, root: str | Path, log: Callable[[str], None] = print, progress: bool = True):
        """`log` takes every line the stages say; `progress=False` turns their progress bars off."""
        self.root = Path(root).resolve()  # run.json records absolute paths; the report re-roots a moved run
        self.root.mkdir(parents=True, exist_ok=True)
        self.log = log
        self.progress = progress
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
        else:  # one builder at a time: a second run into this folder would resume the first's files under it
            with exclusive(self.root / f".{folder.name}.lock", f"stage folder {folder}"):
                if marker.exists():  # built while this run waited for an earlier stage
                    return self.stage(name, identity, build)
                self.log(f"[{name}] running -> {folder.name}")
                folder.mkdir(parents=True, exist_ok=True)
                try:
                    info = build(folder) or {}
                except BaseException:  # a stage that failed before writing anything leaves no folder
                    if not any(folder.iterdir()):
                        folder.rmdir()
                    raise
                seconds = round(time.perf_counter() - t0, 2)
                record = {
                    "stage": name,
                    "hash": digest,
                    "identity": identity,
                    "seconds": seconds,
                    "info": info,
                }
                write_json(marker, record)
        self.timings[name] = round(time.perf_counter() - t0, 2)
        self.stages[name] = {"folder": folder.name, "hash": digest, "built_seconds": record["seconds"]}
        return folder, record


@dataclass(frozen=True)
class StageResult:
    """A finished stage: its folder and its stage.json record (identity, seconds, the function's info)."""

    folder: Path
    record: dict

    @property
    def info(self) -> dict:
        return self.record["info"]


def run_pipeline(pipeline: Pipeline, run: Run) -> dict[str, StageResult]:
    """Run every stage of `pipeline` in `run` (reusing finished ones); return {stage name: its result}."""
    done: dict[str, StageResult] = {}
    for spec in pipeline.stages:
        folders = {i: done[src].folder for i, src in spec.inputs.items()}
        identity = stage_identity(spec.config, {i: f.name for i, f in folders.items()})
        kind = spec.stage_kind

        def build(out: Path, kind=kind, spec=spec, folders=folders) -> dict | None:
            return kind.run(spec.config, out, **folders, log=run.log, progress=run.progress)

        done[spec.name] = StageResult(*run.stage(spec.name, identity, build))
        check_unchanged(kind, spec.config, done[spec.name])
    return done


def check_unchanged(kind: StageKind, config: Any, result: StageResult) -> None:
    """Refuse to reuse a finished stage whose files outside the run have changed since it ran."""
    changed = kind.changed(config, result.info) if kind.changed else []
    if changed:
        raise GeoTokenError(
            f"{result.folder} was built from files that have changed since: {'; '.join(changed)}. "
            f"Run into a new --run-dir, or delete that folder to rebuild it (and what depends on it)"
        )

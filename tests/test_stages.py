"""The stage runner: derived identities, pipelines as data, content-hashed folders and their reuse."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from geotoken.data.earthviews import PRESETS as EV_PRESETS
from geotoken.errors import GeoTokenError
from geotoken.io import sha256_json
from geotoken.pipeline import demo_config, demo_earthviews, demo_pipeline
from geotoken.stages import (
    STAGES,
    DataStageConfig,
    Pipeline,
    Run,
    StageSpec,
    config_from_dict,
    run_pipeline,
    runtime_field,
    stage_identity,
    stage_kind,
)


@dataclass(frozen=True)
class CountConfig:
    n: int = 3
    words: tuple[str, ...] = ("a",)
    workers: int = runtime_field(1)


@dataclass(frozen=True)
class SumConfig:
    scale: int = 1
    inner: CountConfig = field(default_factory=CountConfig)


CALLS: list[str] = []


def count(config: CountConfig, out: Path, *, log=print, progress=True) -> dict:
    CALLS.append("count" if progress else "count quietly")
    (out / "numbers.json").write_text(json.dumps(list(range(config.n))))
    return {"n": config.n}


def total(config: SumConfig, out: Path, *, numbers: Path, log=print, progress=True) -> dict:
    CALLS.append("sum")
    value = config.scale * sum(json.loads((numbers / "numbers.json").read_text()))
    (out / "sum.txt").write_text(str(value))
    return {"sum": value}


@pytest.fixture
def toy_kinds(monkeypatch):
    """Two toy kinds registered for one test (the registry is restored afterwards)."""
    monkeypatch.setattr("geotoken.stages.runner.STAGES", dict(STAGES))
    stage_kind("toy-count", CountConfig)(count)
    stage_kind("toy-sum", SumConfig)(total)
    CALLS.clear()


def toy_pipeline(n: int = 3, scale: int = 1, workers: int = 1) -> Pipeline:
    return Pipeline((
        StageSpec("numbers", "toy-count", CountConfig(n=n, workers=workers)),
        StageSpec("sum", "toy-sum", SumConfig(scale=scale), {"numbers": "numbers"}),
    ))  # fmt: skip


def test_identity_is_the_config_without_runtime_fields_plus_the_input_folders():
    assert stage_identity(CountConfig(n=2, workers=7), {}) == {"n": 2, "words": ("a",)}
    ident = stage_identity(SumConfig(), {"numbers": "numbers-0123"})
    assert ident == {"scale": 1, "inner": {"n": 3, "words": ("a",), "workers": 1}, "numbers": "numbers-0123"}
    with pytest.raises(GeoTokenError, match="names of stage inputs"):
        stage_identity(SumConfig(), {"scale": "x"})
    # the demo's data stage has the same identity (so the same folder) as before the stages were functions
    cfg = demo_config("fast")
    spec = demo_pipeline(cfg)["data"]
    assert stage_identity(spec.config, {}) == {"earthviews": demo_earthviews(cfg).to_dict()}


def test_a_quiet_run_tells_every_stage_to_draw_no_progress_bar(toy_kinds, tmp_path):
    run_pipeline(toy_pipeline(), Run(tmp_path, lambda s: None, progress=False))
    assert CALLS == ["count quietly", "sum"]
    with pytest.raises(TypeError, match="'toy-loud': count_loudly must take keyword-only log and progress"):

        def count_loudly(config: CountConfig, out: Path, *, log=print) -> dict:
            return {}

        stage_kind("toy-loud", CountConfig)(count_loudly)


def test_a_run_reuses_finished_stages_and_redoes_what_depends_on_a_change(toy_kinds, tmp_path):
    logs: list[str] = []
    first = run_pipeline(toy_pipeline(), Run(tmp_path, logs.append))
    assert CALLS == ["count", "sum"] and (first["sum"].folder / "sum.txt").read_text() == "3"
    record = json.loads((first["sum"].folder / "stage.json").read_text())
    assert record["identity"]["numbers"] == first["numbers"].folder.name and record["info"] == {"sum": 3}

    CALLS.clear()
    run = Run(tmp_path, logs.append)
    again = run_pipeline(toy_pipeline(workers=4), run)  # a runtime field: nothing to redo
    assert CALLS == [] and [r.folder for r in again.values()] == [r.folder for r in first.values()]
    assert set(run.stages) == {"numbers", "sum"}
    assert logs[-2:] == [
        f"[numbers] reused {first['numbers'].folder.name}",
        f"[sum] reused {first['sum'].folder.name}",
    ]

    run_pipeline(toy_pipeline(scale=2), Run(tmp_path, logs.append))  # only the stage that changed
    assert CALLS == ["sum"]
    CALLS.clear()
    changed = run_pipeline(toy_pipeline(n=4), Run(tmp_path, logs.append))  # and everything downstream
    assert CALLS == ["count", "sum"] and changed["sum"].info == {"sum": 6}
    assert (
        changed["sum"].folder != first["sum"].folder and (first["sum"].folder / "sum.txt").read_text() == "3"
    )


def test_a_pipeline_is_plain_data(toy_kinds):
    pipeline = toy_pipeline(n=5)
    d = json.loads(json.dumps(pipeline.to_dict()))
    assert d["stages"][1] == {"name": "sum", "kind": "toy-sum", "inputs": {"numbers": "numbers"},
                              "config": {"scale": 1, "inner": {"n": 3, "words": ["a"], "workers": 1}}}  # fmt: skip
    assert Pipeline.from_dict(d) == pipeline
    short = {"stages": [{"name": "numbers", "kind": "toy-count", "config": {"n": 5}},
                        {"name": "sum", "kind": "toy-sum", "inputs": ["numbers"]}]}  # fmt: skip
    assert Pipeline.from_dict(short) == pipeline
    nested = config_from_dict(SumConfig, {"inner": {"words": ["x", "y"]}})
    assert nested == SumConfig(inner=CountConfig(words=("x", "y")))
    demo = demo_pipeline(demo_config("fast"))
    assert Pipeline.from_dict(json.loads(json.dumps(demo.to_dict()))) == demo


def test_bad_pipelines_are_rejected(toy_kinds):
    with pytest.raises(GeoTokenError, match="unknown kind"):
        StageSpec("x", "nope", CountConfig())
    with pytest.raises(GeoTokenError, match="takes a CountConfig"):
        StageSpec("x", "toy-count", SumConfig())
    with pytest.raises(GeoTokenError, match=r"reads \['numbers'\]"):
        StageSpec("x", "toy-sum", SumConfig(), {})
    with pytest.raises(GeoTokenError, match="which no earlier stage is"):
        Pipeline((StageSpec("sum", "toy-sum", SumConfig(), {"numbers": "numbers"}),))
    with pytest.raises(GeoTokenError, match="two stages named"):
        Pipeline((StageSpec("a", "toy-count", CountConfig()), StageSpec("a", "toy-count", CountConfig())))
    with pytest.raises(GeoTokenError, match="unknown CountConfig field"):
        Pipeline.from_dict({"stages": [{"name": "numbers", "kind": "toy-count", "config": {"m": 1}}]})


def test_the_demo_graph():
    pipeline = demo_pipeline(demo_config("fast", train_views=0))
    assert [(s.name, s.kind) for s in pipeline.stages] == [
        ("data", "data"), ("features", "features"), ("align", "align"), ("index", "index"),
        ("model", "model"), ("bundle", "bundle"), ("eval", "evaluate"),
    ]  # fmt: skip
    assert dict(pipeline["eval"].inputs) == {s: s for s in ("data", "features", "align", "index", "bundle")}
    assert pipeline["model"].config.queries == "gallery" == pipeline["bundle"].config.reward_queries
    assert pipeline["features"].config.image_size == EV_PRESETS["tiny"].image_size
    assert isinstance(pipeline["data"].config, DataStageConfig)
    assert set(STAGES) >= {"data", "features", "align", "index", "model", "bundle", "evaluate"}


def test_a_stage_folder_has_one_builder_at_a_time(tmp_path):
    """A second run into the same folder, while the first builds a stage, is refused (it would resume the
    first's half-written files under it), naming the folder; once the first is done, it reuses the stage."""
    said = []

    def build(out: Path) -> dict:
        with pytest.raises(
            GeoTokenError, match=r"stage folder .*s-[0-9a-f]{12}: another process is writing it"
        ):
            Run(tmp_path, said.append).stage("s", {"n": 1}, lambda out: {})
        (out / "part").write_text("half")
        return {"built": True}

    folder, record = Run(tmp_path, said.append).stage("s", {"n": 1}, build)
    assert record["info"] == {"built": True} and not list(tmp_path.glob(".*.lock"))
    again, _ = Run(tmp_path, said.append).stage("s", {"n": 1}, lambda out: 1 / 0)
    assert again == folder and said[-1] == f"[s] reused {folder.name}"


def test_a_stage_that_fails_before_writing_leaves_no_folder_and_one_that_wrote_keeps_it(tmp_path):
    def fail(out: Path) -> dict:
        raise GeoTokenError("bad option")

    def half(out: Path) -> dict:
        (out / "part").write_text("resume me")
        raise KeyboardInterrupt

    with pytest.raises(GeoTokenError):
        Run(tmp_path, lambda s: None).stage("s", {"n": 1}, fail)
    assert not list(tmp_path.glob("s-*"))
    with pytest.raises(KeyboardInterrupt):
        Run(tmp_path, lambda s: None).stage("s", {"n": 2}, half)
    (kept,) = tmp_path.glob("s-*")
    assert (kept / "part").is_file() and not (kept / "stage.json").exists()


def test_the_evaluate_stage_names_a_split_the_data_stage_did_not_make(tmp_path):
    from geotoken.stages.method import EvalStageConfig, evaluate_bundle

    for split in ("gallery", "test", "test_disjoint"):
        (tmp_path / "align" / split).mkdir(parents=True)
        (tmp_path / "align" / split / "store.json").write_text("{}")
    folders = {k: tmp_path / k for k in ("data", "features", "align", "index", "bundle")}
    with pytest.raises(
        GeoTokenError, match=r"no split 'tset'; the data stage made \['test', 'test_disjoint'\]"
    ):
        evaluate_bundle(EvalStageConfig(splits=("tset", "test")), tmp_path / "out", **folders, log=print)


def test_a_recipe_file_edited_in_place_changes_the_model_stages_identity(tmp_path):
    from geotoken.stages.method import ModelStageConfig
    from geotoken.stages.runner import stage_identity

    recipe = tmp_path / "mine.yaml"
    recipe.write_text("weight_decay: 0.01\n")
    before = sha256_json(stage_identity(ModelStageConfig(recipe=str(recipe)), {"align": "a", "index": "i"}))
    recipe.write_text("weight_decay: 0.5\n")
    after = sha256_json(stage_identity(ModelStageConfig(recipe=str(recipe)), {"align": "a", "index": "i"}))
    assert before != after
    plain = stage_identity(ModelStageConfig(), {"align": "a", "index": "i"})
    assert "recipe_fields" not in plain and "recipe" not in plain  # no recipe: the identity of earlier runs


def test_the_evaluate_stage_is_keyed_by_how_its_intervals_are_computed():
    """An evaluation scored by the percentile bootstrap (before Wilson) is not reused as if it were this one."""
    from geotoken.evaluate.metrics import INTERVALS
    from geotoken.stages.method import EvalStageConfig
    from geotoken.stages.runner import stage_identity

    assert stage_identity(EvalStageConfig(), {})["intervals"] == INTERVALS

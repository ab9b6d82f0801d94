"""Run configs (`geotoken run CONFIG`): YAML stage graphs, ${NAME} variables, the dry-run plan, the packaged
configs (the demo's graph, the paper's), and the Table I layout of the `table` stage."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

import realdata
from geotoken.cli import main
from geotoken.data.manifest import read_manifest
from geotoken.errors import GeoTokenError
from geotoken.evaluate.evaluate import compact_neighbours
from geotoken.evaluate.metrics import Estimate, MethodMetrics
from geotoken.pipeline import demo_config, demo_pipeline
from geotoken.stages import AlignStageConfig, Run, run_pipeline
from geotoken.stages.config import (
    find_config,
    load_run_config,
    parse_assignments,
    pipeline_yaml,
    plan_run,
    plan_text,
)
from geotoken.stages.datasets import CONFIGS, paper_figures, table_markdown
from geotoken.stages.method import gallery_texts, texts_path

IM2GPS = """\
run_dir: {run_dir}
variables:
  ROOT: null
  N: 3
stages:
- name: data
  kind: dataset
  config:
    sources:
    - {{split: im2gps3k, format: im2gps3k, annotations: "${{ROOT}}/im2gps3k_places365.csv",
       images: "${{ROOT}}/images", limit: "${{N}}"}}
"""


def test_the_demo_config_is_the_demo_graph():
    cfg = load_run_config("demo")
    assert cfg.path == CONFIGS / "demo.yaml" and cfg.run_dir == "runs/demo"
    assert cfg.pipeline == demo_pipeline(demo_config("demo")), (
        "src/geotoken/configs/demo.yaml is not demo_pipeline(demo_config('demo')); regenerate it (see its header)"
    )
    assert load_run_config("configs/demo.yaml").pipeline == cfg.pipeline  # the packaged file by name


def test_the_small_demo_config_differs_from_the_demo_in_index_k_and_model_only():
    demo, small = load_run_config("demo"), load_run_config("demo-small")
    assert small.run_dir == demo.run_dir  # shares the demo's data, features and alignment folders
    a, b = ({s.name: s for s in c.pipeline.stages} for c in (demo, small))
    assert a.keys() == b.keys()
    changed = sorted(n for n in a if a[n] != b[n])
    assert changed == ["index", "model"]
    assert (b["index"].config.k, b["model"].config.preset, b["model"].config.dtype) == (15, "small", "bf16")


def test_pipeline_yaml_round_trips(tmp_path):
    fast = demo_pipeline(demo_config("fast", k=7, epochs=3))
    (tmp_path / "fast.yaml").write_text(pipeline_yaml(fast))
    assert load_run_config(tmp_path / "fast.yaml").pipeline == fast


def test_variables_come_from_set_then_environment_then_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(IM2GPS.format(run_dir=tmp_path / "run"))
    cfg = load_run_config(path, {"ROOT": "/a"}, environ={"ROOT": "/env", "N": "5"})
    source = cfg.pipeline["data"].config.sources[0]
    assert source.annotations == "/a/im2gps3k_places365.csv" and source.limit == 5  # a whole scalar: YAML
    assert cfg.variables == {"N": "5", "ROOT": "/a"}
    assert load_run_config(path, environ={"ROOT": "/env"}).pipeline["data"].config.sources[0].limit == 3
    with pytest.raises(
        GeoTokenError, match=r"variable\(s\) \['ROOT'\] have no value; give them: --set ROOT="
    ):
        load_run_config(path, environ={})
    with pytest.raises(GeoTokenError, match="--set \\['ROTO'\\]: no such variable"):
        load_run_config(path, {"ROOT": "/a", "ROTO": "/b"}, environ={})
    assert parse_assignments(["A=1", "B=x=y"]) == {"A": "1", "B": "x=y"}
    with pytest.raises(GeoTokenError, match="expected NAME=VALUE"):
        parse_assignments(["A"])
    with pytest.raises(GeoTokenError, match="no such config file"):
        find_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "value, message",
    [
        ("three", "expected int or null, got 'three'"),
        ('"3"', "expected int or null, got '3'"),
        ("2.5", "expected int or null, got 2.5"),
    ],
)
def test_a_config_value_of_the_wrong_type_is_an_error_naming_its_field(tmp_path, value, message):
    path = tmp_path / "c.yaml"
    path.write_text(IM2GPS.format(run_dir=tmp_path / "run").replace('"${{N}}"'.format(), value))
    with pytest.raises(GeoTokenError, match=rf"stage 'data'.sources\[0\].limit: {message}"):
        load_run_config(path, {"ROOT": "/a"}, environ={})
    for stages in (["data", "features"], [5]):
        (tmp_path / "s.yaml").write_text(yaml.safe_dump({"stages": stages}))
        with pytest.raises(GeoTokenError, match="pipeline: stage 0 is .*each stage is a mapping with 'name'"):
            load_run_config(tmp_path / "s.yaml", environ={})
    model = {"stages": [{"name": "model", "config": {"epochs": "1"}}]}
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(model))
    with pytest.raises(GeoTokenError, match="stage 'model'.epochs: expected int, got '1'"):
        load_run_config(tmp_path / "t.yaml", environ={})
    (tmp_path / "u.yaml").write_text(
        yaml.safe_dump({"stages": [{"name": "features", "confg": {"image_size": 64}}]})
    )
    with pytest.raises(GeoTokenError, match=r"stage 'features': unknown key\(s\) \['confg'\]; a stage has"):
        load_run_config(tmp_path / "u.yaml", environ={})
    (tmp_path / "v.yaml").write_text(yaml.safe_dump({"stage": [{"name": "features"}]}))
    with pytest.raises(GeoTokenError, match=r"v.yaml: unknown key\(s\) \['stage'\]; a run config has"):
        load_run_config(tmp_path / "v.yaml", environ={})


@pytest.mark.parametrize(
    "stage, config, message",
    [
        ("model", {"preset": "huge"}, "preset 'huge': choose from paper, small, tiny"),
        ("model", {"recipe": "nope"}, "recipe 'nope': neither a YAML file nor one of"),
        ("align", {"text_encoder": "bogus"}, "text_encoder 'bogus': choose from minilm, clip"),
        ("index", {"k": -1}, "k must be a whole number >= 1, got -1"),
        ("index", {"embedding": "visual+gsp"}, "embedding 'visual\\+gsp': aligned arrays"),
        ("evaluate", {"baselines": ["nn", "knnn"]}, "baselines \\['knnn'\\]: choose from prior, nn"),
        ("evaluate", {"strategies": ["greedy", "sampel"]}, "strategies \\['sampel'\\]: choose from greedy"),
        ("features", {"backbone": "resnet"}, "backbone 'resnet': choose from"),
    ],
)
def test_a_value_a_stage_would_refuse_is_refused_when_the_config_is_read(tmp_path, stage, config, message):
    """--dry-run reads the config: a bad name or number fails there, naming the file, stage and field,
    not when its stage runs after the earlier ones (days of embedding and training at paper scale)."""
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"stages": [{"name": stage, "config": config}]}))
    with pytest.raises(GeoTokenError, match=rf"c.yaml: stage '{stage}': {message}"):
        load_run_config(tmp_path / "c.yaml", environ={})


def test_the_plan_names_the_folders_the_run_writes_and_checks_paths(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(IM2GPS.format(run_dir=tmp_path / "run"))
    root = tmp_path / "im2gps3k"
    realdata.places365_test_set(root, "im2gps3k", 6, 5, extra_images=1)
    cfg = load_run_config(path, {"ROOT": str(root)})
    (plan,) = plan_run(cfg)
    assert not plan.done and plan.rows == {"im2gps3k": 3} and not plan.problems
    results = run_pipeline(cfg.pipeline, Run(cfg.run_dir, log=lambda s: None))
    assert results["data"].folder.name == plan.folder
    assert plan_run(cfg)[0].done and "done (reused)" in plan_text(cfg, plan_run(cfg))
    info = json.loads((results["data"].folder / "dataset.json").read_text())
    assert info["sizes"] == {"im2gps3k": 3} and info["sources"]["im2gps3k"]["images_without_label"] == 1

    assert main(["run", str(path), "--set", f"ROOT={tmp_path / 'missing'}", "--dry-run"]) == 2
    assert "PROBLEM: im2gps3k: annotations" in capsys.readouterr().out
    assert main(["run", str(path), "--set", f"ROOT={tmp_path / 'missing'}"]) == 2
    assert "does not exist" in capsys.readouterr().err
    # a holdout as large as its source (the paper's VAL_SIZE on a small copy): said before any stage runs
    held = yaml.safe_load(path.read_text().replace("${ROOT}", str(root)).replace('"${N}"', "100"))
    held["stages"][0]["config"]["holdout"] = {"split": "val", "source": "im2gps3k", "size": 5000}
    (tmp_path / "h.yaml").write_text(yaml.safe_dump(held))
    assert main(["run", str(tmp_path / "h.yaml"), "--dry-run"]) == 2
    out = capsys.readouterr().out
    assert "PROBLEM: holdout: val size 5,000 leaves nothing of im2gps3k's 6 annotation rows" in out
    assert "paper.yaml" not in out and "VAL_SIZE" not in out  # this config has no such variable
    assert "rows (at most): im2gps3k 0, val 6" in out  # not val 5,000 out of 6 rows


def test_the_paper_config_is_the_papers_setting():
    raw = yaml.safe_load(find_config("paper").read_text())
    stages = {s["name"]: s for s in raw["stages"]}
    assert stages["features"]["config"]["clip"] == "${CLIP}"
    assert raw["variables"]["CLIP"] == "openai/clip-vit-large-patch14"
    assert stages["data"]["config"]["sources"][0]["format"] == "mp16-pro"
    model = stages["model"]["config"]
    assert (model["k"], model["arch"], model["recipe"]) == (15, "authors", "paper")
    assert stages["index"]["config"]["k"] == 15 and stages["align"]["config"]["texts"] == "dataset"
    assert stages["eval"]["config"]["splits"] == ["im2gps3k", "yfcc4k"] == stages["table"]["config"]["splits"]
    cfg = load_run_config(
        "paper", {"MP16_ROOT": "/m", "IM2GPS3K_ROOT": "/i", "YFCC4K_ROOT": "/y"}, environ={}
    )
    assert [s.kind for s in cfg.pipeline.stages][-2:] == ["evaluate", "table"]
    stage = {s.name: s.config for s in cfg.pipeline.stages}
    assert tuple(stage["eval"].baselines) == ("nn", "knn", "geoclip")
    # a rehearsal with a stand-in CLIP drops GeoCLIP, which reads OpenAI's ViT-L/14 features only
    rehearsal = load_run_config(
        "paper",
        {"MP16_ROOT": "/m", "IM2GPS3K_ROOT": "/i", "YFCC4K_ROOT": "/y", "BASELINES": "[nn, knn]"},
        environ={},
    )
    assert tuple({s.name: s.config for s in rehearsal.pipeline.stages}["eval"].baselines) == ("nn", "knn")
    m = stage["model"]
    assert (m.preset, m.epochs, m.batch_size, m.dtype, stage["features"].workers) == (
        "paper",
        50,
        2048,
        "bf16",
        8,
    )
    sources = {s.split: s for s in stage["data"].sources}  # the downloads' own layouts by default
    assert sources["gallery"].annotations == "/m/metadata/MP16_Pro_places365.csv"
    assert sources["gallery"].images == "/m/mp-16-images.tar"
    assert (sources["im2gps3k"].images, sources["yfcc4k"].images) == ("/i/im2gps3ktest.zip", "/y/yfcc4k.zip")
    # a rehearsal at toy size sets the sizes, typed as the fields they fill
    small = {"PRESET": "tiny", "EPOCHS": "2", "BATCH_SIZE": "64", "DTYPE": "fp32", "WORKERS": "0"}
    roots = {"MP16_ROOT": "/m", "IM2GPS3K_ROOT": "/i", "YFCC4K_ROOT": "/y"}
    stage = {
        s.name: s.config for s in load_run_config("paper", {**roots, **small}, environ={}).pipeline.stages
    }
    m = stage["model"]
    assert (m.preset, m.epochs, m.batch_size, m.dtype, stage["features"].workers) == (
        "tiny",
        2,
        64,
        "fp32",
        0,
    )


def test_the_papers_figures_are_the_reference_notes():
    table = paper_figures()
    rows = {r["system"]: r for r in table["rows"]}
    assert rows["GeoToken, no MLLM"]["im2gps3k"] == [16.8, 39.6, 53.8, 70.8, 85.0]
    assert rows["GeoToken, no MLLM"]["yfcc4k"] == [24.3, 35.3, 46.6, 64.2, 78.6]
    assert rows["GeoCLIP"]["im2gps3k"] == [14.1, 34.5, 50.7, 69.7, 83.8]
    assert rows["GeoToken + MLLM, free generation"]["yfcc4k"] == [25.4, 38.5, 51.4, 68.0, 81.0]
    assert len(rows) == 6 and "2511.01082" in table["source"]


def test_table_one_layout_puts_both_test_sets_side_by_side():
    def metrics(share):
        acc = {float(t): Estimate(share, share - 0.01, share + 0.02) for t in (1, 25, 200, 750, 2500)}
        return MethodMetrics(10, acc, Estimate(5, 4, 6), Estimate(7, 6, 8))

    results = {"im2gps3k": {"geotoken greedy": metrics(0.5)}, "yfcc4k": {"geotoken greedy": metrics(0.25)}}
    names = {"im2gps3k": "Im2GPS3k (n = 10)", "yfcc4k": "YFCC4k (n = 10)"}
    text = table_markdown(results, names, ["- note"], paper_figures())
    header, _, ours, *paper = [line for line in text.splitlines() if line.startswith("|")]
    assert header.split(" | ")[1] == "Im2GPS3k (n = 10) 1 km" and "YFCC4k (n = 10) 2500 km" in header
    assert (
        ours.split(" | ")[1:3] == ["50.0 [49.0, 52.0]", "50.0 [49.0, 52.0]"] and "25.0 [24.0, 27.0]" in ours
    )
    assert (
        paper[2].startswith("| GeoToken, no MLLM (paper) | 16.8 | 39.6")
        and "95% confidence intervals (accuracy: Wilson" in text
    )
    assert "Im2GPS3k (n = 10) median km | YFCC4k (n = 10) 1 km" in header
    assert ours.split(" | ")[6] == "5 [4, 6]" and paper[2].split(" | ")[6] == "-"
    assert text.rstrip().endswith("- note")


def test_align_takes_the_data_stages_texts(tmp_path):
    store = SimpleNamespace(ids=["b", "a"])
    (tmp_path / "gallery.texts.csv").write_text("id,text\na,in Paris\nb,in Kyoto\n")
    assert texts_path(tmp_path, "gallery").is_file()
    assert gallery_texts(AlignStageConfig(), tmp_path, store) == ["in Kyoto", "in Paris"]
    assert gallery_texts(AlignStageConfig(texts="places"), tmp_path, store) is None
    assert gallery_texts(AlignStageConfig(), tmp_path / "x", store) is None  # auto: none written
    with pytest.raises(GeoTokenError, match="wrote no texts"):
        gallery_texts(AlignStageConfig(texts="dataset"), tmp_path / "x", store)


def test_manifest_format_writes_manifest_texts_and_report(tmp_path, capsys):
    path, images, ids = realdata.mp16(tmp_path / "pro", 8, pro=True, missing=1)
    out = tmp_path / "out" / "mp16.csv"
    args = ["manifest", str(path), "--format", "mp16-pro", "--image-root", str(images), "-o", str(out)]
    assert main([*args, "--holdout", "2"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 5 rows to" in printed and "wrote 2 rows to" in printed
    assert (tmp_path / "out" / "mp16.texts.csv").read_text().count("a photo taken in") == 5
    assert len(read_manifest(tmp_path / "out" / "val.csv")) == 2
    assert ids[7] in (tmp_path / "out" / "mp16.report.csv").read_text()
    # each call's summary is named after its split: a second split written beside it keeps the first's
    other = ["manifest", str(path), "--format", "mp16-pro", "--image-root", str(images), "-o"]
    assert main([*other, str(tmp_path / "out" / "more.csv")]) == 0
    assert "more.dataset.json" in capsys.readouterr().out
    first = json.loads((tmp_path / "out" / "mp16.dataset.json").read_text())
    assert first["sizes"] == {"mp16": 5, "val": 2} and not (tmp_path / "out" / "dataset.json").exists()
    assert json.loads((tmp_path / "out" / "more.dataset.json").read_text())["sizes"] == {"more": 7}
    assert main([*other, str(tmp_path / "out" / "plain.csv")]) == 0 and "hint" not in capsys.readouterr().out
    other[3] = "mp16"  # MP16-Pro's csv read as plain MP16: its place texts would be dropped without a word
    assert main([*other, str(tmp_path / "out" / "plain.csv")]) == 0
    assert "hint: this file has MP16-Pro's place columns" in capsys.readouterr().out
    assert main([*args, "--check-images", "decode"]) == 2  # not silently ignored
    assert "--check-images is for plain annotation files" in capsys.readouterr().err
    assert main(["manifest", str(path), "--holdout", "2", "-o", str(tmp_path / "plain.csv")]) == 2
    assert "--holdout needs --format" in capsys.readouterr().err
    # the held-out split's files are written beside -o: one that is an input (val.csv here) is refused
    inside = tmp_path / "pro" / "val.csv"
    inside.write_bytes(path.read_bytes())
    argv = ["manifest", str(inside), "--format", "mp16-pro", "--image-root", str(images), "-o"]
    assert main([*argv, str(tmp_path / "pro" / "train.csv"), "--holdout", "2"]) == 2
    assert "val.csv: named as an output and as an input" in capsys.readouterr().err


def test_neighbour_tables_follow_the_splits_without_their_unreadable_images():
    rows = np.array([[0, 3], [2, -1], [3, 0]])
    sims = np.array([[0.9, 0.8], [0.7, -np.inf], [0.6, 0.5]], dtype=np.float32)
    query_valid, gallery_valid = np.array([True, False, True]), np.array([True, False, True, True])
    r, s = compact_neighbours(rows, sims, query_valid, gallery_valid)
    assert r.tolist() == [[0, 2], [2, 0]] and s.tolist() == sims[[0, 2]].tolist()
    assert compact_neighbours(rows, sims, np.ones(3, bool), np.ones(4, bool))[0] is rows


def test_demo_sizes_are_checked_before_any_stage_runs():
    for bad in ({"n_test": 0}, {"k": 0}, {"epochs": 0}, {"dataset_size": -1}):
        with pytest.raises(GeoTokenError, match=f"demo option {next(iter(bad))} .* must be >= "):
            demo_config("fast", **bad)
    assert demo_config("full").n_test is None  # None: the dataset preset's own size


def test_the_dry_run_flags_a_geoclip_baseline_over_other_clip_features(tmp_path):
    """GeoCLIP reads OpenAI's ViT-L/14 features only: with another CLIP the eval stage would fail after
    every other stage had run (hours at MP16's size), so the plan says so first."""
    from geotoken.testing import tiny_clip

    tiny = tiny_clip(tmp_path / "tiny")
    roots = {"MP16_ROOT": "/m", "IM2GPS3K_ROOT": "/i", "YFCC4K_ROOT": "/y", "CLIP": str(tiny)}

    def problems(**more):
        plans = plan_run(load_run_config("paper", {**roots, **more}, environ={}))
        return [p for plan in plans if plan.name == "eval" for p in plan.problems]

    assert any(
        "the geoclip baseline cannot read these features" in p and "hidden_size 32" in p for p in problems()
    )
    assert problems(BASELINES="[nn, knn]") == []
    assert problems(CLIP="openai/clip-vit-large-patch14") == []


def test_clip_weights_missing_from_the_hub_cache_are_said_by_the_dry_run(tmp_path, monkeypatch):
    """The features stage would retry the Hub for the weights after the dataset stage read every image."""
    import huggingface_hub.constants

    from geotoken.stages.config import _hub_note

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    problems: list[str] = []
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    assert "not in the Hugging Face cache: downloaded when the stage starts" in _hub_note(
        "org/clip", problems
    )
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert _hub_note("org/clip", problems) == "" and "HF_HUB_OFFLINE is set" in problems[0]
    (tmp_path / "clip").mkdir()
    assert _hub_note(str(tmp_path / "clip"), problems) == "" and len(problems) == 1  # a folder: read there


def test_a_new_run_summary_removes_the_report_of_an_earlier_run(tmp_path):
    from geotoken.stages.config import write_run_summary

    (tmp_path / "report.html").write_text("<html>the run before</html>")
    said = []
    write_run_summary(tmp_path, {"stages": {}}, said.append)
    assert json.loads((tmp_path / "run.json").read_text()) == {"stages": {}}
    assert not (tmp_path / "report.html").exists() and "reported an earlier run" in said[0]


def test_config_yaml_reads_exponent_floats_and_refuses_a_repeated_key(tmp_path):
    from geotoken.stages.config import load_run_config

    path = tmp_path / "run.yaml"
    stages = "stages:\n  - name: features\n    kind: features\n    inputs: {}\n    config: {image_size: 64, image_size: 96}\n"
    path.write_text(stages)
    with pytest.raises(
        GeoTokenError, match=r"run.yaml: not valid YAML: key 'image_size' appears twice on line 5"
    ):
        load_run_config(path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("lr: 1e-3\nweight_decay: 5e-2\n")
    from geotoken.train.recipes import load_recipe

    assert load_recipe(recipe) == {"lr": 0.001, "weight_decay": 0.05}  # YAML 1.1 reads these as strings


def test_run_stages_refuses_a_plan_with_problems_before_any_stage(tmp_path):
    from geotoken.stages.config import RunConfig, run_stages
    from geotoken.stages.datasets import DatasetSource, DatasetStageConfig
    from geotoken.stages.runner import Pipeline, StageSpec

    source = DatasetSource("gallery", "csv", str(tmp_path / "nowhere.csv"), str(tmp_path))
    cfg = RunConfig(Pipeline((StageSpec("data", "dataset", DatasetStageConfig((source,))),)), str(tmp_path / "run"),
                    tmp_path / "x.yaml")  # fmt: skip
    with pytest.raises(GeoTokenError, match=r"x.yaml: \[data\] gallery: .*nowhere.csv does not exist"):
        run_stages(cfg, log=lambda s: None)
    assert not (tmp_path / "run").exists()  # nothing ran


def test_the_dry_run_flags_a_model_k_beyond_the_index_and_an_unknown_split():
    from geotoken.pipeline import demo_config, demo_pipeline
    from geotoken.stages.config import RunConfig, plan_run
    from geotoken.stages.runner import Pipeline, StageSpec

    pipeline = demo_pipeline(demo_config("fast"))

    def problems(**model):
        stages = tuple(
            StageSpec(s.name, s.kind, dataclasses.replace(s.config, **model), s.inputs)
            if s.kind == "model"
            else s
            for s in pipeline.stages
        )
        plans = plan_run(RunConfig(Pipeline(stages), "/nonexistent/run", Path("x.yaml")))
        return [x for p in plans if p.kind == "model" for x in p.problems]

    assert problems() == []
    assert any(
        "k 50 is more than the" in x and "neighbours per query of the index stage" in x
        for x in problems(k=50)
    )
    assert any("queries 'tarin': no such split" in x for x in problems(queries="tarin"))


def test_the_table_of_other_test_sets_has_no_paper_rows_and_points_only_at_reports_that_exist(tmp_path):
    from geotoken.evaluate.metrics import bootstrap_metrics
    from geotoken.stages.datasets import TableStageConfig, paper_table

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dataset.json").write_text(
        json.dumps({"sizes": {"test": 3}})
    )  # EarthViews: no reports
    (tmp_path / "eval" / "test").mkdir(parents=True)
    knn = bootstrap_metrics(np.array([1.0, 30.0, 3000.0]), n_boot=10).to_dict()
    (tmp_path / "eval" / "test" / "metrics.json").write_text(
        json.dumps({"methods": {"knn": knn}, "queries": {"rows": 3}})
    )
    paper_table(TableStageConfig(splits=("test",)), tmp_path / "out", data=tmp_path / "data", evaluate=tmp_path / "eval",
                log=lambda s: None)  # fmt: skip
    text = (tmp_path / "out" / "table.md").read_text()
    assert "(paper)" not in text and "| knn |" in text and "test (n = 3) 1 km" in text
    assert "details:" not in text  # no test.report.csv in that data stage's folder

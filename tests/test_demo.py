"""`geotoken demo --fast`: every stage of the method on a tiny offline build, then a second run reuses them."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from geotoken.cli import main
from geotoken.features import FeatureStore
from geotoken.pipeline import DemoConfig, demo_config, run_demo

pytestmark = pytest.mark.slow  # the whole method, twice


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo")
    with pytest.MonkeyPatch.context() as mp:  # a relative --run-dir, as users type it
        mp.chdir(folder)
        assert main(["demo", "--fast", "--run-dir", "run"]) == 0
    return folder / "run"


def test_fast_demo_runs_every_stage_and_writes_the_report(fast_run):
    summary = json.loads((fast_run / "run.json").read_text())
    assert set(summary["stages"]) == {"data", "features", "align", "index", "model", "bundle", "eval"}
    for split, folder in summary["eval"].items():
        metrics = json.loads((Path(folder) / "metrics.json").read_text())
        labels = set(metrics["methods"])
        assert {
            "prior",
            "nn",
            "knn",
            "cells",
            "gps-gallery",
            "geotoken greedy",
            "geotoken greedy+gallery",
        } <= labels
        assert any(label.startswith("geotoken beam") for label in labels)
        assert any(label.endswith("+reward+gallery") for label in labels)
        # greedy both ways (free, as the paper's authors decode, and gallery-constrained); search rows constrained
        free = {lab for lab in labels if lab.startswith("geotoken") and not lab.endswith("+gallery")}
        assert free == {"geotoken greedy"}, split
        assert metrics["methods"]["geotoken greedy"]["config"]["constrain"] is False
    assert len(summary["samples"]) == 2 and all(s["candidates"] for s in summary["samples"])
    html = (fast_run / "report.html").read_text()
    assert "geotoken greedy+gallery" in html and "https://" not in html
    assert "Accuracy" in html or "accuracy" in html
    assert "field 'eval'" not in html and "Missing" not in html  # the evaluation was found and rendered


def test_second_run_reuses_every_stage(fast_run, capsys):
    assert main(["demo", "--fast", "--run-dir", str(fast_run)]) == 0
    out = capsys.readouterr().out
    for stage in ("data", "features", "align", "index", "model", "bundle", "eval"):
        assert f"[{stage}] reused" in out
    assert f"[{stage}] running" not in out


def test_changing_training_redoes_only_what_depends_on_it(fast_run, capsys):
    assert main(["demo", "--fast", "--run-dir", str(fast_run), "--epochs", "1", "--no-report"]) == 0
    out = capsys.readouterr().out
    for stage in ("data", "features", "align", "index"):
        assert f"[{stage}] reused" in out
    for stage in ("model", "bundle", "eval"):
        assert f"[{stage}] running" in out


def test_a_quiet_run_draws_no_progress_bars(fast_run, capfd):
    """`Run(progress=False)` (here through `run_demo`): the stages that run (training, the reward scorer,
    calibration, evaluation) say their lines through `log` and draw no progress bar on stderr."""
    said: list[str] = []
    cfg = dataclasses.replace(demo_config("fast"), label_smoothing=0.05)  # this test's own model stage on
    run_demo(cfg, fast_run, report=False, log=said.append, progress=False)
    assert "[model] running" in "\n".join(said) and "[eval] running" in "\n".join(said)
    captured = capfd.readouterr()
    assert "%|" not in captured.err and "it/s" not in captured.err, captured.err[-500:]


def test_stages_only_write_their_own_folders(fast_run):
    """The aligned arrays live in the align stage's stores; the feature stores keep only what embed wrote."""
    stages = json.loads((fast_run / "run.json").read_text())["stages"]
    feats, aligned = fast_run / stages["features"]["folder"], fast_run / stages["align"]["folder"]
    splits = ["gallery", "test", "test_disjoint", "test_shift", "train", "val"]
    assert sorted(p.name for p in feats.iterdir() if p.is_dir()) == splits
    for split in splits:
        assert list(FeatureStore.open(feats / split)) == ["features"]
        assert not (feats / split / "aligned_by.json").exists()
        store = FeatureStore.open(aligned / split)
        assert sorted(store) == ["gps", "text", "visual"] and store.header["aligned_from"] == str(
            feats / split
        )


def test_unknown_options_are_rejected():
    with pytest.raises(ValueError, match="unknown demo preset"):
        demo_config("huge")
    with pytest.raises(ValueError, match="unknown demo option"):
        demo_config("demo", colour="blue")
    assert isinstance(demo_config(), DemoConfig)


def test_bundle_command_assembles_the_stages_for_predict(fast_run, tmp_path, capsys):
    summary = json.loads((fast_run / "run.json").read_text())
    stage = {name: fast_run / info["folder"] for name, info in summary["stages"].items()}
    out = tmp_path / "bundle"
    args = ["bundle", "--model", str(stage["model"] / "best"), "--align", str(stage["align"] / "heads"),
            "--gallery", str(stage["align"] / "gallery"), "--index", str(stage["index"] / "index"), "-o", str(out)]  # fmt: skip
    assert main(args) == 0
    image = summary["samples"][0]["image"]
    capsys.readouterr()
    assert main(["predict", image, "--model", str(out), "--top-k", "2", "--json"]) == 0
    assert '"candidates"' in capsys.readouterr().out
    wrong = [*args[:-1], str(tmp_path / "b2")]
    wrong[wrong.index("--gallery") + 1] = str(stage["align"] / "test")  # a store the index was not built on
    assert main(wrong) == 2


def test_the_model_trains_on_photo_like_views_that_never_see_their_own_place(fast_run):
    stages = json.loads((fast_run / "run.json").read_text())["stages"]
    feats, index = fast_run / stages["features"]["folder"], fast_run / stages["index"]["folder"]
    aligned = fast_run / stages["align"]["folder"]
    train, gallery = FeatureStore.open(aligned / "train"), FeatureStore.open(aligned / "gallery")
    assert train.rows == 2 * gallery.rows  # two views of every gallery place
    assert sorted({i.rsplit("-t", 1)[0] for i in train.ids}) == sorted(gallery.ids)
    assert train.ids == FeatureStore.open(feats / "train").ids
    config = json.loads((index / "train" / "neighbours.json").read_text())["config"]
    assert config["exclude_same_place"] and config["queries"]["store"] == str(aligned / "train")
    rows = np.load(index / "train" / "index.npy")
    own = np.asarray(train.coords)[:, None, :] == np.asarray(gallery.coords)[rows]
    assert (rows >= 0).all() and not own.all(axis=-1).any()
    model = json.loads((fast_run / stages["model"]["folder"] / "run.json").read_text())
    assert model["sources"]["queries"] == "train"

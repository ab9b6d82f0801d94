"""`geotoken report`: a self-contained HTML page from a small, well-formed run folder made here."""

import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from geotoken.cli import main
from geotoken.errors import GeoTokenError
from geotoken.report import build_report, write_report
from helpers import speckle_image

THRESHOLDS = [1, 25, 200, 750, 2500]
METHODS = {"knn": "15-NN vote", "geotoken beam5+logp": "beam+logp"}
EXTERNAL = re.compile(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", re.IGNORECASE)


def write_eval(folder, n=12, plots=True, seed=0):
    """metrics.json + predictions.csv (+ PNG plots) in the layout `geotoken evaluate` writes."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    lat, lon = rng.uniform(-60, 60, n), rng.uniform(-180, 180, n)
    lines = ["id,lat,lon,pred_lat,pred_lon,error_km,method,strategy"]
    methods = {}
    for k, (label, strategy) in enumerate(METHODS.items()):
        err = rng.uniform(0, 3000, n)
        for i in range(n):
            lines.append(
                f'q{i},{lat[i]:.6f},{lon[i]:.6f},{lat[i] + 1:.6f},{lon[i] - 1:.6f},{err[i]:.3f},{label},"{strategy}"'
            )
        acc = {f"{t:g}": {"value": float((err <= t).mean()), "lo": 0.0, "hi": 1.0} for t in THRESHOLDS}
        med = float(np.median(err))
        mean = float(err.mean())
        methods[label] = {"method": label.split()[0], "strategy": strategy, "n": n, "seconds": 0.5 + k,
                          "accuracy": acc, "median_km": {"value": med, "lo": med / 2, "hi": med * 2},
                          "mean_km": {"value": mean, "lo": mean / 2, "hi": mean * 2}}  # fmt: skip
    (folder / "predictions.csv").write_text("\n".join(lines) + "\n")
    methods["geotoken beam5+logp"]["calibration"] = {
        "within_200km": {"accuracy": 0.25, "mean_confidence": 0.5, "ece": 0.125}
    }
    methods["geotoken beam5+logp"]["config"] = {
        "calibration_fitted_for": {"strategy": "greedy+sample+retrieval"}
    }
    paired = [{"a": "geotoken beam5+logp", "b": "knn", "n": n, "median_km_diff": {"value": -12.0, "lo": -20.0, "hi": -4.0},
               "mean_km_diff": {"value": -10.0, "lo": -30.0, "hi": 10.0},
               "accuracy_diff": {f"{t:g}": {"value": 0.05, "lo": 0.01, "hi": 0.09} for t in THRESHOLDS}}]  # fmt: skip
    metrics = {"queries": {"rows": n}, "gallery": {"rows": 100}, "thresholds_km": THRESHOLDS,
               "bootstrap": {"n_boot": 10}, "methods": methods, "paired": paired}  # fmt: skip
    (folder / "metrics.json").write_text(json.dumps(metrics))
    if plots:
        Image.new("RGB", (60, 40), (200, 30, 30)).save(folder / "error_cdf.png")
        for label in METHODS:
            slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_")
            Image.new("RGB", (90, 45), (0, 40, 120)).save(folder / f"map_{slug}.png")
    return folder


def write_run(root, old_root="/no/such/old/run"):
    """A run folder as `geotoken demo` leaves it; its paths name where it was first written (old_root)."""
    write_eval(root / "eval-abc" / "test")
    speckle_image((48, 32), 50).save(root / "photo.jpg")
    (root / "table-abc").mkdir()
    (root / "table-abc" / "table.md").write_text(
        "| method | Im2GPS3k (n = 3) 1 km |\n|---|---|\n| knn <b> | 5.0 |\n"
    )
    cand = {"lat": 48.85, "lon": 2.35, "probability": 0.4, "cell": "47e66e", "place": {"city": "Paris", "country": "France"},
            "polygon": [[48.8, 2.3], [48.8, 2.4], [48.9, 2.4], [48.9, 2.3]], "level_confidence": [0.9, 0.7, 0.5]}  # fmt: skip
    summary = {
        "run_dir": old_root,
        "config": {"dataset": "tiny", "model_preset": "tiny", "strategies": ["greedy", "beam"]},
        "stages": {"eval": {"folder": "eval-abc", "built_seconds": 40.5}},
        "timings_s": {"data": 1.5, "eval": 2.25},
        "total_s": 3.75,
        "eval": {"test": f"{old_root}/eval-abc/test"},
        "tables": {"table": f"{old_root}/table-abc/table.md"},
        "samples": [
            {
                "id": "q7",
                "image": f"{old_root}/photo.jpg",
                "true": [48.0, 2.0],
                "error_km": 95.0,
                "candidates": [cand, {**cand, "lat": 45.76, "lon": 4.84}],
            }
        ],  # fmt: skip
    }
    (root / "run.json").write_text(json.dumps(summary))
    return root


def test_run_report_is_self_contained(tmp_path):
    root = write_run(tmp_path / "run")
    path = write_report(root)
    assert path == root / "report.html"
    text = path.read_text(encoding="utf-8")
    assert not EXTERNAL.search(text), EXTERNAL.search(text)
    assert "url(http" not in text and "@import" not in text
    assert '<table class="metrics">' in text
    for label in METHODS:
        assert label in text
    assert "250 km" not in text and all(f"<th>{t} km %</th>" in text for t in THRESHOLDS)
    assert re.search(r'<figure class="map"><img src="data:image/jpeg;base64,', text)  # the map, inlined
    assert re.search(r'<figure class="cdf"><img src="data:image/png;base64,', text)
    assert 'class="minimap"' in text and '--basemap:url("data:image/jpeg;base64,' in text  # Blue Marble once
    assert 'class="photo" src="data:image/jpeg;base64,' in text  # the moved run's photo was found
    assert "Paris, France" in text and "40.0%" in text and 'title="level 1: 70.0%"' in text
    assert "model_preset" in text and "3.75" in text and "eval-abc" in text
    assert (
        '<pre class="table">| method | Im2GPS3k (n = 3) 1 km |' in text and "knn &lt;b&gt;" in text
    )  # Table I
    assert "<tr><th>eval</th><td>40.50</td><td>2.25</td>" in text  # built in, and this run (a reuse)
    assert 'id="missing"' not in text
    assert (
        '<td class="sig">+5.0 <small>[+1.0, +9.0]</small></td>' in text and "<td>-12</td>" in text
    )  # paired
    assert "<td>200km</td><td>25.0</td><td>50.0</td><td></td><td>12.5</td>" in text  # calibration
    assert (
        "geotoken beam5+logp *</th>" in text
        and "<li>geotoken beam5+logp: calibrated under strategy greedy+sample+retrieval</li>" in text
    )
    assert build_report(root) == text  # a function of the files: the same bytes again


def test_eval_folder_report_regenerates_plots_and_lists_what_is_missing(tmp_path):
    folder = write_eval(tmp_path / "eval", plots=False)
    metrics = json.loads((folder / "metrics.json").read_text())
    metrics["queries"]["skipped"] = 1  # an image that could not be embedded: said beside n
    (folder / "metrics.json").write_text(json.dumps(metrics))
    text = build_report(folder)
    assert '<table class="metrics">' in text and "(1 unreadable images left out)" in text
    assert re.search(
        r'<figure class="map"><img src="data:image/jpeg;base64,', text
    )  # drawn from predictions.csv
    assert 'id="missing"' in text and "run.json" in text
    (folder / "predictions.csv").unlink()
    text = build_report(folder)
    assert "predictions.csv" in text and "error_cdf.png" in text and "map_*.png" in text  # listed as missing
    assert not EXTERNAL.search(text)


def test_missing_samples_and_eval_folder_are_reported(tmp_path):
    root = write_run(tmp_path / "run")
    summary = json.loads((root / "run.json").read_text())
    del summary["samples"]
    summary["eval"]["test_disjoint"] = f"{summary['run_dir']}/eval-abc/test_disjoint"
    (root / "run.json").write_text(json.dumps(summary))
    text = build_report(root)
    assert "samples" in text and "test_disjoint" in text and 'id="missing"' in text


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda m: m["methods"]["knn"].pop("median_km"), "methods.knn.median_km"),
        (lambda m: m["methods"]["knn"]["accuracy"].pop("200"), "methods.knn.accuracy.200"),
        (lambda m: m.__setitem__("methods", []), "'methods' should be an object"),
        (lambda m: m["methods"]["knn"]["accuracy"]["25"].__setitem__("value", "high"), "accuracy.25.value"),
        (lambda m: m["paired"][0].pop("accuracy_diff"), "paired[0].accuracy_diff"),
    ],
)
def test_malformed_metrics_is_an_error_naming_the_field(tmp_path, breakage, message):
    folder = write_eval(tmp_path / "eval")
    metrics = json.loads((folder / "metrics.json").read_text())
    breakage(metrics)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(GeoTokenError, match=re.escape(message)) as err:
        build_report(folder)
    assert "metrics.json" in str(err.value)


def test_malformed_files_are_errors(tmp_path):
    folder = write_eval(tmp_path / "eval")
    (folder / "metrics.json").write_text('{"methods": {')
    with pytest.raises(GeoTokenError, match=r"metrics.json: not valid JSON \(line 1"):
        build_report(folder)
    shutil.rmtree(folder)
    folder = write_eval(tmp_path / "eval")
    lines = (folder / "predictions.csv").read_text().splitlines()
    lines[2] = lines[2].replace(lines[2].split(",")[5], "far", 1)
    (folder / "predictions.csv").write_text("\n".join(lines))
    with pytest.raises(GeoTokenError, match=r"predictions.csv, row 3, field 'error_km': not a number: 'far'"):
        build_report(folder)
    (folder / "predictions.csv").write_text("id,lat\n")
    with pytest.raises(GeoTokenError, match="header"):
        build_report(folder)
    shutil.rmtree(folder)
    folder = write_eval(tmp_path / "eval")
    (folder / "error_cdf.png").write_bytes(b"GIF89a not a png")
    with pytest.raises(GeoTokenError, match="error_cdf.png: not a PNG"):
        build_report(folder)
    (tmp_path / "trained").mkdir()  # `geotoken train -o` writes a run.json of its own
    (tmp_path / "trained" / "run.json").write_text('{"model": {}, "train": {}, "world": 1}')
    with pytest.raises(GeoTokenError, match="the record of a training run"):
        build_report(tmp_path / "trained")
    shutil.rmtree(tmp_path / "trained")
    (tmp_path / "empty").mkdir()
    with pytest.raises(GeoTokenError, match="neither run.json"):
        build_report(tmp_path / "empty")
    # a run folder without run.json: the evaluation folders below it are named, not other metrics.json files
    (tmp_path / "model-1" / "best").mkdir(parents=True)
    (tmp_path / "model-1" / "best" / "metrics.json").write_text('{"val": {"median_km": 1}}')
    with pytest.raises(
        GeoTokenError, match=f"neither run.json .*evaluation folders, .*: {folder} \\(or rerun"
    ) as e:
        build_report(tmp_path)
    assert "model-1" not in str(e.value)


def test_cli(tmp_path, capsys):
    root = write_run(tmp_path / "run")
    out = tmp_path / "out" / "r.html"
    assert main(["report", str(root), "-o", str(out)]) == 0
    assert out.is_file() and str(out) in capsys.readouterr().out
    assert main(["report", str(tmp_path / "nowhere")]) == 2


def test_an_example_photo_with_a_hash_in_its_name_is_found(tmp_path):
    root = write_run(tmp_path / "run")
    (root / "ph").mkdir()
    (root / "photo.jpg").rename(root / "ph" / "#1.jpg")  # a plain file: '#' is no archive member here
    summary = json.loads((root / "run.json").read_text())
    summary["samples"][0]["image"] = "/no/such/old/run/ph/#1.jpg"
    (root / "run.json").write_text(json.dumps(summary))
    text = build_report(root)
    assert 'class="photo" src="data:image/jpeg;base64,' in text and "example image" not in text

"""`geotoken run` end to end on miniature real datasets in their downloaded layouts: MP16-Pro as img2dataset
shards (gallery, training set, validation held out of it), Im2GPS3k (an image without a label, an unreadable one) and YFCC4k
(rows without an image), a tiny random CLIP saved locally; the last stage prints Table I."""

from __future__ import annotations

import json

import numpy as np
import pytest

import realdata
from geotoken.cli import main
from geotoken.testing import tiny_clip

CONFIG = """\
run_dir: ${RUN}
stages:
- name: data
  kind: dataset
  config:
    sources:
    - {split: gallery, format: mp16-pro, annotations: "${MP16_ROOT}/MP16_Pro_places365.csv", images: "${MP16_ROOT}/shards"}
    - {split: im2gps3k, format: im2gps3k, annotations: "${IM2GPS3K_ROOT}/im2gps3k_places365.csv",
       images: "${IM2GPS3K_ROOT}/images"}
    - {split: yfcc4k, format: yfcc4k, annotations: "${YFCC4K_ROOT}/yfcc25600_places365.csv", images: "${YFCC4K_ROOT}/images"}
    holdout: {split: val, source: gallery, size: 24}
- name: features
  config: {backbone: clip, clip: "${CLIP}", batch_size: 64, workers: 0, skip_bad: true}
- name: align
  config: {epochs: 2, texts: dataset, text_encoder: minilm}
- name: index
  config: {k: 5}
- name: model
  config: {preset: tiny, epochs: 1, batch_size: 64, queries: gallery}
- name: bundle
  config: {reward_images: 40, reward_queries: gallery}
- name: eval
  kind: evaluate
  config: {splits: [im2gps3k, yfcc4k], baselines: [nn, knn], strategies: [greedy, sample], selectors: [logp],
           n_boot: 20}
- name: table
  inputs: {data: data, evaluate: eval}
"""


@pytest.mark.slow
def test_geotoken_run_from_real_layouts_to_table_one(tmp_path, capsys, offline_hub):
    realdata.mp16(tmp_path / "mp16pro", 160, pro=True, layout="shards", missing=3, corrupt=(7, 90))
    _, images, ids = realdata.places365_test_set(tmp_path / "im2gps3k", "im2gps3k", 20, 20, extra_images=1)
    (images / ids[3]).write_bytes(b"truncated")  # unreadable: skipped at embedding, and said so
    realdata.places365_test_set(tmp_path / "yfcc4k", "yfcc25600", 40, 15, seed=3)
    clip = tiny_clip(tmp_path / "clip")
    (tmp_path / "run.yaml").write_text(CONFIG)
    args = ["run", str(tmp_path / "run.yaml"), "--set", f"RUN={tmp_path / 'run'}", "--set", f"CLIP={clip}",
            "--set", f"MP16_ROOT={tmp_path / 'mp16pro'}", "--set", f"IM2GPS3K_ROOT={tmp_path / 'im2gps3k'}",
            "--set", f"YFCC4K_ROOT={tmp_path / 'yfcc4k'}"]  # fmt: skip
    assert main([*args, "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "rows (at most): gallery 136, im2gps3k 20, yfcc4k 40, val 24" in plan and "PROBLEM" not in plan

    assert main(args) == 0
    out = capsys.readouterr().out
    assert "Im2GPS3k (n = 19) 1 km" in out and "YFCC4k (n = 15) 2500 km" in out
    assert "1 unreadable images skipped at embedding" in out
    assert (
        "| GeoToken, no MLLM (paper) | 16.8 | 39.6 | 53.8 | 70.8 | 85.0 | - | 24.3 |" in out
    )  # (no median in the paper)
    assert (
        "left out: rows without an image: 25 (details" in out and "left out: images without a row: 1;" in out
    )
    rows = [line.split(" | ")[0] for line in out.splitlines() if line.startswith("| ")]
    assert {"| knn", "| geotoken greedy+gallery", "| geotoken sample10+logp+gallery"} <= set(rows)

    run = tmp_path / "run"
    data = next(run.glob("data-*"))
    assert json.loads((data / "dataset.json").read_text())["sizes"] == {"gallery": 133, "im2gps3k": 20,
                                                                         "yfcc4k": 15, "val": 24}  # fmt: skip
    summary = json.loads((run / "run.json").read_text())  # what `geotoken report RUN_DIR` reads
    assert set(summary["eval"]) == {"im2gps3k", "yfcc4k"} and set(summary["stages"]) >= {"data", "eval"}
    assert summary["config"]["variables"]["RUN"] == str(run)
    assert main(["report", str(run)]) == 0 and "report: " in capsys.readouterr().out
    html = (run / "report.html").read_text()
    assert "im2gps3k" in html and "yfcc4k" in html and "geotoken greedy+gallery" in html
    align = json.loads((next(run.glob("align-*")) / "heads" / "metrics.json").read_text())
    assert align["targets"]["unique_texts"] == 3  # MP16-Pro's three places, not offline place names

    assert main([*args]) == 0  # every stage reused, the same table
    again = capsys.readouterr().out
    assert again.split("\n\n", 1)[1] == out.split("\n\n", 1)[1]


RETRIEVAL_ONLY = """\
run_dir: ${RUN}
stages:
- name: data
  kind: dataset
  config:
    sources:
    - {split: gallery, format: mp16, annotations: "${MP16_ROOT}/mp16_places365.csv", images: "${MP16_ROOT}/images"}
    - {split: osv5m, format: osv5m, annotations: "${OSV_ROOT}/test.csv", images: "${OSV_ROOT}/images/test"}
- name: features
  config: {backbone: clip, clip: "${CLIP}", batch_size: 64, workers: 0}
- name: align
  config: {epochs: 1, text_encoder: minilm}
- name: index
  config: {k: 4}
"""


@pytest.mark.slow
def test_geotoken_run_from_mp16_folders_and_osv5m_zips_to_neighbours(tmp_path, capsys, offline_hub):
    """The two layouts the Table I run above does not read, through the same stages up to retrieval:
    MP16 as nested folders (images/8a/4c/ID.jpg), OSV-5M's test split as the downloaded zip archives."""
    realdata.mp16(tmp_path / "mp16", 40, layout="folders", missing=2)
    _, _, osv_ids = realdata.osv5m(tmp_path / "osv5m", "test", 6, zipped=True)
    clip = tiny_clip(tmp_path / "clip")
    (tmp_path / "run.yaml").write_text(RETRIEVAL_ONLY)
    args = ["run", str(tmp_path / "run.yaml"), "--set", f"RUN={tmp_path / 'run'}", "--set", f"CLIP={clip}",
            "--set", f"MP16_ROOT={tmp_path / 'mp16'}", "--set", f"OSV_ROOT={tmp_path / 'osv5m'}"]  # fmt: skip
    assert main(args) == 0
    run = tmp_path / "run"
    sizes = json.loads((next(run.glob("data-*")) / "dataset.json").read_text())["sizes"]
    assert sizes == {"gallery": 38, "osv5m": 6}  # the two MP16 rows without an image left out
    table = next(run.glob("index-*")) / "osv5m"
    index = np.load(table / "index.npy")
    assert index.shape == (6, 4) and ((0 <= index) & (index < 38)).all()
    ids = json.loads((next(run.glob("align-*")) / "osv5m" / "store.json").read_text())["ids"]
    assert ids == osv_ids


@pytest.mark.slow
def test_the_packaged_paper_config_rehearses_end_to_end_on_miniature_layouts(tmp_path, capsys, offline_hub):
    """`geotoken run paper` itself, as docs/datasets.md says to rehearse it: the paper's stages on small
    copies of MP16-Pro (one joined image tar, as the Hub's pieces make), Im2GPS3k (a zip) and YFCC4k,
    with a tiny stand-in CLIP (no tokenizer: TEXT_ENCODER=minilm) and small sizes."""
    realdata.mp16(tmp_path / "mp16pro", 160, pro=True, layout="flat-tar", missing=3)
    realdata.places365_test_set(tmp_path / "im2gps3k", "im2gps3k", 20, 20, zipped=True)
    realdata.places365_test_set(tmp_path / "yfcc4k", "yfcc25600", 40, 15, seed=3)
    clip = tiny_clip(tmp_path / "clip")
    sets = {"MP16_ROOT": tmp_path / "mp16pro", "MP16_CSV": "MP16_Pro_places365.csv",
            "IM2GPS3K_ROOT": tmp_path / "im2gps3k", "IM2GPS3K_IMAGES": "images.zip",
            "YFCC4K_ROOT": tmp_path / "yfcc4k", "YFCC4K_IMAGES": "images", "CLIP": clip, "TEXT_ENCODER": "minilm",
            "VAL_SIZE": 24, "PRESET": "tiny", "EPOCHS": 1, "BATCH_SIZE": 64, "DTYPE": "fp32", "WORKERS": 0,
            "BASELINES": "[nn, knn]"}  # fmt: skip
    args = ["run", "paper", "--run-dir", str(tmp_path / "run")]
    for name, value in sets.items():
        args += ["--set", f"{name}={value}"]
    assert main([*args, "--dry-run"]) == 0 and "PROBLEM" not in capsys.readouterr().out
    # the paper's BATCH_SIZE on this copy: said by the dry run, not by the model stage after the others
    assert main([*args, "--set", "BATCH_SIZE=2048", "--dry-run"]) == 2
    plan = capsys.readouterr().out
    assert "PROBLEM: batch_size 2,048 is more than the " in plan, plan[-2500:]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| method | Im2GPS3k (n = 20) 1 km |" in out and "YFCC4k (n = 15) 2500 km |" in out
    rows = {line.split(" | ")[0] for line in out.splitlines() if line.startswith("| ")}
    assert {
        "| nn",
        "| knn",
        "| geotoken greedy",
        "| geotoken beam5+reward",
        "| geotoken sample10+logp",
    } <= rows

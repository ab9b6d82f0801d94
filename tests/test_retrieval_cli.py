"""`geotoken index build|neighbours` on a small store with aligned arrays."""

from __future__ import annotations

import json

import numpy as np
import pytest

from geotoken.cli import main
from geotoken.retrieval import NeighbourIndex, NeighbourTable


def test_index_commands(tmp_path, capsys, feature_store):
    rng = np.random.default_rng(0)
    n = 3000
    arrays = {}
    for name, dim in (("visual", 16), ("gps", 8)):
        x = rng.standard_normal((n, dim))
        arrays[name] = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
    feature_store("s", arrays, ids=[f"i{r}" for r in range(n)])

    assert main(["index", "build", str(tmp_path / "s"), "-o", str(tmp_path / "flat"), "--threads", "1"]) == 0
    flat = NeighbourIndex.load(tmp_path / "flat")
    assert flat.dim == 24 and flat.meta["embedding"] == "visual+gps" and flat.size == n
    args = ["index", "build", str(tmp_path / "s"), "-o", str(tmp_path / "hnsw"), "--kind", "hnsw", "--embedding",
            "gps", "--recall-queries", "200", "--threads", "1"]  # fmt: skip
    assert main(args) == 0
    meta = json.loads((tmp_path / "hnsw" / "index.json").read_text())
    assert meta["recall_queries"] == 200 and 0.5 < meta["recall@15"] <= 1.0
    capsys.readouterr()
    # IVF-PQ on too few rows for the lists asked: what was built is said, not only in index.json
    ivf = ["index", "build", str(tmp_path / "s"), "-o", str(tmp_path / "ivf"), "--kind", "ivfpq", "--nlist", "1000",
           "--embedding", "gps", "--recall-queries", "50", "--threads", "1"]  # fmt: skip
    with pytest.warns(
        UserWarning, match=r"ivfpq index over 3,000 rows: recall@15_refine4 0\.\d+, so predictions"
    ):
        assert main(ivf) == 0  # a weak index on a small gallery: said, not only recorded in index.json
    said = capsys.readouterr().out
    nlist = json.loads((tmp_path / "ivf" / "index.json").read_text())["nlist"]
    assert nlist < 1000 and f"nlist {nlist} (fewer than asked: too few rows to train more), pq " in said

    out = tmp_path / "nbrs"
    assert (
        main(["index", "neighbours", str(tmp_path / "flat"), str(tmp_path / "s"), "-o", str(out), "-k", "5"])
        == 0
    )
    table = NeighbourTable.open(out)
    assert table.rows.shape == (n, 5) and not (table.rows == np.arange(n)[:, None]).any()
    assert (np.diff(table.sims, axis=1) <= 1e-6).all()
    assert (
        main(["index", "build", str(tmp_path / "s"), "-o", str(tmp_path / "x"), "--embedding", "text"]) == 2
    )
    assert "'text'" in capsys.readouterr().err


def test_the_run_stage_builds_its_index_as_the_command_does(tmp_path, feature_store, monkeypatch):
    """One builder (`build_store_index`): the stage's compressed index records its recall, and either names
    its gallery by an absolute path (the stage's was relative: it reopened only from the same folder)."""
    from geotoken.retrieval import build_store_index

    rng = np.random.default_rng(1)
    x = rng.standard_normal((2000, 8))
    feature_store("g", {"gps": (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)})
    from geotoken.features import FeatureStore

    monkeypatch.chdir(tmp_path)
    index = build_store_index(FeatureStore.open("g"), "gps", "hnsw", recall_k=5, recall_queries=100)
    assert index.meta["store"] == str(tmp_path / "g") and index.meta["recall_queries"] == 100
    assert 0.5 < index.meta["recall@5"] <= 1 and index.meta["build_seconds"] >= 0
    flat = build_store_index(FeatureStore.open("g"), "gps")
    assert "recall@15" not in flat.meta

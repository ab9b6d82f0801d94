"""`geotoken evaluate` end to end on small feature stores: files, tables, resume, plots, clear errors."""

import csv
import dataclasses
import json

import numpy as np
import pytest

from geotoken.cli import main
from geotoken.evaluate.evaluate import BASELINES, METHODS
from geotoken.evaluate.synthetic import synthetic_splits
from geotoken.features import FeatureStore
from helpers import write_store

# marks a folder of index.npy + sims.npy as a finished neighbour table (what `geotoken index neighbours` writes)
NEIGHBOURS_JSON = json.dumps({"format": "geotoken.neighbours", "version": 1, "config": {}})
ARGS = ["--n-boot", "200", "--cells-epochs", "12", "--cells-hidden", "64", "--cells-max-count", "100"]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    import torch

    from geotoken.encoders import load_gps_encoder

    root = tmp_path_factory.mktemp("stores")
    gallery, queries = synthetic_splits(n_gallery=800, n_queries=120, seed=3)
    # the query's GPS-aligned embedding: the real GeoCLIP encoder's embedding of a point ~30 km away
    rng = np.random.default_rng(0)
    jitter = torch.from_numpy(
        np.stack([queries.lat, queries.lon], 1) + rng.normal(0, 0.3, (len(queries), 2))
    ).float()
    with torch.no_grad():
        gps = torch.nn.functional.normalize(load_gps_encoder().eval()(jitter), dim=1).numpy()
    queries.arrays = {**queries.arrays, "gps": gps}
    g = write_store(
        root / "gallery", gallery.arrays, ids=gallery.ids, coords=np.stack([gallery.lat, gallery.lon], 1)
    )
    q = write_store(
        root / "queries", queries.arrays, ids=queries.ids, coords=np.stack([queries.lat, queries.lon], 1)
    )
    return g.root, q.root, queries


def test_method_names_match_cli():
    from geotoken.cli import evaluate as cli

    assert cli.METHODS == METHODS and cli.BASELINES == BASELINES


@pytest.mark.slow
def test_evaluate_all_baselines_writes_everything(stores, tmp_path, capsys):
    g, q, queries = stores
    out = tmp_path / "eval"
    assert main(["evaluate", "--gallery", str(g), "--queries", str(q), "-o", str(out), *ARGS]) == 0
    printed = capsys.readouterr().out
    assert "knn" in printed and "paired" in printed
    for f in ["metrics.json", "metrics.md", "predictions.csv", "error_cdf.png"] + [
        f"map_{m}.png" for m in BASELINES
    ]:
        path = out / f
        assert path.is_file() and path.stat().st_size > 0, f
    assert (out / "error_cdf.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "metrics.json").read_text())
    assert list(report["methods"]) == list(BASELINES)
    assert report["queries"]["rows"] == 120
    acc = {m: report["methods"][m]["accuracy"]["750"]["value"] for m in BASELINES}
    assert all(acc[m] > acc["prior"] for m in BASELINES if m != "prior"), acc
    assert [p["a"] for p in report["paired"]] == list(BASELINES[1:]) and {
        p["b"] for p in report["paired"]
    } == {"prior"}
    assert report["paired"][0]["accuracy_diff"]["750"]["lo"] > 0  # nn is significantly better than prior
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 120 * len(BASELINES)
    assert list(rows[0]) == ["id", "lat", "lon", "pred_lat", "pred_lon", "error_km", "method", "strategy"]
    assert rows[0]["id"] == queries.ids[0] and rows[0]["method"] == "prior"
    md = (out / "metrics.md").read_text()
    assert "| gps-gallery | 120 |" in md
    # a rerun reuses every method's cached predictions and gives the same numbers
    (out / "report.html").write_text("<html>the report of the evaluation before</html>")
    assert (
        main(["evaluate", "--gallery", str(g), "--queries", str(q), "-o", str(out), "--no-plots", *ARGS]) == 0
    )
    assert not (out / "report.html").exists()  # it showed the earlier evaluation beside this one's metrics
    again = json.loads((out / "metrics.json").read_text())
    assert all(again["methods"][m]["cached"] for m in BASELINES)
    assert again["methods"]["knn"]["accuracy"] == report["methods"]["knn"]["accuracy"]
    # the first run's plots are gone with it (the report would show maps of this run's methods only)
    assert not list(out.glob("map_*.png")) and not (out / "error_cdf.png").exists()
    assert (
        main(["evaluate", "--gallery", str(g), "--queries", str(q), "-o", str(out), "--method", "nn", *ARGS])
        == 0
    )
    assert sorted(p.name for p in out.glob("map_*.png")) == ["map_nn.png"]


def test_nn_searches_a_concatenation_as_an_index_does(stores, tmp_path, capsys):
    """--embedding visual+gps: the exact search over the joined unit vectors, which an index of the same
    spec searches (it was refused: "feature array 'visual+gps' is missing")."""
    from geotoken.errors import GeoTokenError
    from geotoken.evaluate.baselines import NearestNeighbour, RetrievalConfig, exact_neighbours
    from geotoken.retrieval.embeddings import join_embeddings

    gallery, queries = synthetic_splits(n_gallery=200, n_queries=30, seed=1)
    pred = NearestNeighbour(RetrievalConfig("visual+gps")).fit(gallery).predict(queries)
    joined = [join_embeddings([s.arrays["visual"], s.arrays["gps"]]) for s in (gallery, queries)]
    rows, _ = exact_neighbours(*joined, 1)
    np.testing.assert_array_equal(pred.lat, gallery.lat[rows[:, 0]])
    with pytest.raises(GeoTokenError, match="feature array 'gsp' is missing"):
        NearestNeighbour(RetrievalConfig("visual+gsp")).fit(gallery)
    # a part of other widths on the two sides is named before any method runs (this fixture's gps)
    g, q, _ = stores
    argv = [
        "evaluate",
        "--method",
        "nn",
        "--embedding",
        "visual+gps",
        "--gallery",
        str(g),
        "--queries",
        str(q),
    ]
    assert main([*argv, "-o", str(tmp_path / "e"), "--no-plots"]) == 2
    assert "array 'gps' is 64-d in" in capsys.readouterr().err


def test_evaluate_subset_reference_and_neighbour_table(stores, tmp_path):
    from geotoken.evaluate.baselines import exact_neighbours

    g, q, queries = stores
    gs, qs = FeatureStore.open(g), FeatureStore.open(q)
    rows, sims = exact_neighbours(gs["visual"], qs["visual"], 15)
    nb = tmp_path / "nbrs"
    nb.mkdir()
    np.save(nb / "index.npy", rows)
    np.save(nb / "sims.npy", sims)
    (nb / "neighbours.json").write_text(NEIGHBOURS_JSON)
    out = tmp_path / "eval"
    argv = ["evaluate", "--method", "nn", "knn", "--gallery", str(g), "--queries", str(q), "-o", str(out)]
    assert (
        main(
            [
                *argv,
                "--neighbours",
                str(nb),
                "--reference",
                "knn",
                "--limit",
                "50",
                "--no-plots",
                "--n-boot",
                "50",
            ]
        )
        == 0
    )
    report = json.loads((out / "metrics.json").read_text())
    assert report["methods"]["nn"]["n"] == 50
    assert report["paired"][0]["a"] == "nn" and report["paired"][0]["b"] == "knn"
    assert not (out / "error_cdf.png").exists()


def test_bad_inputs_are_one_line_errors(stores, tmp_path, capsys):
    g, q, _ = stores
    out = str(tmp_path / "x")
    assert (
        main(
            [
                "evaluate",
                "--method",
                "nn",
                "--embedding",
                "text",
                "--gallery",
                str(g),
                "--queries",
                str(q),
                "-o",
                out,
            ]
        )
        == 2
    )
    assert "'text' is missing" in capsys.readouterr().err
    assert main(["evaluate", "--gallery", str(tmp_path), "--queries", str(q), "-o", out]) == 2
    assert "not a feature store" in capsys.readouterr().err
    assert (
        main(["evaluate", "--method", "geotoken", "--gallery", str(g), "--queries", str(q), "-o", out]) == 2
    )
    assert "--model" in capsys.readouterr().err
    assert (
        main(
            [
                "evaluate",
                "--method",
                "nn",
                "--gallery",
                str(g),
                "--queries",
                str(q),
                "-o",
                out,
                "--reference",
                "knn",
            ]
        )
        == 2
    )
    assert "reference method 'knn'" in capsys.readouterr().err
    nb = tmp_path / "nb"
    nb.mkdir()
    np.save(nb / "index.npy", np.zeros((7, 3), dtype=np.int64))
    np.save(nb / "sims.npy", np.zeros((7, 3), dtype=np.float32))
    (nb / "neighbours.json").write_text(NEIGHBOURS_JSON)
    assert (
        main(
            [
                "evaluate",
                "--method",
                "nn",
                "--gallery",
                str(g),
                "--queries",
                str(q),
                "-o",
                out,
                "--neighbours",
                str(nb),
            ]
        )
        == 2
    )
    assert "7 neighbour rows for 120 queries" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("id,lat,lon\nwrong,0,0\n")
    assert (
        main(
            ["evaluate", "--gallery", str(g), "--queries", str(q), "--queries-manifest", str(bad), "-o", out]
        )
        == 2
    )
    assert "bad.csv" in capsys.readouterr().err


def test_cache_is_keyed_by_feature_content(tmp_path):
    from geotoken.evaluate.evaluate import EvalConfig, evaluate

    gallery, queries = synthetic_splits(n_gallery=300, n_queries=20, seed=4)
    cfg = EvalConfig(methods=("nn",), n_boot=10, plots=False)
    quiet = lambda *a: None  # noqa: E731
    assert not evaluate(gallery, queries, tmp_path, cfg, log=quiet).runs["nn"].cached
    assert evaluate(gallery, queries, tmp_path, cfg, log=quiet).runs["nn"].cached
    queries.arrays = {
        **queries.arrays,
        "visual": queries.arrays["visual"][::-1].copy(),
    }  # same ids, new features
    assert not evaluate(gallery, queries, tmp_path, cfg, log=quiet).runs["nn"].cached


def test_load_split_from_store_manifest_and_bundle(stores, tmp_path):
    import shutil

    from geotoken.evaluate.evaluate import load_split

    g, q, queries = stores
    split = load_split(q, name="queries")
    assert split.ids.tolist() == queries.ids.tolist() and split.images is None and split.skipped == 0
    np.testing.assert_allclose(split.lat, queries.lat)
    manifest = tmp_path / "q.csv"
    rows = "".join(f"{i},{a + 1},{b},img{i}.jpg\n" for i, a, b in zip(queries.ids, queries.lat, queries.lon))
    manifest.write_text("id,lat,lon,image\n" + rows)
    from_manifest = load_split(q, manifest)
    np.testing.assert_allclose(from_manifest.lat, queries.lat + 1, atol=1e-5)  # truth from the manifest
    assert from_manifest.images[0].endswith("img" + queries.ids[0] + ".jpg")
    bundle = tmp_path / "bundle"
    shutil.copytree(g, bundle / "gal")
    (bundle / "bundle.json").write_text(json.dumps({"gallery": "gal"}))
    assert len(load_split(bundle)) == 800


def test_config_and_neighbour_table_are_checked_by_the_library(tmp_path):
    from geotoken.errors import GeoTokenError
    from geotoken.evaluate import EvalConfig, GeoTokenMethodConfig, evaluate, load_neighbours
    from geotoken.evaluate.baselines import RetrievalConfig
    from geotoken.evaluate.geotoken_method import rows_to_run

    for kwargs, field in [
        ({"n_boot": 0}, "n_boot"),
        ({"limit": 0}, "limit"),
        ({"retrieval": RetrievalConfig(k=0)}, "retrieval.k"),
        ({"geotoken": GeoTokenMethodConfig(beam_width=0)}, "geotoken.beam_width"),
    ]:
        with pytest.raises(GeoTokenError, match=f"{field} must be a whole number >= 1, got 0"):
            EvalConfig(**kwargs)
    for kwargs, said in [({"n_boot": 10.5}, "n_boot must be a whole number >= 1, got 10.5"),
                         ({"thresholds": (25, 25.0)}, r"thresholds repeat a distance: \[25, 25.0\]")]:  # fmt: skip
        with pytest.raises(GeoTokenError, match=said):
            EvalConfig(**kwargs)
    assert EvalConfig(limit=np.int64(5)).limit == 5  # a count read from an array
    gallery, queries = synthetic_splits(n_gallery=20, n_queries=5)
    empty = dataclasses.replace(gallery, ids=gallery.ids[:0], lat=gallery.lat[:0], lon=gallery.lon[:0],
                                arrays={k: v[:0] for k, v in gallery.arrays.items()})  # fmt: skip
    with pytest.raises(GeoTokenError, match="the gallery has no rows"):
        evaluate(empty, queries, "/nonexistent/out", EvalConfig(methods=("nn",)), log=lambda *a: None)
    with pytest.raises(GeoTokenError, match=r"methods is a tuple of names, e.g. \('nn',\)"):
        EvalConfig(methods="nn")  # not the methods 'n', 'n'
    with pytest.raises(GeoTokenError, match=r"unknown method\(s\) \['knnn'\]"):
        EvalConfig(methods=("nn", "knnn"))  # before any work, not inside evaluate()
    with pytest.raises(GeoTokenError, match="level is a confidence in \\(0, 1\\)"):
        EvalConfig(level=95)
    small_gps, q = synthetic_splits(n_gallery=30, n_queries=4, seed=1)  # 64-d gps, not GeoCLIP's 512-d space
    with pytest.raises(
        GeoTokenError, match=r"gps-gallery: .*'gps' embeddings are \(64,\), the GPS encoder gives 512-d"
    ):
        evaluate(small_gps, q, tmp_path / "g", EvalConfig(methods=("gps-gallery",), n_boot=10))
    assert not (tmp_path / "g").exists()  # refused before any method ran
    with pytest.raises(GeoTokenError, match="evaluation strategies \\['beem'\\]: choose from greedy, beam"):
        rows_to_run(GeoTokenMethodConfig(strategies=("beem",)))
    gallery, queries = synthetic_splits(n_gallery=30, n_queries=4, seed=1)
    nb = tmp_path / "nb"
    nb.mkdir()
    np.save(nb / "index.npy", np.zeros((4, 2), dtype=np.int64))
    np.save(nb / "sims.npy", np.zeros((4, 2), dtype=np.float32))
    with pytest.raises(GeoTokenError, match="not a neighbour table"):
        load_neighbours(nb, gallery, queries)
    (nb / "neighbours.json").write_text(NEIGHBOURS_JSON)
    rows, sims = load_neighbours(nb, gallery, queries)
    assert rows.shape == sims.shape == (4, 2)
    queries.skipped = 1
    with pytest.raises(GeoTokenError, match="skipped rows"):
        load_neighbours(nb, gallery, queries)


def test_a_neighbour_table_over_stores_with_skipped_rows_is_compacted(tmp_path, feature_store, capsys):
    """`embed --skip-bad` leaves skipped rows in the stores; the splits drop them, so the table's rows are
    dropped and its gallery row numbers shifted to match (as `geotoken run` does), in the CLI too."""
    from geotoken.evaluate import load_neighbours, load_split
    from geotoken.retrieval import NeighbourIndex, StoreEmbeddings, neighbour_table

    rng = np.random.default_rng(0)
    vis = rng.standard_normal((14, 8)).astype(np.float32)
    vis /= np.linalg.norm(vis, axis=1, keepdims=True)
    coords = np.stack([rng.uniform(-60, 60, 14), rng.uniform(-180, 180, 14)], 1)
    gallery = feature_store("g", {"visual": vis[:10]}, coords=coords[:10], skipped=[2, 7])
    queries = feature_store(
        "q", {"visual": vis[10:]}, ids=[f"q{i}" for i in range(4)], coords=coords[10:], skipped=[1]
    )
    index = NeighbourIndex.build(StoreEmbeddings(gallery, "visual"), "flat", valid=gallery.valid, progress=False,
                                 meta={"store": str(gallery.root), "embedding": "visual"})  # fmt: skip
    table = neighbour_table(queries, index, 3, tmp_path / "nb", exclude_self_ids=False, progress=False)
    g, q = load_split(gallery.root), load_split(queries.root)
    rows, sims = load_neighbours(tmp_path / "nb", g, q)
    assert rows.shape == (3, 3) and (rows >= 0).all() and (rows < len(g)).all()
    want = np.asarray(gallery.ids)[table.rows[queries.valid]]  # the same gallery photos, by id
    np.testing.assert_array_equal(np.asarray(g.ids)[rows], want)
    np.testing.assert_array_equal(sims, table.sims[queries.valid])
    out = tmp_path / "eval"
    argv = ["evaluate", "--method", "nn", "--gallery", str(gallery.root), "--queries", str(queries.root)]
    assert (
        main([*argv, "--neighbours", str(tmp_path / "nb"), "-o", str(out), "--no-plots", "--n-boot", "20"])
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())["methods"]["nn"]
    assert metrics["n"] == 3 and metrics["config"]["embedding"] == "neighbour table"  # not "visual"
    # knn deeper than the table: refused before any method runs (it voted over 3 and said 15)
    argv = [
        *argv[:2],
        "nn",
        "knn",
        *argv[3:],
        "--neighbours",
        str(tmp_path / "nb"),
        "-o",
        str(out),
        "--no-plots",
    ]
    assert main([*argv, "-k", "15"]) == 2
    assert "knn: k 15 but the neighbour table holds 3 neighbours per query" in capsys.readouterr().err
    assert main([*argv, "-k", "3", "--n-boot", "20"]) == 0

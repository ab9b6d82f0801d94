"""Bad input from a sweep of the commands: each gets one clear GeoTokenError (CLI: one line, exit 2)."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from geotoken.align.train import AlignConfig, Queue
from geotoken.bench.index import bench_index
from geotoken.cli import main
from geotoken.errors import GeoTokenError
from geotoken.evaluate import EvalConfig
from geotoken.evaluate.baselines import RetrievalConfig
from geotoken.evaluate.runs import load_cached
from geotoken.features import FeatureStore
from geotoken.gallery import Gallery, load_queries
from geotoken.retrieval import IndexConfig, NeighbourIndex, check_neighbours, measure_recall, neighbour_table
from geotoken.search.calibration import check_radii
from geotoken.train.data import TrainData
from helpers import write_store


def unit(rng, n, dim):
    x = rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def coords(rng, n):
    return np.stack([rng.uniform(-60, 60, n), rng.uniform(-170, 170, n)], 1)


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    """A gallery, two query splits of the same size (val, test: other manifests), its index and a
    neighbour table of `test`."""
    root = tmp_path_factory.mktemp("splits")
    rng = np.random.default_rng(0)
    stores = {}
    for name, n in (("gallery", 200), ("val", 20), ("test", 20)):
        arrays = {"visual": unit(rng, n, 16), "gps": unit(rng, n, 8)}
        stores[name] = write_store(root / name, arrays, ids=[f"{name}{i}" for i in range(n)],
                                   coords=coords(rng, n), manifest_hash=f"{name}-hash" * 4)  # fmt: skip
    index = NeighbourIndex.build(stores["gallery"]["visual"], meta={"store": str(root / "gallery"),
                                 "embedding": "visual"}, progress=False)  # fmt: skip
    index.save(root / "index")
    neighbour_table(stores["test"], index, 5, root / "nbr-test", exclude_self_ids=False, progress=False)
    return root, stores


# ------------------------------------------------------------------------------ neighbour tables vs stores


def test_check_neighbours_names_both_query_stores(splits):
    root, stores = splits
    table = check_neighbours(root / "nbr-test", stores["test"], stores["gallery"])
    assert table.rows.shape == (20, 5)
    meta = json.loads((root / "nbr-test" / "neighbours.json").read_text())
    assert meta["gallery"]["manifest_hash"] == "gallery-hash" * 4 and meta["gallery"]["rows"] == 200
    with pytest.raises(GeoTokenError, match=r"nbr-test/neighbours.json: computed for queries .*test "
                       r"\(manifest test-hashtes\.\.\.\), not .*val \(manifest val-hashval-\.\.\.\)"):  # fmt: skip
        check_neighbours(root / "nbr-test", stores["val"])
    with pytest.raises(GeoTokenError, match=r"computed for gallery .*gallery \(manifest gallery-hash"):
        check_neighbours(root / "nbr-test", stores["test"], stores["val"])


def test_check_neighbours_refuses_queries_aligned_by_other_heads_than_the_gallery(splits, tmp_path):
    """A query store re-aligned after `align train` ran again: the table's hashes still match, the space not."""
    root, stores = splits
    for name in ("gallery", "test"):
        shutil.copytree(root / name, tmp_path / name)
    for name, heads in (("gallery", "a" * 16), ("test", "b" * 16)):
        header = json.loads((tmp_path / name / "store.json").read_text())
        header["arrays"]["gps"]["heads"] = heads
        (tmp_path / name / "store.json").write_text(json.dumps(header))
    test, gallery = FeatureStore.open(tmp_path / "test"), FeatureStore.open(tmp_path / "gallery")
    with pytest.raises(GeoTokenError, match=r"its 'gps' embeddings were written by alignment heads bbbb"):
        check_neighbours(root / "nbr-test", test, gallery)
    check_neighbours(root / "nbr-test", test, stores["gallery"])  # the gallery without fingerprints: passes


def test_every_command_meeting_two_stores_refuses_queries_of_other_alignment_heads(splits, tmp_path, capsys):
    """`align apply` of retrained heads on a query store: the index, evaluation, calibration and training
    all compare its embeddings with the gallery's, so each refuses it, naming both fingerprints."""
    root, stores = splits
    for name in ("gallery", "test"):
        shutil.copytree(root / name, tmp_path / name)
        header = json.loads((tmp_path / name / "store.json").read_text())
        for array in ("visual", "gps"):
            header["arrays"][array]["heads"] = ("a" if name == "gallery" else "b") * 16
        (tmp_path / name / "store.json").write_text(json.dumps(header))
    gallery, test = str(tmp_path / "gallery"), str(tmp_path / "test")
    assert main(["index", "build", gallery, "-o", str(tmp_path / "index"), "--embedding", "visual"]) == 0
    assert json.loads((tmp_path / "index" / "index.json").read_text())["heads"] == {"visual": "a" * 16}
    refused = "embeddings were written by alignment heads bbbbbbbbbbbb, "
    capsys.readouterr()
    for keep_self in ([], ["--keep-self"]):  # with and without the gallery store opened
        argv = ["index", "neighbours", str(tmp_path / "index"), test, "-o", str(tmp_path / "n"), "-k", "3"]
        assert main([*argv, *keep_self]) == 2
        err = capsys.readouterr().err
        assert refused in err and "aaaaaaaaaaaa" in err, err
    assert not (tmp_path / "n").exists()
    argv = ["evaluate", "--method", "nn", "--gallery", gallery, "--queries", test, "-o", str(tmp_path / "e")]
    assert main([*argv, "--no-plots", "--n-boot", "10"]) == 2
    assert refused + f"the gallery {gallery}'s by aaaaaaaaaaaa" in capsys.readouterr().err
    with pytest.raises(GeoTokenError, match=refused):
        TrainData.load(test, root / "nbr-test", gallery)
    shared = Gallery.from_store(gallery, ["visual", "gps"])  # a training gallery, shared by validation
    with pytest.raises(GeoTokenError, match=refused):
        TrainData.load(test, root / "nbr-test", shared)
    with pytest.raises(GeoTokenError, match=refused + "the model's alignment heads by aaaa"):
        load_queries(test, ["visual"], made_by="a" * 16)
    assert len(load_queries(test, ["visual"], made_by="b" * 16)[2]) == 20


def test_a_neighbour_table_wider_than_the_gallery_is_refused_before_any_search(splits, tmp_path):
    root, stores = splits
    index = NeighbourIndex.load(root / "index")
    with pytest.raises(
        GeoTokenError, match=r"k 201 is more neighbours than the index's gallery has \(200 rows\)"
    ):
        neighbour_table(stores["test"], index, 201, tmp_path / "wide", exclude_self_ids=False, progress=False)
    with pytest.raises(GeoTokenError, match=r"200 rows, less the query itself\): choose k <= 199"):
        neighbour_table(stores["test"], index, 200, tmp_path / "wide", progress=False)
    assert not (tmp_path / "wide").exists()


def test_check_neighbours_row_count_without_hashes(splits, tmp_path):
    root, stores = splits
    rng = np.random.default_rng(1)
    other = write_store(tmp_path / "other", {"visual": unit(rng, 7, 16)})  # no manifest hash
    with pytest.raises(
        GeoTokenError, match=r"computed for queries .*test \(20 rows\), not .*other \(7 rows\)"
    ):
        check_neighbours(root / "nbr-test", other)


def test_evaluate_refuses_another_splits_table(splits, tmp_path, capsys):
    root, _ = splits
    argv = ["evaluate", "--gallery", str(root / "gallery"), "--queries", str(root / "val"), "--neighbours",
            str(root / "nbr-test"), "--method", "nn", "--no-plots", "-o", str(tmp_path / "ev")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "computed for queries" in err and "val" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "ev" / "metrics.json").exists()
    argv[4] = str(root / "test")  # the table's own queries
    assert main(argv) == 0


def test_train_data_refuses_another_stores_table(splits):
    root, _ = splits
    with pytest.raises(GeoTokenError, match=r"computed for queries .*test.*, not .*val"):
        TrainData.load(root / "val", root / "nbr-test", root / "gallery", ["visual", "gps"])


def test_train_data_refuses_a_bare_table_of_another_row_count(splits, tmp_path):
    """A bare index.npy (no neighbours.json to check against) of 7 rows for the 20 val queries."""
    root, _ = splits
    (tmp_path / "bare").mkdir()
    np.save(tmp_path / "bare" / "index.npy", np.zeros((7, 5), dtype=np.int64))
    with pytest.raises(GeoTokenError, match=r"\(7, 5\) neighbour rows for the 20 query rows of .*val"):
        TrainData.load(root / "val", tmp_path / "bare", root / "gallery", ["visual", "gps"])


def test_calibrate_checks_before_decoding(random_bundle, tmp_path):
    from geotoken.fit import calibrate_bundle
    from geotoken.predict import Geolocator

    bundle = tmp_path / "b"
    shutil.copytree(random_bundle(gallery_rows=64), bundle)
    geo = Geolocator.from_bundle(bundle)
    spec = (bundle / "bundle.json").read_text()
    rng = np.random.default_rng(2)
    dims = dict(geo.model.cfg.modalities)
    stores = {
        name: write_store(
            tmp_path / name,
            {m: unit(rng, 6, d) for m, d in dims.items()},
            coords=coords(rng, 6),
            manifest_hash=name * 8,
        )  # fmt: skip
        for name in ("val", "test")
    }
    index = NeighbourIndex.load(bundle / "gallery" / "index")
    neighbour_table(stores["test"], index, 5, tmp_path / "nbr", exclude_self_ids=False, progress=False)
    with pytest.raises(GeoTokenError, match="computed for queries"):
        calibrate_bundle(geo, tmp_path / "val", tmp_path / "nbr", strategy="greedy", progress=False)
    for radii in ([0.0], [-5.0], [math.nan], [25.0, math.inf]):
        with pytest.raises(GeoTokenError, match="radii_km must be finite numbers of km > 0"):
            calibrate_bundle(geo, tmp_path / "val", radii_km=radii, progress=False)
    write_store(tmp_path / "empty", {m: np.zeros((0, d), np.float16) for m, d in dims.items()})
    with pytest.raises(GeoTokenError, match="empty: no usable query rows"):
        calibrate_bundle(geo, tmp_path / "empty", progress=False)
    assert (bundle / "bundle.json").read_text() == spec  # nothing fitted, nothing registered


def test_check_radii():
    assert check_radii((25, 200.0)) == [25.0, 200.0]
    with pytest.raises(GeoTokenError):
        check_radii([])


# ------------------------------------------------------------------------------ numeric options


@pytest.mark.parametrize(
    "options",
    [{"kind": "hnsw", "hnsw_m": 0}, {"kind": "hnsw", "hnsw_m": -1}, {"kind": "hnsw", "ef_search": 0},
     {"kind": "ivfpq", "nprobe": 0}, {"kind": "ivfpq", "nlist": 0}, {"kind": "ivfpq", "pq_bits": 0}],
)  # fmt: skip
def test_index_config_rejects_bad_numbers(options):
    with pytest.raises(GeoTokenError, match="index option"):
        IndexConfig(**options)


def test_index_cli_numbers(splits, tmp_path, capsys, monkeypatch):
    root, stores = splits
    gallery = str(root / "gallery")
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "bundle.json").write_text("{}")  # another kind of folder: refused before the build
    assert main(["index", "build", gallery, "-o", str(tmp_path / "bundle"), "--embedding", "visual"]) == 2
    assert (
        "bundle: holds bundle.json, not an index; write the index to a new or empty folder"
        in capsys.readouterr().err
    )
    assert main(["index", "build", gallery, "-o", str(tmp_path / "ok"), "--embedding", "visual"]) == 0
    assert "ok: flat index of 200 rows (16-d visual), built in" in capsys.readouterr().out
    again = ["index", "build", gallery, "-o", str(tmp_path / "ok"), "--embedding", "visual", "--kind", "hnsw"]
    assert main(again) == 2  # another build over it is asked for, not done silently
    assert (
        "ok: holds an index already (flat over 200 rows of visual); pass --overwrite"
        in capsys.readouterr().err
    )
    assert main([*again, "--overwrite"]) == 0 and "hnsw index of 200 rows" in capsys.readouterr().out
    for extra in (["--kind", "hnsw", "--hnsw-m", "0"], ["--kind", "hnsw", "--hnsw-m", "-1"]):
        assert (
            main(["index", "build", gallery, "-o", str(tmp_path / "i"), "--embedding", "visual", *extra]) == 2
        )
        assert "hnsw_m must be an integer >= 2" in capsys.readouterr().err
    for extra, message in ((["--batch-size", "0"], "batch_size"), (["-k", "-1"], "k must"),
                           (["--nprobe", "0"], "nprobe")):  # fmt: skip
        argv = ["index", "neighbours", str(root / "index"), str(root / "test"), "-o", str(tmp_path / "n")]
        assert main([*argv, *extra]) == 2
        assert message in capsys.readouterr().err
    built = []  # recall's options are refused before the build, not after it
    monkeypatch.setattr(NeighbourIndex, "build", lambda *a, **kw: built.append(1))
    for extra in (["-k", "0"], ["--recall-queries", "0"]):
        argv = [
            "index",
            "build",
            gallery,
            "-o",
            str(tmp_path / "r"),
            "--embedding",
            "visual",
            "--kind",
            "hnsw",
        ]
        assert main([*argv, *extra]) == 2
        assert "recall: k" in capsys.readouterr().err
    assert not built and not (tmp_path / "r").exists()
    monkeypatch.undo()
    index = NeighbourIndex.load(root / "index")
    with pytest.raises(GeoTokenError, match="recall: k"):
        measure_recall(index, stores["gallery"]["visual"], stores["gallery"].valid, 0, 10)


def test_hand_edited_index_json(splits, tmp_path):
    root, _ = splits
    for text in ("{}", "[1]", '{"config": {"kind": "hnsw", "hnsw_m": 0}}'):
        shutil.copytree(root / "index", tmp_path / "i", dirs_exist_ok=True)
        (tmp_path / "i" / "index.json").write_text(text)
        with pytest.raises(GeoTokenError, match=r"i/index.json: "):
            NeighbourIndex.load(tmp_path / "i")


def test_align_config_numbers():
    for options in ({"batch_size": 0}, {"queue_size": -1}, {"lr": math.nan}, {"val_fraction": 1.0}):
        with pytest.raises(GeoTokenError, match="align: "):
            AlignConfig(**options)
    queue = Queue(AlignConfig(queue_size=0).queue_size, 4, "cpu")  # 0: in-batch negatives only
    import torch

    queue.push(torch.ones(3, 4), torch.arange(3))
    assert len(queue.get()[0]) == 0


def test_evaluate_numbers():
    for value in (math.nan, math.inf, 0.0, -1.0, float("1e400")):
        with pytest.raises(GeoTokenError, match="thresholds must be finite"):
            EvalConfig(thresholds=(1.0, value))
    with pytest.raises(GeoTokenError, match="knn: temperature"):
        RetrievalConfig(temperature=0.0)
    with pytest.raises(GeoTokenError, match="knn: radius_km"):
        RetrievalConfig(radius_km=-1.0)


def test_bench_index_numbers():
    with pytest.raises(GeoTokenError, match="rows must be >= 1"):
        bench_index(rows=0)
    with pytest.raises(GeoTokenError, match="hnsw_m"):
        bench_index(rows=10, dim=8, queries=2, k=5, kinds=("hnsw",), hnsw_m=0)


# ------------------------------------------------------------------------------ evaluate: widths, cache


def test_evaluate_names_both_stores_of_other_widths(splits, tmp_path, capsys):
    root, _ = splits
    rng = np.random.default_rng(3)
    write_store(tmp_path / "wide", {"visual": unit(rng, 10, 27)}, coords=coords(rng, 10))
    for method in ("nn", "knn"):
        argv = ["evaluate", "--gallery", str(root / "gallery"), "--queries", str(tmp_path / "wide"),
                "--method", method, "--no-plots", "-o", str(tmp_path / "ev")]  # fmt: skip
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "'visual' is 16-d in gallery" in err and "27-d in queries" in err and "wide" in err


def test_corrupt_cache_is_recomputed(splits, tmp_path, capsys):
    root, _ = splits
    out = tmp_path / "ev"
    argv = ["evaluate", "--gallery", str(root / "gallery"), "--queries", str(root / "test"),
            "--method", "nn", "--no-plots", "--n-boot", "50", "-o", str(out)]  # fmt: skip
    assert main(argv) == 0
    (cached,) = (out / "cache").glob("nn.*.npz")
    good = cached.read_bytes()
    for broken in (b"", good[: len(good) // 2]):
        cached.write_bytes(broken)
        assert load_cached(cached, 20) is None
        assert main(argv) == 0
        assert not json.loads((out / "metrics.json").read_text())["methods"]["nn"]["cached"]
        assert load_cached(cached, 20) is not None  # rewritten
    capsys.readouterr()


def test_backbone_options_name_a_wrong_value_before_whether_it_applies(random_bundle):
    from geotoken.predict import Geolocator

    bundle = random_bundle(gallery_rows=64, image_size=32)
    with pytest.raises(
        GeoTokenError, match="backbone_runtime must be one of auto, torch, onnx, got 'tensorrt'"
    ):
        Geolocator.from_bundle(bundle, backbone_runtime="tensorrt")
    with pytest.raises(GeoTokenError, match="backbone_runtime 'onnx' applies to CLIP backbones"):
        Geolocator.from_bundle(bundle, backbone_runtime="onnx")
    geo = Geolocator.from_bundle(bundle)
    from PIL import Image

    images = [Image.new("RGB", (32, 32), (i, 80, 160)) for i in range(3)]
    assert len(geo.predict(images, top_k=1, progress=True, batch_size=2)) == 3  # a bar, as GeoCLIP's predict


def test_a_neighbour_table_against_another_gallery_than_the_index_is_refused(splits, tmp_path):
    root, stores = splits
    index = NeighbourIndex.load(root / "index")
    with pytest.raises(GeoTokenError, match=r"gallery .*val has 20 rows, the index was built over 200"):
        neighbour_table(stores["test"], index, 5, tmp_path / "t", gallery_store=stores["val"], progress=False)
    assert not (tmp_path / "t").exists()


def test_training_refuses_the_gallerys_own_table_that_keeps_each_query(splits, tmp_path):
    """--keep-self on the gallery: every query's first neighbour is itself (100 % of rows), and a model or a
    reward scorer trained on it learns to copy it (the scorer's held-out oracle read 1.0)."""
    root, stores = splits
    index = NeighbourIndex.load(root / "index")
    neighbour_table(stores["gallery"], index, 5, tmp_path / "keep", exclude_self_ids=False, progress=False)
    with pytest.raises(GeoTokenError, match=r"own row kept \(--keep-self\): training on it learns to copy"):
        TrainData.load(root / "gallery", tmp_path / "keep", root / "gallery", ["visual", "gps"])
    with pytest.raises(GeoTokenError, match="--keep-self"):
        load_queries(root / "gallery", ["visual", "gps"], tmp_path / "keep", training=True)
    assert load_queries(root / "gallery", ["visual", "gps"], tmp_path / "keep")[1].shape == (
        200,
        5,
    )  # to read: fine
    neighbour_table(stores["gallery"], index, 5, tmp_path / "own", progress=False)
    assert TrainData.load(root / "gallery", tmp_path / "own", root / "gallery", ["visual", "gps"]).rows == 200


def test_a_finished_neighbour_table_of_other_queries_is_not_replaced_unasked(splits, tmp_path):
    root, stores = splits
    index = NeighbourIndex.load(root / "index")
    neighbour_table(stores["test"], index, 5, tmp_path / "t", exclude_self_ids=False, progress=False)
    same = neighbour_table(stores["test"], index, 5, tmp_path / "t", exclude_self_ids=False, progress=False)
    assert same.rows.shape == (20, 5)  # the same table again: reused
    with pytest.raises(
        GeoTokenError, match=r"holds the neighbour table of .*test \(k 5\) already; pass --overwrite"
    ):
        neighbour_table(stores["val"], index, 5, tmp_path / "t", exclude_self_ids=False, progress=False)
    table = neighbour_table(stores["val"], index, 3, tmp_path / "t", exclude_self_ids=False, progress=False,
                            overwrite=True)  # fmt: skip
    assert table.k == 3


def test_a_finished_table_is_reused_however_its_query_store_path_is_spelled(splits, tmp_path, monkeypatch):
    root, stores = splits
    index = NeighbourIndex.load(root / "index")
    neighbour_table(stores["test"], index, 5, tmp_path / "t", exclude_self_ids=False, progress=False)
    monkeypatch.chdir(root)
    relative = FeatureStore.open("test")  # the same store, by a relative path
    assert neighbour_table(relative, index, 5, tmp_path / "t", exclude_self_ids=False, progress=False).k == 5

"""FAISS indexes and neighbour tables, checked against brute-force NumPy on small random galleries."""

from __future__ import annotations

import numpy as np
import pytest

import geotoken.retrieval.neighbours as nb
from geotoken.errors import GeoTokenError
from geotoken.retrieval import (
    NeighbourIndex,
    NeighbourTable,
    StoreEmbeddings,
    neighbour_table,
    recall_at_k,
    search_excluding,
)

faiss = pytest.importorskip("faiss")
faiss.omp_set_num_threads(1)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def clustered(n: int, dim: int, seed: int = 0, clusters: int = 50) -> np.ndarray:
    """Unit vectors around `clusters` centres (real embeddings have structure; uniform noise has none)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    return unit(centres[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, dim))).astype(
        np.float32
    )


def brute_force(queries, gallery, k, allowed=None):
    sims = queries @ gallery.T
    if allowed is not None:
        sims = np.where(allowed, sims, -np.inf)
    rows = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return rows, np.take_along_axis(sims, rows, axis=1)


def test_flat_is_exact_and_skips_invalid_rows(tmp_path):
    gallery, queries = clustered(500, 32), clustered(40, 32, seed=1)
    valid = np.ones(500, bool)
    valid[::7] = False
    index = NeighbourIndex.build(gallery, "flat", valid=valid, progress=False, batch_size=128)
    rows, sims = index.search(queries, 10, batch_size=16)
    want_rows, want_sims = brute_force(queries, gallery, 10, allowed=valid[None, :])
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_allclose(sims, want_sims, atol=1e-5)
    assert rows.dtype == np.int64 and sims.dtype == np.float32 and index.size == valid.sum()
    # asking for more than the index holds pads with -1 / -inf
    small = NeighbourIndex.build(gallery[:3], "flat", progress=False)
    r, s = small.search(queries[:2], 5)
    assert (r[:, 3:] == -1).all() and np.isneginf(s[:, 3:]).all()
    # save / load round trip
    index.save(tmp_path / "idx")
    again = NeighbourIndex.load(tmp_path / "idx")
    np.testing.assert_array_equal(again.search(queries, 10)[0], rows)
    assert again.meta["indexed"] == valid.sum() and again.meta["gallery_rows"] == 500
    with pytest.raises(GeoTokenError, match="dimension 16"):
        index.search(queries[:, :16], 3)
    # as a user passes them: a NumPy integer k, a list of rows; a bad k named
    np.testing.assert_array_equal(index.search(queries[:2].tolist(), np.int64(10))[0], rows[:2])
    assert NeighbourIndex.build(gallery[:20].tolist(), progress=False).size == 20
    with pytest.raises(GeoTokenError, match=r"index option\(s\) \['nlst'\]: known"):
        NeighbourIndex.build(gallery, "ivfpq", nlst=4)
    for k in (0, 2.5):
        with pytest.raises(GeoTokenError, match="search: k must be a whole number >= 1"):
            index.search(queries, k)


@pytest.mark.parametrize("kind, options", [("ivfpq", {"nprobe": 16, "pq_m": 16}), ("hnsw", {})])
def test_compressed_indexes_recall(tmp_path, kind, options):
    gallery, queries = clustered(4000, 32), clustered(100, 32, seed=1)
    exact, _ = brute_force(queries, gallery, 15)
    index = NeighbourIndex.build(gallery, kind, progress=False, **options)
    rows, _ = index.search(queries, 15)
    assert recall_at_k(rows, exact) > 0.75
    index.save(tmp_path / kind)
    loaded = NeighbourIndex.load(tmp_path / kind)
    np.testing.assert_array_equal(loaded.search(queries, 15)[0], rows)
    if kind == "ivfpq":  # re-ranking from exact vectors recovers what PQ codes lose
        refined, sims = index.search(queries, 15, exact=gallery, refine=4)
        assert recall_at_k(refined, exact) > recall_at_k(rows, exact)
        np.testing.assert_allclose(sims, np.take_along_axis(queries @ gallery.T, refined, 1), atol=1e-5)
    if kind == "ivfpq":  # nprobe saved with the index, and overridable at load time
        assert faiss.extract_index_ivf(loaded.index).nprobe == 16
        everything = NeighbourIndex.load(tmp_path / kind, nprobe=loaded.meta["nlist"])
        assert recall_at_k(everything.search(queries, 15)[0], exact) >= recall_at_k(rows, exact)


def test_recall_at_k():
    exact = np.array([[1, 2, 3], [4, 5, 6]])
    assert recall_at_k(np.array([[3, 2, 1], [4, 9, 8]]), exact) == pytest.approx(4 / 6)


def test_first_k_kept_pads():
    rows = np.array([[5, 6, 7, 8], [1, 2, 3, 4]])
    sims = np.array([[0.9, 0.8, 0.7, 0.6], [0.5, 0.4, 0.3, 0.2]], dtype=np.float32)
    drop = np.array([[True, False, True, False], [True, True, True, False]])
    r, s, kept = nb.first_k_kept(rows, sims, drop, 3)
    np.testing.assert_array_equal(r, [[6, 8, -1], [4, -1, -1]])
    np.testing.assert_array_equal(kept, [2, 1])
    assert s[0, 1] == np.float32(0.6) and np.isneginf(s[1, 1:]).all()


def test_search_excluding_self_and_duplicates():
    g = clustered(300, 16)
    g[10] = g[11] = g[12]  # one photo uploaded three times
    index = NeighbourIndex.build(g, "flat", progress=False)
    queries = g[[10, 20]]
    rows, sims = search_excluding(index, queries, 5, self_rows=np.array([10, 20]), gallery=g, margin=1)
    allowed = np.ones((2, 300), bool)
    allowed[0, [10, 11, 12]] = allowed[1, 20] = False
    want, _ = brute_force(queries, g, 5, allowed)
    np.testing.assert_array_equal(rows, want)
    # only by id: the duplicates stay (they tie with the query itself)
    rows, _ = search_excluding(index, queries, 5, self_rows=np.array([10, 20]))
    assert set(rows[0, :2]) == {11, 12} and 10 not in rows[0]


def test_store_embeddings_concatenation(feature_store):
    vis, gps = clustered(20, 8), clustered(20, 4, seed=3)
    store = feature_store("s", {"visual": vis, "gps": gps})
    both = StoreEmbeddings(store, "visual+gps")
    assert both.shape == (20, 12)
    np.testing.assert_allclose(np.linalg.norm(both[3:7], axis=1), 1, atol=2e-3)
    ip = both[[0]] @ both[[1]].T
    want = (vis[0] @ vis[1] + gps[0] @ gps[1]) / 2
    assert ip[0, 0] == pytest.approx(want, abs=2e-3)
    with pytest.raises(GeoTokenError, match="text"):
        StoreEmbeddings(store, "visual+text")


def test_neighbour_table_excludes_self_resumes_and_matches_brute_force(tmp_path, monkeypatch, feature_store):
    g = clustered(260, 16)
    g[30] = g[31]  # a duplicate pair
    store = feature_store("gallery", {"gps": g}, skipped=[5])
    index = NeighbourIndex.build(StoreEmbeddings(store, "gps"), "flat", valid=store.valid, progress=False,
                                 meta={"store": str(store.root), "embedding": "gps"})  # fmt: skip
    table = neighbour_table(store, index, 6, tmp_path / "whole", batch_size=64, progress=False)
    g16 = store["gps"].astype(np.float32)
    allowed = np.broadcast_to(store.valid, (260, 260)).copy()
    np.fill_diagonal(allowed, False)
    allowed[30, 31] = allowed[31, 30] = False
    want, want_sims = brute_force(g16, g16, 6, allowed)
    want[5], want_sims[5] = -1, -np.inf  # a skipped query row has no neighbours
    tie = np.where(want == 31, 30, want)  # rows 30 and 31 tie: either order is right
    np.testing.assert_array_equal(np.where(table.rows == 31, 30, table.rows), tie)
    np.testing.assert_allclose(table.sims, want_sims, atol=1e-5)
    assert table.k == 6 and table.rows.dtype == np.int64 and table.sims.dtype == np.float32
    assert not (tmp_path / "whole" / "progress.json").exists()

    # killed after two batches, the same call resumes and gives identical files
    real, calls = nb.search_excluding, []

    def crash_after_two(*args, **kwargs):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(nb, "search_excluding", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        neighbour_table(store, index, 6, tmp_path / "part", batch_size=64, progress=False)
    with pytest.raises(GeoTokenError, match="unfinished"):
        NeighbourTable.open(tmp_path / "part")
    monkeypatch.setattr(nb, "search_excluding", real)
    neighbour_table(store, index, 6, tmp_path / "part", batch_size=64, progress=False)
    for name in ("index.npy", "sims.npy"):
        assert (tmp_path / "part" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()

    # queries from another store: test-time queries keep every hit; with exclusion, copies of them go
    queries = feature_store("queries", {"gps": g[:4]}, ids=["q0", "q1", "q2", "q3"])
    table = neighbour_table(queries, index, 3, tmp_path / "test", exclude_self_ids=False, progress=False)
    np.testing.assert_array_equal(table.rows[:, 0], [0, 1, 2, 3])
    table = neighbour_table(queries, index, 3, tmp_path / "train", progress=False)
    np.testing.assert_array_equal(table.rows, want[:4, :3])


def test_neighbour_table_open_and_check_name_the_file(tmp_path):
    root = tmp_path / "t"
    root.mkdir()
    (root / nb.META).write_text('{"format": "geotoken.neighbours", "version": 1, "config": {}}')
    np.save(root / "index.npy", np.array([[0, 1], [2, 3]], dtype=np.int64))
    with pytest.raises(GeoTokenError, match="neighbour table has no sims.npy"):
        NeighbourTable.open(root)
    np.save(root / "sims.npy", np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(GeoTokenError, match=r"sims.npy: shape \(2, 3\), index.npy has \(2, 2\)"):
        NeighbourTable.open(root)
    np.save(root / "sims.npy", np.zeros((2, 2), dtype=np.float32))
    table = NeighbourTable.open(root)
    assert table.check(2, 4) is table
    with pytest.raises(GeoTokenError, match="2 neighbour rows for 3 queries"):
        table.check(3)
    with pytest.raises(GeoTokenError, match=r"index.npy: gallery row 3 out of range \(3 rows\)"):
        table.check(2, 3)
    np.save(root / "index.npy", np.array([[0, -1], [2, 3]], dtype=np.int64))
    with pytest.raises(GeoTokenError, match="gallery row -1 out of range"):
        NeighbourTable.open(root).check(2, 4)
    np.save(root / "index.npy", np.zeros((2, 2), dtype=np.int32))
    with pytest.raises(GeoTokenError, match="index.npy: int32 .* expected int64"):
        NeighbourTable.open(root)


def test_training_queries_of_gallery_places_never_see_that_place(tmp_path, feature_store):
    rng = np.random.default_rng(4)
    places = rng.uniform(-60, 60, (40, 2)).round(4)
    g = clustered(200, 16, seed=5)
    gcoords = places[np.arange(200) % 40]  # five gallery views per place
    gallery = feature_store("g", {"gps": g}, coords=gcoords)
    index = NeighbourIndex.build(StoreEmbeddings(gallery, "gps"), "flat", progress=False,
                                 meta={"store": str(gallery.root), "embedding": "gps"})  # fmt: skip
    # training queries: near-copies of gallery views (other photos of the same places), other ids
    q = unit(g[:30] + 0.05 * rng.standard_normal((30, 16))).astype(np.float32)
    queries = feature_store("q", {"gps": q}, ids=[f"t{i}" for i in range(30)], coords=gcoords[:30])
    table = neighbour_table(queries, index, 4, tmp_path / "t", exclude_same_place=True, progress=False)
    q16, g16 = queries["gps"].astype(np.float32), gallery["gps"].astype(np.float32)
    allowed = (gcoords[None, :, :] != gcoords[:30, None, :]).any(-1)  # (30, 200): another place
    want, _ = brute_force(q16, g16, 4, allowed)
    np.testing.assert_array_equal(table.rows, want)
    assert (table.rows % 40 != np.arange(30)[:, None] % 40).all()
    # without it, the query's own place is what it finds first
    plain = neighbour_table(queries, index, 4, tmp_path / "p", exclude_self_ids=False, progress=False)
    assert (plain.rows[:, 0] % 40 == np.arange(30) % 40).mean() > 0.9


def test_bench_index_small():
    from geotoken.bench.index import RandomUnitVectors, bench_index

    gen = RandomUnitVectors(70_000, 4, seed=3)
    rows = np.array([69_999, 5, 65_536, 5])
    np.testing.assert_array_equal(gen[rows], np.concatenate([gen.block(1)[[4463]], gen.block(0)[[5]],
                                                             gen.block(1)[[0]], gen.block(0)[[5]]]))  # fmt: skip
    result = bench_index(rows=3000, dim=16, queries=50, k=5, threads=1, data="clustered", pq_m=8)
    assert set(result["kinds"]) == {"flat", "ivfpq", "hnsw", "ivfpq+refine"}
    assert result["kinds"]["flat"]["recall@5"] == 1.0 and 0 < result["kinds"]["ivfpq"]["recall@5"] < 1
    assert all(r["queries_per_s"] > 0 and r["index_mb"] > 0 for r in result["kinds"].values())
    from geotoken.errors import GeoTokenError

    with pytest.raises(GeoTokenError, match="k 15 is more than the 10 gallery rows"):
        bench_index(rows=10, dim=16, queries=5, k=15)
    with pytest.raises(GeoTokenError, match="pq_m 5 must divide the dimension 32"):
        bench_index(rows=2000, dim=32, queries=5, k=5, kinds=("ivfpq",), pq_m=5)  # before building flat


def test_neighbour_tables_re_rank_a_compressed_index_by_default(tmp_path, feature_store):
    """`REFINE` everywhere: a table over IVF-PQ re-ranks by the gallery's exact vectors unless told
    refine=1; over a flat index (exact already) it records refine 1, whatever was asked."""
    from geotoken.retrieval import REFINE

    g = clustered(600, 32)
    store = feature_store("gallery", {"gps": g})
    meta = {"store": str(store.root), "embedding": "gps"}
    queries = feature_store("queries", {"gps": clustered(50, 32, seed=1)}, ids=[f"q{i}" for i in range(50)])
    q = StoreEmbeddings(queries, "gps")[:]
    exact = StoreEmbeddings(store, "gps")
    index = NeighbourIndex.build(exact, "ivfpq", progress=False, meta=meta, pq_m=4)
    table = neighbour_table(queries, index, 5, tmp_path / "ivfpq", exclude_self_ids=False, progress=False)
    assert table.meta["config"]["refine"] == REFINE == 4
    deep = index.search(q, 5 + 8, exact=exact, refine=REFINE)[0]  # search_excluding's margin of 8
    np.testing.assert_array_equal(table.rows, deep[:, :5])
    plain = neighbour_table(
        queries, index, 5, tmp_path / "plain", exclude_self_ids=False, progress=False, refine=1
    )
    np.testing.assert_array_equal(plain.rows, index.search(q, 5 + 8)[0][:, :5])
    assert (plain.rows != table.rows).any()
    flat = NeighbourIndex.build(exact, "flat", progress=False, meta=meta)
    table = neighbour_table(queries, flat, 5, tmp_path / "flat", exclude_self_ids=False, progress=False)
    assert table.meta["config"]["refine"] == 1

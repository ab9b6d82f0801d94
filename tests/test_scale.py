"""Scale paths on the CPU: FAISS's GPU code path (with CPU stand-ins) and neighbour tables under torchrun."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import geotoken.retrieval.index as ix
import geotoken.retrieval.neighbours as nb
from geotoken.retrieval import NeighbourIndex, NeighbourTable, StoreEmbeddings, neighbour_table

faiss = pytest.importorskip("faiss")
faiss.omp_set_num_threads(1)


def clustered(n: int, dim: int, seed: int = 0, clusters: int = 20) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((clusters, dim))[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal(
        (n, dim)
    )
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def fake_gpu(monkeypatch):
    """FAISS "sees" one GPU, whose index copies are CPU clones: the GPU code path, run on the CPU."""
    made = []

    def to_gpu(index, kind):
        made.append(kind)
        return faiss.clone_index(index), None

    monkeypatch.setattr(ix, "faiss_gpus", lambda: 1)
    monkeypatch.setattr(ix, "_to_gpu", to_gpu)
    return made


@pytest.mark.parametrize("kind", ["flat", "ivfpq"])
def test_gpu_path_gives_the_cpu_rows(kind, fake_gpu, monkeypatch):
    gallery, queries = clustered(3000, 16), clustered(50, 16, seed=1)
    valid = np.ones(3000, bool)
    valid[::5] = False  # positions in the index differ from gallery rows: the id map must translate
    options = {"nlist": 32, "pq_m": 8, "nprobe": 8} if kind == "ivfpq" else {}
    on_gpu = NeighbourIndex.build(gallery, kind, valid=valid, progress=False, **options)
    rows, sims = on_gpu.search(queries, 10)
    assert fake_gpu == (["flat", kind] if kind == "ivfpq" else ["flat"])  # k-means, then the search copy
    monkeypatch.setattr(ix, "faiss_gpus", lambda: 0)
    cpu = NeighbourIndex.build(gallery, kind, valid=valid, progress=False, **options)
    want_rows, want_sims = cpu.search(queries, 10)
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_allclose(sims, want_sims, atol=1e-5)
    assert valid[rows].all()
    # the saved index is the CPU one either way: same bytes
    assert faiss.serialize_index(on_gpu.index).tobytes() == faiss.serialize_index(cpu.index).tobytes()


def test_gpu_path_leaves_hnsw_and_deep_searches_on_the_cpu(fake_gpu):
    gallery = clustered(500, 8)
    NeighbourIndex.build(gallery, "hnsw", progress=False).search(gallery[:3], 5)
    flat = NeighbourIndex.build(gallery, "flat", progress=False)
    flat.search(gallery[:3], ix.GPU_MAX_K + 1)
    assert fake_gpu == []


def test_cpu_wheel_counts_no_gpu():
    assert ix.faiss_gpus() == (faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0)


@pytest.mark.slow  # torchrun with 2 gloo processes
def test_neighbour_table_under_torchrun_resumes_and_matches_one_process(tmp_path, monkeypatch, feature_store):
    g = clustered(700, 16)
    store = feature_store("gallery", {"gps": g}, skipped=[3])
    meta = {"store": str(store.root), "embedding": "gps"}
    index = NeighbourIndex.build(StoreEmbeddings(store, "gps"), "ivfpq", valid=store.valid, progress=False,
                                 meta=meta, nlist=16, pq_m=4, nprobe=4)  # fmt: skip
    index.save(tmp_path / "index")
    index = NeighbourIndex.load(tmp_path / "index")
    one = neighbour_table(store, index, 6, tmp_path / "one", batch_size=64, progress=False, refine=2)

    # one process is killed after two of the 11 chunks ...
    real, calls = nb.search_excluding, []

    def crash_after_two(*args, **kwargs):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(nb, "search_excluding", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        neighbour_table(store, index, 6, tmp_path / "two", batch_size=64, progress=False, refine=2)
    monkeypatch.setattr(nb, "search_excluding", real)
    # ... and two processes under torchrun finish the other nine
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "geotoken", "index", "neighbours", str(tmp_path / "index"), str(store.root),
           "-o", str(tmp_path / "two"), "-k", "6", "--batch-size", "64", "--refine", "2", "--threads", "1"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("queries x 6 neighbours") == 1  # one summary for the job, not one a rank
    assert done.stderr.count("neighbours (rank 0's share of 2)") >= 1 and "neighbours[1]" not in done.stderr
    for name in ("index.npy", "sims.npy"):
        assert (tmp_path / "two" / name).read_bytes() == (one.root / name).read_bytes()
    table = NeighbourTable.open(tmp_path / "two")
    assert table.meta == one.meta and not (tmp_path / "two" / nb.RANKS).exists()
    assert (table.rows[3] == -1).all() and (table.rows[store.valid] >= 0).all()


def test_bench_index_from_a_float16_file(tmp_path):
    from geotoken.bench.index import DiskVectors, RandomUnitVectors, bench_index, exact_search

    source = RandomUnitVectors(70_000, 8, seed=2, data="clustered")
    disk = DiskVectors(tmp_path / "v.npy", source)
    stored = np.load(tmp_path / "v.npy")
    assert stored.dtype == np.float16 and stored.shape == (70_000, 8) and not disk.reused
    np.testing.assert_array_equal(stored[65_530:65_540], source[65_530:65_540].astype(np.float16))
    np.testing.assert_array_equal(disk[np.array([69_999, 3, 3])], stored[[69_999, 3, 3]].astype(np.float32))
    assert DiskVectors(tmp_path / "v.npy", source).reused  # same generator: the file is kept
    assert not DiskVectors(tmp_path / "v.npy", RandomUnitVectors(70_000, 8, seed=3)).reused

    q = clustered(20, 8, seed=5)
    g = np.load(tmp_path / "v.npy").astype(np.float32)
    want = np.argsort(-(q @ g.T), axis=1, kind="stable")[:, :7]
    got = exact_search(
        DiskVectors(tmp_path / "v.npy", RandomUnitVectors(70_000, 8, seed=3)), q, 7, block=5000
    )
    np.testing.assert_array_equal(np.sort(got, axis=1), np.sort(want, axis=1))

    args = dict(
        rows=3000, dim=16, queries=40, k=5, kinds=("flat", "ivfpq"), threads=1, data="clustered", pq_m=8
    )
    result = bench_index(**args, vectors=tmp_path / "b.npy")
    assert result["storage"] == "float16 file" and result["exact_s"] is not None
    assert set(result["kinds"]) == {"flat", "ivfpq", "ivfpq+refine"}
    assert result["kinds"]["flat"]["recall@5"] == 1.0 and result["kinds"]["ivfpq+refine"]["refine"] == 4
    assert all(r["peak_rss_mb"] >= r["peak_anon_mb"] > 0 for r in result["kinds"].values())
    assert result["kinds"]["flat"]["sim_ratio"] == 1.0 and 0.5 < result["kinds"]["ivfpq"]["sim_ratio"] <= 1.0
    again = bench_index(**args, vectors=tmp_path / "b.npy")  # file and exact answer reused
    assert again["generate_s"] is None and again["exact_s"] is None
    assert again["kinds"]["flat"]["recall@5"] == 1.0

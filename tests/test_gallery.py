"""One batch builder: training, prediction and the reward scorer read the same tensors for the same query."""

import numpy as np
import pytest
import torch

from geotoken.errors import GeoTokenError
from geotoken.gallery import Gallery, load_queries
from geotoken.model import GeoToken, preset
from geotoken.predict import Geolocator
from geotoken.retrieval import NeighbourIndex, neighbour_table
from geotoken.train import TrainData
from helpers import write_store

DIMS = {"visual": 12, "gps": 8, "text": 4}


def store(root, n, seed):
    rng = np.random.default_rng(seed)
    coords = np.c_[rng.uniform(-70, 70, n), rng.uniform(-180, 180, n)]
    arrays = {m: rng.standard_normal((n, d)).astype(np.float32) for m, d in DIMS.items()}
    return write_store(root, arrays, ids=[f"{root.name}{i}" for i in range(n)], coords=coords)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("gallery")
    gallery, queries = store(root / "gallery", 80, 0), store(root / "queries", 20, 1)
    index = NeighbourIndex.build(np.asarray(gallery["visual"], dtype=np.float32), "flat", progress=False)
    neighbour_table(
        queries, index, 6, root / "nbrs", exclude_self_ids=False, embedding="visual", progress=False
    )
    return root, index


@pytest.mark.parametrize("neighbour_embeddings", [True, False])
def test_training_and_inference_batches_are_identical(folders, neighbour_embeddings):
    root, index = folders
    cfg = preset(
        "tiny", modalities=DIMS, k=5, level=10, group=2, use_neighbour_embeddings=neighbour_embeddings
    )
    train = TrainData.load(
        root / "queries", root / "nbrs", root / "gallery", list(DIMS), cfg.level, cfg.group
    )
    geo = Geolocator(
        GeoToken(cfg), Gallery.from_store(root / "gallery", list(DIMS), cfg.level, cfg.group), index=index
    )
    emb, nbrs, _, _ = load_queries(root / "queries", list(DIMS), root / "nbrs")
    rows = np.array([7, 0, 19, 3])
    a = train.batch(rows, cfg)  # the training path: query rows of the stores
    b = geo.batch({m: np.asarray(v)[rows] for m, v in emb.items()}, nbrs[rows])  # the inference path
    assert a.query.keys() == b.query.keys() == DIMS.keys()
    for m in DIMS:
        torch.testing.assert_close(a.query[m], b.query[m], rtol=0, atol=0)
    assert a.nbr.keys() == b.nbr.keys() == (DIMS.keys() if neighbour_embeddings else set())
    for m in a.nbr:
        assert a.nbr[m].shape == (4, 5, DIMS[m])
        torch.testing.assert_close(a.nbr[m], b.nbr[m], rtol=0, atol=0)
    torch.testing.assert_close(a.nbr_tokens, b.nbr_tokens, rtol=0, atol=0)
    assert b.targets is None and a.targets.shape == (4, cfg.n_tokens)
    with torch.no_grad():  # and so the model reads the same memory
        torch.testing.assert_close(geo.model.encode(a), geo.model.encode(b), rtol=0, atol=0)


def test_bad_neighbour_rows_name_the_problem(folders):
    root, _ = folders
    cfg = preset("tiny", modalities=DIMS, k=5, level=10, group=2)
    gallery = Gallery.from_store(root / "gallery", list(DIMS), cfg.level, cfg.group)
    query = {m: np.zeros((2, d), np.float32) for m, d in DIMS.items()}
    with pytest.raises(GeoTokenError, match="0..79"):
        gallery.batch(query, np.full((2, 5), 80), cfg)
    with pytest.raises(GeoTokenError, match=">=5"):
        gallery.batch(query, np.zeros((2, 3), np.int64), cfg)
    with pytest.raises(GeoTokenError, match="none were given"):
        gallery.batch(query, None, cfg)
    with pytest.raises(GeoTokenError, match="lack"):
        gallery.batch({"visual": query["visual"]}, np.zeros((2, 5), np.int64), cfg)
    with pytest.raises(GeoTokenError, match="differ"):
        wrong = preset("tiny", modalities={**DIMS, "gps": 9}, k=5, level=10, group=2)
        gallery.check(wrong)

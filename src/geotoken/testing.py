"""Test and benchmark fixtures that need the library itself: a small untrained bundle built in seconds.

Used by the test suite, `benchmarks/bench_serve.py` and anyone who wants to exercise the inference path
(server, CLI, web page) without training a model first.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from geotoken import assets
from geotoken.align import AlignHeads, HeadsConfig
from geotoken.bundle import save_bundle
from geotoken.features import FeatureStore
from geotoken.model import GeoToken, preset
from geotoken.retrieval import NeighbourIndex


def random_bundle(directory: str | os.PathLike, gallery_rows: int = 256, k: int = 5, seed: int = 0) -> Path:
    """An untrained bundle built from the real components (EfficientNet-Lite0 backbone, align heads, FAISS
    index, a `tiny` model) over real MP16 coordinates and random gallery features. Its answers mean
    nothing; it exists so tests and the server can run the whole inference path in seconds."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    coords = np.loadtxt(assets.mp16_coordinates_csv(), delimiter=",", skiprows=1, max_rows=20000)
    coords = coords[np.sort(rng.choice(len(coords), gallery_rows, replace=False))]
    backbone_config = {"name": "efficientnet-lite0", "image_size": 224}
    dims = {"visual": 32, "gps": 32, "text": 32}
    heads = AlignHeads(
        HeadsConfig(in_dim=1280, visual_dim=32, gps_dim=32, text_dim=32, hidden=64, backbone=backbone_config)
    ).eval()
    features = rng.standard_normal((gallery_rows, 1280)).astype(np.float32)  # (no PCA fit: identity slice)
    with torch.no_grad():
        aligned = {m: v.numpy() for m, v in heads(torch.from_numpy(features)).items()}
    with tempfile.TemporaryDirectory() as tmp:
        store = FeatureStore.create(
            Path(tmp) / "gallery", [f"g{i}" for i in range(gallery_rows)], coords, dims
        )
        for m in dims:
            with store.writer(m) as w:
                w.write(0, aligned[m])
            store.mark_complete(m)
        model = GeoToken(preset("tiny", modalities=dims, k=k)).eval()
        index = NeighbourIndex.build(aligned["visual"], "flat", progress=False, meta={"embedding": "visual"})
        return save_bundle(
            directory,
            model=model,
            backbone_config=backbone_config,
            heads=heads,
            gallery_store=store,
            index=index,
            query_modalities=["visual"],
        )

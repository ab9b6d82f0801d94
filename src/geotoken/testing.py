"""Test and benchmark fixtures that need the library itself: a small untrained bundle built in seconds, a
tiny random CLIP folder, and GeoCLIP's shipped weights over a slice of its gallery.

Used by the test suite, `benchmarks/bench_serve.py` and anyone who wants to exercise the inference path
(server, CLI, web page) without training a model first or downloading anything.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from geotoken import assets
from geotoken.align import AlignHeads, HeadsConfig
from geotoken.bundle import save_bundle
from geotoken.encoders.geoclip import GeoCLIPFiles
from geotoken.features import FeatureStore
from geotoken.model import GeoToken, preset
from geotoken.retrieval import NeighbourIndex


def random_bundle(
    directory: str | os.PathLike,
    gallery_rows: int = 256,
    k: int = 5,
    seed: int = 0,
    image_size: int = 224,
    index_kind: str = "flat",
    overwrite: bool = False,
) -> Path:
    """An untrained bundle built from the real components (EfficientNet-Lite0 backbone, align heads, FAISS
    index, a `tiny` model) over real MP16 coordinates and random gallery features. Its answers mean
    nothing; it exists so tests and the server can run the whole inference path in seconds.
    image_size: the backbone's input size, recorded by the heads too (32 makes a CPU forward pass quick);
    index_kind: the FAISS index over the gallery (`geotoken.retrieval.KINDS`); overwrite: as `save_bundle`'s."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    coords = np.loadtxt(assets.mp16_coordinates_csv(), delimiter=",", skiprows=1, max_rows=20000)
    coords = coords[np.sort(rng.choice(len(coords), gallery_rows, replace=False))]
    backbone_config = {"name": "efficientnet-lite0", "image_size": image_size}
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
        index = NeighbourIndex.build(
            aligned["visual"], index_kind, progress=False, meta={"embedding": "visual"}
        )
        return save_bundle(
            directory,
            model=model,
            backbone_config=backbone_config,
            heads=heads,
            gallery_store=store,
            index=index,
            query_modalities=["visual"],
            overwrite=overwrite,
        )


def tiny_clip(
    directory: str | os.PathLike, projection_dim: int = 768, image_size: int = 32, seed: int = 0
) -> Path:
    """A random 2-layer `transformers` CLIPModel (`image_size` px images, `projection_dim`-d projection: 768
    is CLIP ViT-L/14's, which GeoCLIP's head reads) saved to `directory` with its CLIPImageProcessor: the
    interface of CLIP ViT-L/14 in a few MB, loaded like any CLIP folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    folder = Path(directory)
    tower = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    text = dict(tower, vocab_size=64, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)  # fmt: skip
    config = CLIPConfig(
        text_config=text,
        vision_config=dict(tower, image_size=image_size, patch_size=8),
        projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    CLIPModel(config).eval().save_pretrained(folder)
    processor = CLIPImageProcessor(
        size={"shortest_edge": image_size + 4}, crop_size={"height": image_size, "width": image_size}
    )
    processor.save_pretrained(folder)
    return folder


def small_geoclip_files(directory: str | os.PathLike, every: int = 1000) -> GeoCLIPFiles:
    """GeoCLIP's shipped weights with every `every`-th row of its 100K-coordinate gallery (a CSV written to
    `directory`, lines copied verbatim): encoding the gallery takes milliseconds instead of a minute."""
    lines = assets.mp16_coordinates_csv().read_text().splitlines()
    path = Path(directory) / f"coordinates_every_{every}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([lines[0], *lines[1::every]]) + "\n")
    return dataclasses.replace(GeoCLIPFiles.shipped(), gallery=path)

"""Shared fixtures. The builders behind them live in helpers.py (plain functions, importable by tests).

feature_store(name, arrays, ...)   a complete FeatureStore under tmp_path (helpers.write_store)
tiny_model(modalities, k, ...)     a seeded `tiny`-preset GeoToken in eval mode (helpers.tiny_model)
random_bundle(gallery_rows, k, image_size)
                                   path of a small untrained bundle, built once per session per arguments
jpeg_data, png_data                bytes of a small JPEG (noise) and PNG (solid colour)
jpeg_image, png_image              the same images opened with PIL
photo                              the real sample photograph (GeoCLIP's Kauai PNG), opened with PIL
free_port                          a free TCP port on 127.0.0.1
"""

from __future__ import annotations

import io
from pathlib import Path

import huggingface_hub.constants
import pytest
from PIL import Image

import helpers
from geotoken import assets, testing
from geotoken.encoders.geoclip import GeoCLIPFiles
from geotoken.predict import GeoCLIPPredictor
from geotoken.testing import small_geoclip_files, tiny_clip


@pytest.fixture
def feature_store(tmp_path):
    """Factory: feature_store(name, arrays, *, ids=None, coords=None, skipped=(), **info) -> FeatureStore
    written at tmp_path / name (an absolute path is used as is); see helpers.write_store."""

    def build(name, arrays, **kw):
        return helpers.write_store(tmp_path / name, arrays, **kw)

    return build


@pytest.fixture(scope="session")
def tiny_model():
    """Factory: tiny_model(modalities=helpers.DIMS, k=3, *, head_std=None, seed=0, **config) -> GeoToken."""
    return helpers.tiny_model


@pytest.fixture(scope="session")
def random_bundle(tmp_path_factory):
    """Factory: random_bundle(gallery_rows=64, k=5, image_size=None) -> Path of an untrained bundle
    (geotoken.testing.random_bundle, seed 0), built once per session for each set of arguments.
    `image_size` is the backbone's input size (32 makes a CPU forward pass quick). Shared between
    test modules: read it, or copy it before changing anything."""
    built: dict[tuple, Path] = {}

    def get(gallery_rows: int = 64, k: int = 5, image_size: int | None = None) -> Path:
        key = (gallery_rows, k, image_size)
        if key not in built:
            built[key] = testing.random_bundle(
                tmp_path_factory.mktemp("bundle") / "b",
                gallery_rows=gallery_rows,
                k=k,
                image_size=image_size or 224,
            )
        return built[key]

    return get


@pytest.fixture
def jpeg_data() -> bytes:
    """helpers.jpeg_bytes(): 24 x 16 uniform noise, seed 0, quality 95."""
    return helpers.jpeg_bytes()


@pytest.fixture
def png_data() -> bytes:
    """helpers.png_bytes(): 64 x 48, one solid colour."""
    return helpers.png_bytes()


@pytest.fixture
def jpeg_image(jpeg_data) -> Image.Image:
    return Image.open(io.BytesIO(jpeg_data))


@pytest.fixture
def png_image(png_data) -> Image.Image:
    return Image.open(io.BytesIO(png_data))


@pytest.fixture
def photo() -> Image.Image:
    return Image.open(assets.sample_image())


@pytest.fixture
def free_port() -> int:
    return helpers.free_port()


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory):
    """The geotoken cache (CLIP's ONNX exports, GeoCLIP galleries) in a session folder, never ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GEOTOKEN_CACHE", str(tmp_path_factory.mktemp("geotoken-cache")))
        yield


# ------------------------------------------------------------------ GeoCLIP on a tiny random CLIP, offline
@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """No hub access, and a fresh geotoken cache (the GeoCLIP gallery embeddings) per test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("GEOTOKEN_CACHE", str(tmp_path / "geotoken-cache"))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random CLIP (projection 768) saved as a transformers folder."""
    return tiny_clip(tmp_path_factory.mktemp("tiny-clip-768"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """GeoCLIP's shipped heads with a 100-coordinate slice of its gallery."""
    return small_geoclip_files(tmp_path_factory.mktemp("gallery"), every=1000)


@pytest.fixture
def shipped(monkeypatch, files):
    """The built-in model's weights, with the small gallery (as if the wheel shipped 100 coordinates)."""
    monkeypatch.setattr(GeoCLIPFiles, "shipped", classmethod(lambda cls: files))
    return files


@pytest.fixture(scope="module")
def geo(clip_dir, files, tmp_path_factory):
    """The GeoCLIP predictor on the tiny CLIP and the small gallery."""
    return GeoCLIPPredictor.load(clip_dir, device="cpu", files=files, cache_dir=tmp_path_factory.mktemp("c"))

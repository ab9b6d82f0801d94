"""A bundle that refers to its gallery store instead of copying it (`--link-gallery`)."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from geotoken import assets
from geotoken.bundle import push_to_hub, read_bundle
from geotoken.cli import main
from geotoken.errors import GeoTokenError
from geotoken.features import FeatureStore
from geotoken.io import read_json
from geotoken.predict import Geolocator

torch.set_num_threads(1)


@pytest.fixture
def stages(random_bundle, tmp_path):
    """Stage-like folders: a gallery store that records its backbone, and the bundle's other parts."""
    bundle = random_bundle(gallery_rows=64, k=3)
    src = FeatureStore.open(bundle / "gallery")
    gallery = FeatureStore.create(
        tmp_path / "runs" / "align" / "gallery", src.ids, np.asarray(src.coords), dict(src.dims),
        backbone=read_json(bundle / "backbone.json"), manifest_hash="abc",
    )  # fmt: skip
    for m in src.dims:
        with gallery.writer(m) as w:
            w.write(0, np.asarray(src[m]))
        gallery.mark_complete(m)
    return ["--model", str(bundle / "model"), "--align", str(bundle / "align"), "--gallery", str(gallery.root),
            "--index", str(bundle / "gallery" / "index")]  # fmt: skip


def test_linked_bundle_predicts_like_a_copy_and_finds_its_store(stages, tmp_path, capsys):
    copy, link = tmp_path / "runs" / "copy", tmp_path / "runs" / "link"
    assert main(["bundle", *stages, "-o", str(copy)]) == 0
    assert main(["bundle", *stages, "-o", str(link), "--link-gallery"]) == 0
    spec = read_bundle(link)
    assert spec["gallery"] == "../align/gallery" and spec["gallery_link"] == {
        "rows": 64,
        "manifest_hash": "abc",
    }
    assert not (link / "gallery").exists() and (link / "gallery_tokens.npy").is_file()
    np.testing.assert_array_equal(
        np.load(link / "gallery_tokens.npy"), np.load(copy / "gallery" / "tokens.npy")
    )
    photo = Image.open(assets.sample_image())
    want = (
        Geolocator.from_bundle(copy).predict([photo], top_k=2, strategy="greedy")[0].to_dict()["candidates"]
    )
    got = Geolocator.from_bundle(link).predict([photo], top_k=2, strategy="greedy")[0].to_dict()["candidates"]
    assert got == want

    # the bundle folder moved alone: the relative path breaks, the absolute one still finds the store
    moved = tmp_path / "elsewhere" / "b"
    shutil.move(str(link), moved)
    assert Geolocator.from_bundle(moved).gallery.rows == 64
    with pytest.raises(GeoTokenError, match="would not be uploaded"):
        push_to_hub(moved, "me/x")

    # a store that changed under the bundle is refused, naming it
    store_json = tmp_path / "runs" / "align" / "gallery" / "store.json"
    header = json.loads(store_json.read_text())
    store_json.write_text(json.dumps({**header, "manifest_hash": "other"}))
    with pytest.raises(GeoTokenError, match="manifest_hash 'other'"):
        Geolocator.from_bundle(moved)
    store_json.unlink()
    with pytest.raises(GeoTokenError, match="not a feature store"):
        read_bundle(moved)
    capsys.readouterr()

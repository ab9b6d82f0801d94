"""`geotoken evaluate --method geoclip`: GeoCLIP's pretrained head + gallery softmax on a query store embedded
with `--backbone clip` (768-d projected features), as a row beside the baselines; other stores are refused."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from geotoken.cli import main
from geotoken.data.table import Manifest
from geotoken.encoders.geoclip import GeoCLIPFiles, GeoCLIPGeolocator
from geotoken.evaluate import EvalConfig, evaluate, load_split
from geotoken.testing import small_geoclip_files
from helpers import write_store

torch.set_num_threads(1)
CLIP = {"name": "clip", "model": "openai/clip-vit-large-patch14", "dtype": "float32"}


@pytest.fixture(autouse=True)
def shipped(monkeypatch, tmp_path):
    """GeoCLIP's weights with a 100-row gallery, its embeddings cached under tmp_path."""
    monkeypatch.setenv("GEOTOKEN_CACHE", str(tmp_path / "cache"))
    files = small_geoclip_files(tmp_path / "gallery-csv", every=1000)
    monkeypatch.setattr(GeoCLIPFiles, "shipped", classmethod(lambda cls: files))
    return files


def stores(root, backbone=CLIP, dim=768, n=24):
    rng = np.random.default_rng(0)
    coords = np.stack([rng.uniform(-60, 60, n), rng.uniform(-180, 180, n)], 1)
    features = rng.standard_normal((n, dim)).astype(np.float32)
    g = write_store(root / "g", {"features": features}, coords=coords, backbone=backbone)
    q = write_store(root / "q", {"features": features[::-1].copy()}, ids=[f"q{i}" for i in range(n)],
                    coords=coords[::-1].copy(), backbone=backbone)  # fmt: skip
    return g.root, q.root


def test_evaluate_geoclip_beside_baselines(tmp_path, shipped, capsys):
    g, q = stores(tmp_path)
    out = tmp_path / "eval"
    args = ["evaluate", "--method", "nn", "geoclip", "--gallery", str(g), "--queries", str(q), "-o", str(out)]
    assert main([*args, "--embedding", "features", "--n-boot", "50", "--no-plots"]) == 0
    assert "geoclip" in capsys.readouterr().out
    report = json.loads((out / "metrics.json").read_text())
    assert list(report["methods"]) == ["nn", "geoclip"]
    assert "GeoCLIP" in report["methods"]["geoclip"]["strategy"]
    assert "geoclip" in (out / "metrics.md").read_text()

    # the row is exactly GeoCLIP's top-1 on the stored (float16) features
    queries = load_split(q)
    model = GeoCLIPGeolocator(shipped)
    top = model.predict_features(
        torch.from_numpy(np.asarray(queries.arrays["features"], dtype=np.float32)), 1
    )
    with open(out / "predictions.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["method"] == "geoclip"]
    assert [r["id"] for r in rows] == list(queries.ids)
    got = np.array([[float(r["pred_lat"]), float(r["pred_lon"])] for r in rows])
    np.testing.assert_allclose(got, top.latlon[:, 0].numpy(), atol=1e-5)
    gap = np.abs(got[:, None, :] - model.latlon.numpy()[None]).max(axis=2).min(axis=1)
    assert (gap < 1e-5).all()  # every answer is one of GeoCLIP's gallery coordinates


def test_evaluate_geoclip_refuses_other_backbones(tmp_path, capsys):
    g, q = stores(tmp_path / "eff", backbone={"name": "efficientnet-lite0", "image_size": 224}, dim=1280)
    out = tmp_path / "eval"
    assert main(["evaluate", "--method", "prior", "geoclip", "--gallery", str(g), "--queries", str(q), "-o", str(out)]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "geoclip: needs queries embedded with `geotoken embed --backbone clip`" in err
    assert "efficientnet-lite0 with 1280-d features" in err and not out.exists()
    g, q = stores(tmp_path / "small", dim=512)  # a CLIP with another projection (e.g. ViT-B/32)
    with pytest.raises(ValueError, match="clip with 512-d features"):
        evaluate(load_split(g), load_split(q), tmp_path / "e2", EvalConfig(methods=("geoclip",)))


def test_geoclip_refuses_features_of_another_768_d_tower(tmp_path, capsys):
    """Shape alone lets LAION's ViT-L/14 or a ViT-L/14 at 336 px through: their features are noise to the head."""
    from transformers import CLIPVisionConfig

    from geotoken.encoders.geoclip import clip_mismatch
    from geotoken.testing import tiny_clip

    vit_l14 = tmp_path / "vit-l14"  # the architecture only: a config.json is what the check reads
    CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                     patch_size=14, image_size=224, projection_dim=768).save_pretrained(vit_l14)  # fmt: skip
    assert clip_mismatch("openai/clip-vit-large-patch14") is None and clip_mismatch(str(vit_l14)) is None
    assert "is not openai/clip-vit-large-patch14" in clip_mismatch("openai/clip-vit-large-patch14-336")
    small = tiny_clip(tmp_path / "tiny")
    assert "hidden_size 32 (not 1024)" in clip_mismatch(str(small))
    for model, said in [("laion/CLIP-ViT-L-14-laion2B-s32B-b82K", "is not openai/clip-vit-large-patch14"),
                        (str(small), "patch_size 8 (not 14)")]:  # fmt: skip
        g, q = stores(tmp_path / model.replace("/", "_"), backbone={**CLIP, "model": model})
        out = tmp_path / "eval"
        assert main(["evaluate", "--method", "nn", "geoclip", "--gallery", str(g), "--queries", str(q), "-o", str(out)]) == 2  # fmt: skip
        err = capsys.readouterr().err
        assert f"was embedded with CLIP {model!r}: " in err and said in err and not out.exists()
    with pytest.warns(UserWarning, match="GeoCLIP: CLIP .*: its vision tower has hidden_size 32"):
        GeoCLIPGeolocator.load(small)


def test_a_relative_clip_folder_is_checked_where_it_was_embedded(tmp_path, monkeypatch, capsys):
    """`embed --clip models/tiny` stores the name as given; read from another working directory it would pass
    for a hub id (and be refused as "not OpenAI's"): the store's `backbone_source` names the folder."""
    from geotoken.encoders.geoclip import clip_mismatch
    from geotoken.features import FeatureStore
    from geotoken.testing import tiny_clip

    work = tmp_path / "work"
    tiny_clip(work / "models" / "tiny")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        paths.append(work / f"{i}.jpg")
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(paths[-1])
    Manifest([f"p{i}" for i in range(3)], np.arange(3.0), np.arange(3.0), [str(p) for p in paths]).write_csv(
        work / "m.csv"
    )
    monkeypatch.chdir(work)
    args = [
        "embed",
        "m.csv",
        "-o",
        "store",
        "--clip",
        "models/tiny",
        "--workers",
        "0",
    ]  # --clip: backbone clip
    for wrong, said in [(["--backbone", "efficientnet-lite0"], "the backbone efficientnet-lite0 has none"),
                        (["--image-size", "64"], "image_size is efficientnet-lite0's")]:  # fmt: skip
        assert main([*args, *wrong]) == 2 and said in capsys.readouterr().err
    assert main([*args, "--threads", "1"]) == 0
    header = FeatureStore.open(work / "store").header
    assert header["backbone"]["clip"] == "models/tiny"
    folder = str((work / "models" / "tiny").resolve())
    assert header["backbone_source"] == {"kind": "folder", "path": folder}

    monkeypatch.chdir(tmp_path)  # elsewhere: "models/tiny" is no folder here
    assert "is not openai/clip-vit-large-patch14" in clip_mismatch("models/tiny")
    assert "hidden_size 32 (not 1024)" in clip_mismatch("models/tiny", folder=folder)
    assert clip_mismatch("models/tiny", folder=str(tmp_path / "gone")) is None  # another machine's folder
    query = work / "store"
    out = tmp_path / "eval"
    assert main(["evaluate", "--method", "geoclip", "--gallery", str(query), "--queries", str(query), "-o", str(out)]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "was embedded with CLIP 'models/tiny': its vision tower has hidden_size 32" in err

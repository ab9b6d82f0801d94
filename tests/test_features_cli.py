"""`geotoken embed` end to end with the real EfficientNet-Lite0 on a few small images (and a broken one)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from geotoken.cli import main
from geotoken.data.manifest import Manifest
from geotoken.features import FeatureStore


def test_embed_command(tmp_path, capsys):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(5):
        path = tmp_path / f"{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    (tmp_path / "3.jpg").write_bytes(b"\xff\xd8 truncated")
    Manifest([f"p{i}" for i in range(5)], np.arange(5.0), np.arange(5.0), paths).write_csv(tmp_path / "m.csv")
    args = ["embed", str(tmp_path / "m.csv"), "-o", str(tmp_path / "store"), "--image-size", "32",
            "--batch-size", "2", "--workers", "0", "--threads", "1"]  # fmt: skip
    assert main(args) == 2
    (err,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert (
        err.startswith("geotoken embed: error: manifest row 4 of 5 (id 'p3')")
        and "3.jpg" in err
        and "--skip-bad" in err
    )
    assert main([*args, "--skip-bad"]) == 0
    assert "1 skipped" in capsys.readouterr().out
    store = FeatureStore.open(tmp_path / "store")
    assert store["features"].shape == (5, 1280) and store.header["backbone"]["name"] == "efficientnet-lite0"
    assert store.skipped[0]["id"] == "p3" and (tmp_path / "store" / "skipped.csv").is_file()
    assert np.isfinite(store["features"][[0, 1, 2, 4]]).all()


def test_bench_extract_small():
    from geotoken.bench.extract import bench_extract

    result = bench_extract([("efficientnet-lite0", {"image_size": 32})], batch_size=4, images=8, workers=0,
                           threads=1, iters=1)  # fmt: skip
    r = result["backbones"]["efficientnet-lite0 image_size=32"]
    assert r["dim"] == 1280 and r["forward_images_per_s"] > 0 and r["end_to_end_images_per_s"] > 0
    import torch

    if not torch.cuda.is_available():  # asked for a GPU this machine lacks: one line, not an assertion
        assert (
            main(["bench", "extract", "--sizes", "32", "--images", "4", "--workers", "0", "--device", "cuda"])
            == 2
        )


def test_a_manifest_without_rows_is_refused(tmp_path, capsys):
    """A header-only file (or one whose every row is bad) would give an empty manifest and an empty store
    that every later stage chokes on: both commands say so at once."""
    from geotoken.cli import main

    (tmp_path / "empty.csv").write_text("id,lat,lon,image\n")
    assert main(["manifest", str(tmp_path / "empty.csv"), "-o", str(tmp_path / "m.csv")]) == 2
    assert "empty.csv: no rows to write" in capsys.readouterr().err and not (tmp_path / "m.csv").exists()
    (tmp_path / "bad.csv").write_text("id,lat,lon,image\na,95,0,x.jpg\n")
    args = [
        "manifest",
        str(tmp_path / "bad.csv"),
        "-o",
        str(tmp_path / "m.csv"),
        "--skip-bad",
    ]
    assert main(args) == 2 and "every row was bad" in capsys.readouterr().err
    Manifest([], np.zeros(0), np.zeros(0), [], source="empty.csv").write_csv(tmp_path / "zero.csv")
    assert main(["embed", str(tmp_path / "zero.csv"), "-o", str(tmp_path / "store"), "--workers", "0"]) == 2
    assert "no rows to embed" in capsys.readouterr().err and not (tmp_path / "store").exists()


def test_embed_refuses_an_annotation_file_named_by_id_and_restarts_a_store_that_embedded_nothing(
    tmp_path, capsys
):
    """MP16's own CSV (images named by IMG_ID) goes through `geotoken manifest --format` first, as manifest
    says; a run that failed on its first batch leaves nothing worth resuming, so the corrected manifest
    into the same folder starts anew instead of refusing the folder."""
    (tmp_path / "mp16_places365.csv").write_text("IMG_ID,AUTHOR,LAT,LON\n1/2/a.jpg,x,1.5,2.5\n")
    args = ["embed", str(tmp_path / "mp16_places365.csv"), "-o", str(tmp_path / "store"), "--workers", "0"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "named by the IMG_ID column" in err and "geotoken manifest" in err and "--format mp16" in err
    assert not (tmp_path / "store").exists()

    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(tmp_path / f"{i}.jpg")
    ids, coords = [f"p{i}" for i in range(3)], np.arange(3.0)
    wrong = [str(tmp_path / "elsewhere" / f"{i}.jpg") for i in range(3)]
    Manifest(ids, coords, coords, wrong).write_csv(tmp_path / "wrong.csv")
    common = ["-o", str(tmp_path / "store"), "--image-size", "32", "--workers", "0", "--threads", "1"]
    assert main(["embed", str(tmp_path / "wrong.csv"), *common]) == 2
    assert "manifest row 1 of 3" in capsys.readouterr().err
    right = [str(tmp_path / f"{i}.jpg") for i in range(3)]
    Manifest(ids, coords, coords, right).write_csv(tmp_path / "right.csv")
    assert main(["embed", str(tmp_path / "right.csv"), *common]) == 0
    store = FeatureStore.open(tmp_path / "store")
    assert store.header["manifest_hash"] == Manifest(ids, coords, coords, right).content_hash()
    assert np.isfinite(store["features"][:]).all()
    # a store with embedded rows is still protected: another manifest is refused, naming the field
    Manifest(ids[:2], coords[:2], coords[:2], right[:2]).write_csv(tmp_path / "two.csv")
    assert main(["embed", str(tmp_path / "two.csv"), *common]) == 2
    assert "field 'manifest_hash'" in capsys.readouterr().err

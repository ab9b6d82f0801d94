"""Feature store and `embed`: format, resume after a crash, --skip-bad, 2-process extraction, `read_rows`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from geotoken.data.manifest import Manifest
from geotoken.errors import GeoTokenError
from geotoken.features import FeatureStore, embed, read_rows
from helpers import TinyBackbone

torch.set_num_threads(1)


def make_manifest(folder: Path, n: int, bad: dict[int, str] | None = None) -> Manifest:
    """n random PNGs; rows in `bad` become a missing file ('missing') or garbage bytes ('corrupt')."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    images = []
    for i in range(n):
        path = folder / f"img{i:03d}.png"
        kind = (bad or {}).get(i)
        if kind == "corrupt":
            path.write_bytes(b"not an image at all")
        elif kind != "missing":
            Image.fromarray(rng.integers(0, 256, (20 + i % 5, 18, 3), dtype=np.uint8)).save(path)
        images.append(str(path))
    return Manifest([f"id{i}" for i in range(n)], rng.uniform(-90, 90, n), rng.uniform(-180, 180, n), images)


def run_embed(manifest, out, backbone=None, **kw):
    kw = {"batch_size": 4, "num_workers": 0, "progress": False, "open_image": Image.open, **kw}
    return embed(manifest, backbone or TinyBackbone(), out, **kw)


def test_store_format_and_values(tmp_path):
    manifest = make_manifest(tmp_path / "img", 10)
    store = run_embed(manifest, tmp_path / "store")
    assert store.ids == manifest.ids.tolist() and store.rows == 10 and list(store) == ["features"]
    feats = store["features"]
    assert isinstance(feats, np.memmap) and feats.dtype == np.float16 and feats.shape == (10, 24)
    assert not feats.flags.writeable
    header = json.loads((tmp_path / "store" / "store.json").read_text())
    assert header["backbone"] == {"name": "tiny", "image_size": 16} and header["chunk_rows"] == 4
    assert header["arrays"]["features"] == {"dim": 24, "complete": True}
    assert not (tmp_path / "store" / "progress").exists()
    np.testing.assert_array_equal(store.coords, np.stack([manifest.lat, manifest.lon], 1))
    # values equal a direct forward pass of the same batch (rows 4..7 are chunk 1)
    bb = TinyBackbone()
    x = torch.stack([bb.preprocess(Image.open(p).convert("RGB")) for p in manifest.images[4:8]])
    np.testing.assert_array_equal(feats[4:8], bb.forward(x).detach().numpy().astype(np.float16))
    assert store.valid.all()


def test_resume_after_crash_is_byte_identical(tmp_path):
    manifest = make_manifest(tmp_path / "img", 11)
    whole = run_embed(manifest, tmp_path / "whole")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_embed(manifest, tmp_path / "part", backbone=TinyBackbone(fail_after=2))
    record = json.loads((tmp_path / "part" / "progress" / "rank-0.json").read_text())
    assert record["chunks"] == [[0, 2]]
    with pytest.raises(GeoTokenError, match="unfinished"):
        FeatureStore.open(tmp_path / "part")["features"]
    assert (
        "features" not in FeatureStore.open(tmp_path / "part")
        and len(FeatureStore.open(tmp_path / "part")) == 0
    )
    with pytest.raises(GeoTokenError, match="chunk_rows.*--batch-size 4"):  # mid-run, batches are fixed
        run_embed(manifest, tmp_path / "part", batch_size=5)
    resumed_backbone = TinyBackbone()
    resumed = run_embed(manifest, tmp_path / "part", backbone=resumed_backbone)
    assert resumed_backbone.calls == 1  # only the last chunk (rows 8..10) was computed again
    assert (tmp_path / "part" / "features.npy").read_bytes() == (
        tmp_path / "whole" / "features.npy"
    ).read_bytes()
    assert resumed.header == {**whole.header}
    # a finished store is reused as is, whatever the batch size; another manifest is refused, naming the field
    assert run_embed(manifest, tmp_path / "whole", backbone=TinyBackbone(fail_after=0)).rows == 11
    assert (
        run_embed(manifest, tmp_path / "whole", batch_size=5, backbone=TinyBackbone(fail_after=0)).rows == 11
    )
    manifest.lat[0] += 1  # the manifest's content hash changes
    with pytest.raises(GeoTokenError, match="manifest_hash"):
        run_embed(manifest, tmp_path / "whole")


@pytest.mark.slow  # num_workers=1: a DataLoader worker process
def test_bad_images_raise_or_are_recorded(tmp_path):
    manifest = make_manifest(tmp_path / "img", 9, bad={2: "corrupt", 7: "missing"})
    with pytest.raises(GeoTokenError, match=r"row 3 of \d+ \(id 'id2'\).*img002.png.*--skip-bad"):
        run_embed(manifest, tmp_path / "strict")
    store = run_embed(manifest, tmp_path / "lenient", skip_bad=True, num_workers=1)
    assert [(s["row"], s["id"]) for s in store.skipped] == [(2, "id2"), (7, "id7")]
    assert "FileNotFoundError" in store.skipped[1]["reason"]
    report = (tmp_path / "lenient" / "skipped.csv").read_text().splitlines()
    assert report[0] == "manifest_row,id,image,reason" and report[1].startswith(
        f"3,id2,{manifest.images[2]},"
    )
    feats = np.asarray(store["features"], dtype=np.float32)
    assert np.isnan(feats[[2, 7]]).all() and np.isfinite(feats[store.valid]).all()
    np.testing.assert_array_equal(store.valid, np.isin(np.arange(9), [2, 7], invert=True))
    # the good rows of a chunk with a bad image equal a clean run of the same images (0, 1, 3 share a batch)
    bb = TinyBackbone()
    x = torch.stack([bb.preprocess(Image.open(manifest.images[r]).convert("RGB")) for r in (0, 1, 3)])
    np.testing.assert_array_equal(feats[[0, 1, 3]], bb.forward(x).detach().numpy().astype(np.float16))


WORKER = """
import json, sys
import torch
from PIL import Image
from geotoken.data.manifest import Manifest
sys.path.insert(0, {tests!r})
from helpers import TinyBackbone
from geotoken.features import embed
torch.set_num_threads(1)
m = Manifest(**json.load(open({manifest!r})))
rank = int(__import__("os").environ["RANK"])
try:  # every rank crashes after its first chunk ...
    embed(m, TinyBackbone(fail_after=1), {out!r}, batch_size=3, num_workers=0, progress=False, open_image=Image.open)
except RuntimeError:
    record = json.load(open({out!r} + f"/progress/rank-{{rank}}.json"))
    json.dump(record["chunks"], open({out!r} + f".crashed-{{rank}}.json", "w"))
backbone = TinyBackbone()  # ... and the same command, run again, finishes the job
embed(m, backbone, {out!r}, batch_size=3, num_workers=0, progress=False, open_image=Image.open)
json.dump(backbone.calls, open({out!r} + f".calls-{{rank}}.json", "w"))
"""


@pytest.mark.slow
def test_two_processes_crash_resume_and_match_one(tmp_path, free_port):
    """2 gloo processes (as under torchrun) embed into one store, crash, resume: same bytes as 1 process."""
    manifest = make_manifest(tmp_path / "img", 13)
    one = run_embed(manifest, tmp_path / "one", batch_size=3)
    out = tmp_path / "two"
    (tmp_path / "manifest.json").write_text(
        json.dumps({k: getattr(manifest, k).tolist() for k in ("ids", "lat", "lon", "images")})
    )
    code = WORKER.format(
        tests=str(Path(__file__).parent), manifest=str(tmp_path / "manifest.json"), out=str(out)
    )
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for r in range(2)
    ]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(e[-2000:] for e in errors)
    # 5 chunks of 3 rows: rank 0 owned chunks 0-2, rank 1 chunks 3-4; each finished one before crashing,
    # then the remaining chunks 1, 2, 4 were split again between the two ranks
    crashed = [json.loads((tmp_path / f"two.crashed-{r}.json").read_text()) for r in range(2)]
    assert crashed == [[[0, 1]], [[3, 4]]]
    assert [json.loads((tmp_path / f"two.calls-{r}.json").read_text()) for r in range(2)] == [2, 1]
    assert (out / "features.npy").read_bytes() == (tmp_path / "one" / "features.npy").read_bytes()
    assert FeatureStore.open(out).header == one.header


@pytest.mark.parametrize("on_disk", [True, False])
def test_read_rows_any_index_shape_memmap_or_memory(tmp_path, on_disk):
    values = np.random.default_rng(0).standard_normal((50, 6)).astype(np.float16)
    np.save(tmp_path / "x.npy", values)
    array = np.load(tmp_path / "x.npy", mmap_mode="r") if on_disk else values
    assert isinstance(array, np.memmap) == on_disk
    for rows in (
        np.array([7, 3, 3, 49, 0, -1]),  # unsorted, repeated, negative
        np.array([[5, 1, 9], [2, 2, 40]]),  # (B, k) -> (B, k, D)
        np.zeros((0,), dtype=np.int64),
        [4, 8],
        np.int64(11),
    ):
        out = read_rows(array, rows)
        want = values[np.asarray(rows)].astype(np.float32)
        assert out.dtype == np.float32 and out.flags.c_contiguous and out.shape == (*np.shape(rows), 6)
        np.testing.assert_array_equal(out, want)
        assert not np.shares_memory(out, array)
    out = read_rows(array, slice(10, 20))
    assert out.dtype == np.float32 and out.flags.c_contiguous and not np.shares_memory(out, array)
    np.testing.assert_array_equal(out, values[10:20].astype(np.float32))
    f32 = values.astype(np.float32)
    assert not np.shares_memory(read_rows(f32, slice(0, 5)), f32)  # a copy even when no cast is needed


def test_a_missing_array_is_a_one_line_error_and_still_a_key_error(feature_store, capsys):
    from geotoken.cli import main

    store = feature_store("g", {"visual": np.ones((4, 8), np.float32)})
    with pytest.raises(GeoTokenError, match="no array 'features' \\(has: visual\\)") as err:
        store["features"]
    assert isinstance(err.value, KeyError) and str(err.value).startswith(str(store.root))
    assert main(["align", "train", str(store.root), "-o", str(store.root.parent / "h"), "--epochs", "1"]) == 2
    out = capsys.readouterr().err
    assert "no array 'features'" in out and "Traceback" not in out
    # finished heads in -o are not trained over unasked (the stores aligned with them would be orphaned)
    done = store.root.parent / "done"
    done.mkdir()
    (done / "config.json").write_text(json.dumps({"heads": {}, "store": {"root": "/data/mp16"}}))
    assert main(["align", "train", str(store.root), "-o", str(done), "--epochs", "1"]) == 2
    assert (
        "done: holds trained alignment heads already (of /data/mp16); pass --overwrite"
        in capsys.readouterr().err
    )
    from geotoken.align import train_heads

    with pytest.raises(GeoTokenError, match=r"holds trained alignment heads already .*overwrite=True"):
        train_heads(store, done)  # the library refuses as the command does
    assert main(["align", "train", str(store.root), "-o", str(done), "--epochs", "1", "--overwrite"]) == 2
    assert "no array 'features'" in capsys.readouterr().err  # asked: it goes on to train (and needs features)
    embedded = feature_store("e", {"features": np.ones((4, 8), np.float32)})  # not aligned yet
    with pytest.raises(GeoTokenError, match="no array 'gps' .*come from `geotoken align apply HEADS STORE`"):
        embedded["gps"]

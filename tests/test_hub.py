"""Bundles on the Hugging Face Hub, without a network: the model card written at save time, `push_to_hub`
against a recording stand-in for `HfApi`, and `Geolocator.from_pretrained("ORG/NAME")` finding a bundle in a
hub cache laid out exactly as `huggingface_hub` lays it out (blobs, snapshots of symlinks, refs/main), through
the real library with HF_HUB_OFFLINE=1."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from geotoken import assets
from geotoken.bundle import (
    CardInfo,
    backbone_source,
    bundle_backbone_config,
    model_card,
    push_to_hub,
    read_bundle,
)
from geotoken.cli import main
from geotoken.errors import GeoTokenError
from geotoken.features import FeatureStore
from geotoken.io import read_json
from geotoken.predict import Geolocator
from geotoken.testing import random_bundle

torch.set_num_threads(1)
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def offline_cache(monkeypatch, tmp_path):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return random_bundle(tmp_path_factory.mktemp("bundle") / "b", gallery_rows=64, k=3)


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def cache_repo(cache, repo_id: str, folder, commit: str = COMMIT, ref: str = "main"):
    """What `snapshot_download` leaves behind: blobs named by their hash (sha256 for LFS files, git's sha1
    otherwise), snapshots/COMMIT/... as relative symlinks to them, refs/REF holding the commit hash."""
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = f.read_bytes()
        lfs = f.suffix in (".npy", ".safetensors", ".index", ".faiss") or len(data) > 10_000_000
        blob = storage / "blobs" / (hashlib.sha256(data).hexdigest() if lfs else git_blob_sha1(data))
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = storage / "snapshots" / commit / f.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (storage / "refs").mkdir(exist_ok=True)
    (storage / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it
    return storage


def test_model_card_is_written_at_save_time(bundle, tmp_path):
    card = (bundle / "README.md").read_text()
    meta = front_matter(card)
    assert (
        meta["library_name"] == "geotoken" and meta["license"] == "other" and meta["pipeline_tag"] == "other"
    )
    assert {"geotoken", "image-geolocalization"} <= set(meta["tags"]) and "datasets" not in meta
    assert "base_model" not in meta  # EfficientNet-Lite0: weights from its pip package
    assert (
        'from_pretrained("ORG/NAME")' in card and "64 located images" in card and "## Evaluation" not in card
    )
    spec = read_bundle(bundle)
    assert spec["backbone_source"] == {"kind": "package"}
    k = spec["search"]["retrieved"]  # the default search, described by what it pools
    assert f"greedy+sample+retrieval (10 samples, {k} retrieved cells), select gate" in card

    table = "| method | 25 km |\n|---|---|\n| geotoken | 12.3 |"
    info = CardInfo(license="mit", datasets=["mp16", "im2gps3k"], tags=["clip"], evaluation=table)
    out = random_bundle(tmp_path / "b2", gallery_rows=32, k=3)  # a second save with a card
    spec = read_bundle(out)
    text = model_card(spec, read_json(out / "backbone.json"), Geolocator.from_bundle(out).model.cfg, 32, info)
    meta = front_matter(text)
    assert meta["license"] == "mit" and meta["datasets"] == ["mp16", "im2gps3k"] and "clip" in meta["tags"]
    assert "## Evaluation\n\n" + table in text


def test_backbone_source_hub_or_folder(tmp_path):
    assert backbone_source({"name": "clip", "model": "openai/clip-vit-large-patch14"}) == {
        "kind": "hub",
        "repo_id": "openai/clip-vit-large-patch14",
    }
    folder = tmp_path / "my-clip"
    folder.mkdir()
    assert backbone_source({"name": "clip", "model": str(folder)}) == {
        "kind": "folder",
        "path": str(folder.resolve()),
    }
    assert backbone_source({"name": "efficientnet-lite0", "image_size": 224}) == {"kind": "package"}

    # a recorded CLIP folder is found from any working directory; `clip` replaces it; a missing one is named
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "backbone.json").write_text(json.dumps({"name": "clip", "model": "relative/clip"}))
    spec = {"backbone": "backbone.json", "backbone_source": {"kind": "folder", "path": str(folder)}}
    assert bundle_backbone_config(tmp_path / "b", spec)["model"] == str(folder)
    assert bundle_backbone_config(tmp_path / "b", spec, clip="org/other")["model"] == "org/other"
    folder.rmdir()
    with pytest.raises(
        GeoTokenError, match="CLIP backbone is the local folder .*my-clip, which does not exist"
    ):
        bundle_backbone_config(tmp_path / "b", spec)
    (tmp_path / "b" / "backbone.json").write_text(json.dumps({"name": "efficientnet-lite0"}))
    with pytest.raises(GeoTokenError, match="not clip; drop the clip option"):
        bundle_backbone_config(tmp_path / "b", spec, clip="org/other")


class RecordingHfApi:
    calls: list = []

    def __init__(self, token=None):
        self.calls.append(("init", {"token": token}))

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, **kwargs):
        root = Path(kwargs["folder_path"])
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
        card = (root / "README.md").read_text()
        self.calls.append(("upload_folder", {**kwargs, "files": files, "card": card}))
        return type(
            "CommitInfo", (), {"commit_url": f"https://huggingface.co/{kwargs['repo_id']}/commit/abc"}
        )()


@pytest.fixture
def hf_api(monkeypatch):
    RecordingHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingHfApi)
    return RecordingHfApi.calls


def test_push_to_hub_uploads_the_folder(bundle, tmp_path, hf_api):
    work = tmp_path / "b"
    shutil.copytree(bundle, work)
    url = push_to_hub(work, "me/geotoken-demo", private=True, token="hf_x", revision="dev")
    assert url == "https://huggingface.co/me/geotoken-demo/commit/abc"
    (_, init), (_, create), (_, upload) = hf_api
    assert init == {"token": "hf_x"}
    assert create == {"repo_id": "me/geotoken-demo", "repo_type": "model", "private": True, "exist_ok": True}
    assert (
        upload["repo_id"] == "me/geotoken-demo"
        and upload["repo_type"] == "model"
        and upload["revision"] == "dev"
    )
    assert upload["folder_path"] == str(work) and {"bundle.json", "README.md", "model/config.json"} <= set(upload["files"])  # fmt: skip
    assert 'from_pretrained("me/geotoken-demo")' in upload["card"] and "ORG/NAME" not in upload["card"]

    with pytest.raises(GeoTokenError, match="not a Hugging Face Hub repo id"):
        push_to_hub(work, "not a repo")
    with pytest.raises(GeoTokenError, match="not a model bundle"):
        push_to_hub(tmp_path, "me/x")
    spec = json.loads((work / "bundle.json").read_text())
    spec["backbone_source"] = {"kind": "folder", "path": "/somewhere/clip"}
    (work / "bundle.json").write_text(json.dumps(spec))
    with pytest.raises(GeoTokenError, match="local folder /somewhere/clip, which nobody else has"):
        push_to_hub(work, "me/x")
    push_to_hub(work, "me/x", allow_local_backbone=True)


def test_cli_bundle_push_to_hub(bundle, tmp_path, hf_api, capsys):
    """`geotoken bundle ... --push-to-hub` from the stage folders (a gallery store that records its backbone)."""
    src = FeatureStore.open(bundle / "gallery")
    gallery = FeatureStore.create(
        tmp_path / "gallery", src.ids, np.asarray(src.coords), dict(src.dims), backbone=read_json(bundle / "backbone.json")
    )  # fmt: skip
    for m in src.dims:
        with gallery.writer(m) as w:
            w.write(0, np.asarray(src[m]))
        gallery.mark_complete(m)
    metrics = tmp_path / "metrics.md"
    metrics.write_text("| method | 200 km |\n|---|---|\n| geotoken | 1.0 |\n")
    args = ["bundle", "--model", str(bundle / "model"), "--align", str(bundle / "align"), "--gallery", str(tmp_path / "gallery"),
            "--index", str(bundle / "gallery" / "index"), "-o", str(tmp_path / "out"), "--license", "mit",
            "--dataset", "earthviews", "--evaluation", str(metrics), "--push-to-hub", "me/demo", "--private"]  # fmt: skip
    assert main(args) == 0
    assert "pushed to https://huggingface.co/me/demo" in capsys.readouterr().out
    meta = front_matter((tmp_path / "out" / "README.md").read_text())
    assert meta["license"] == "mit" and meta["datasets"] == ["earthviews"]
    assert "| geotoken | 1.0 |" in (tmp_path / "out" / "README.md").read_text()
    assert [c[0] for c in hf_api] == ["init", "create_repo", "upload_folder"] and hf_api[1][1][
        "private"
    ] is True


def test_from_pretrained_finds_a_bundle_in_the_hub_cache(
    bundle, offline_cache, tmp_path, capsys, monkeypatch
):
    storage = cache_repo(offline_cache, "geotoken-org/tiny-bundle", bundle)
    scan = huggingface_hub.scan_cache_dir(offline_cache)  # the library recognises the layout as its own
    [repo] = scan.repos
    assert repo.repo_id == "geotoken-org/tiny-bundle" and [r.commit_hash for r in repo.revisions] == [COMMIT]
    assert {r for rev in repo.revisions for r in rev.refs} == {"main"}

    geo = Geolocator.from_pretrained("geotoken-org/tiny-bundle", device="cpu")
    assert geo.root == storage / "snapshots" / COMMIT and geo.gallery.rows == 64
    photo = Image.open(assets.sample_image())
    [pred] = geo.predict([photo], top_k=2, strategy="greedy")
    [want] = Geolocator.from_bundle(bundle).predict([photo], top_k=2, strategy="greedy")
    assert pred.to_dict()["candidates"] == want.to_dict()["candidates"]
    same = Geolocator.from_pretrained("geotoken-org/tiny-bundle", revision=COMMIT, device="cpu")
    assert same.root == geo.root

    with pytest.raises(GeoTokenError, match="'geotoken-org/missing': not a local folder, and the Hugging Face Hub could not provide it: .*HF_HUB_OFFLINE"):  # fmt: skip
        Geolocator.from_pretrained("geotoken-org/missing")
    with pytest.raises(GeoTokenError, match=r"could not provide it \(revision v2\)"):
        Geolocator.from_pretrained("geotoken-org/tiny-bundle", revision="v2")
    # a local folder of the same name wins over the repo id
    local = tmp_path / "geotoken-org" / "tiny-bundle"
    shutil.copytree(bundle, local)
    with monkeypatch.context() as m:
        m.chdir(tmp_path)
        assert Geolocator.from_pretrained("geotoken-org/tiny-bundle").root == local.relative_to(tmp_path)

    # and the CLI reads it the same way
    assert main(["predict", str(assets.sample_image()), "--model", "geotoken-org/tiny-bundle", "--top-k", "2", "--json"]) == 0  # fmt: skip
    [row] = json.loads(capsys.readouterr().out)
    assert len(row["candidates"]) == 2

"""Bundles on the Hugging Face Hub, without a network: the model card written at save time, `push_to_hub`
against a recording stand-in for `HfApi`, and `Geolocator.from_pretrained("ORG/NAME")` finding a bundle in a
hub cache laid out exactly as `huggingface_hub` lays it out (blobs, snapshots of symlinks, refs/main), through
the real library with HF_HUB_OFFLINE=1."""

import hashlib
import inspect
import json
import os
import shutil

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
    bundle_backbone_config,
    model_card,
    push_to_hub,
    read_bundle,
    set_bundle_part,
)
from geotoken.cli import main
from geotoken.encoders import backbone_source
from geotoken.errors import GeoTokenError
from geotoken.features import FeatureStore
from geotoken.io import read_json
from geotoken.predict import Geolocator
from geotoken.search.calibration import Calibration
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
    # metrics.md's own headings go under the card's (once: a rewritten card reads them back as they are)
    info.evaluation = "# Evaluation\n\n## im2gps3k\n\n" + table
    text = model_card(spec, read_json(out / "backbone.json"), Geolocator.from_bundle(out).model.cfg, 32, info)
    assert "## Evaluation\n\n### Evaluation\n\n### im2gps3k\n\n" + table in text


def test_backbone_source_hub_or_folder(tmp_path):
    assert backbone_source({"name": "clip", "clip": "openai/clip-vit-large-patch14"}) == {
        "kind": "hub",
        "repo_id": "openai/clip-vit-large-patch14",
    }
    folder = tmp_path / "my-clip"
    folder.mkdir()
    assert backbone_source({"name": "clip", "clip": str(folder)}) == {
        "kind": "folder",
        "path": str(folder.resolve()),
    }
    assert backbone_source({"name": "efficientnet-lite0", "image_size": 224}) == {"kind": "package"}

    # a recorded CLIP folder is found from any working directory; `clip` replaces it; a missing one is named
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "backbone.json").write_text(json.dumps({"name": "clip", "model": "relative/clip"}))
    spec = {"backbone": "backbone.json", "backbone_source": {"kind": "folder", "path": str(folder)}}
    # (a backbone.json written before CLIP's weights were spelled `clip` says "model")
    assert bundle_backbone_config(tmp_path / "b", spec)["clip"] == str(folder)
    assert bundle_backbone_config(tmp_path / "b", spec, clip="org/other")["clip"] == "org/other"
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

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

    def create_commit(self, repo_id, operations, **kwargs):
        files = sorted(op.path_in_repo for op in operations)
        [card] = [op.path_or_fileobj for op in operations if op.path_in_repo == "README.md"]
        self.calls.append(
            ("create_commit", {"repo_id": repo_id, **kwargs, "files": files, "card": card.decode()})
        )
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/abc"})()


@pytest.fixture
def hf_api(monkeypatch):
    RecordingHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingHfApi)
    return RecordingHfApi.calls


def snapshot(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_push_to_hub_uploads_the_bundle(bundle, tmp_path, hf_api):
    work = tmp_path / "b"
    shutil.copytree(bundle, work)
    for stray in (".DS_Store", "stage.json", ".README.md.x1y2.tmp", "model/.DS_Store"):
        (work / stray).write_text("not part of the bundle")
    before = snapshot(work)
    url = push_to_hub(
        work, "me/geotoken-demo", private=True, token="hf_x", revision="dev", commit_message="hi"
    )
    assert url == "https://huggingface.co/me/geotoken-demo/commit/abc"
    (_, init), (_, create), (_, branch), (_, commit) = hf_api
    assert init == {"token": "hf_x"}
    assert create == {"repo_id": "me/geotoken-demo", "repo_type": "model", "private": True, "exist_ok": True}
    assert branch == {"repo_id": "me/geotoken-demo", "branch": "dev", "repo_type": "model", "exist_ok": True}
    assert commit["revision"] == "dev" and commit["repo_type"] == "model" and commit["commit_message"] == "hi"
    want = sorted(["README.md", *(f for f in snapshot(bundle) if f != "README.md")])
    assert commit["files"] == want and {
        "bundle.json",
        "model/config.json",
        "gallery/index/index.json",
    } <= set(want)
    assert 'from_pretrained("me/geotoken-demo")' in commit["card"] and "ORG/NAME" not in commit["card"]

    # a second repo: its own id in the card; no branch for main; the folder never changes
    hf_api.clear()
    push_to_hub(work, "me/second", revision="main")
    [commit] = [c for name, c in hf_api if name == "create_commit"]
    assert "create_branch" not in [name for name, _ in hf_api]
    assert "--model me/second" in commit["card"] and "geotoken-demo" not in commit["card"]
    assert snapshot(work) == before and "ORG/NAME" in (work / "README.md").read_text()

    with pytest.raises(GeoTokenError, match="not a Hugging Face Hub repo id"):
        push_to_hub(work, "not a repo")
    with pytest.raises(GeoTokenError, match="not a Hugging Face Hub repo id"):
        push_to_hub(work, "me/a--b")  # huggingface_hub's own rule
    with pytest.raises(GeoTokenError, match="not a model bundle"):
        push_to_hub(tmp_path, "me/x")
    spec = json.loads((work / "bundle.json").read_text())
    spec["backbone_source"] = {"kind": "folder", "path": "/somewhere/clip"}
    (work / "bundle.json").write_text(json.dumps(spec))
    with pytest.raises(GeoTokenError, match="local folder /somewhere/clip, which nobody else has"):
        push_to_hub(work, "me/x")
    push_to_hub(work, "me/x", allow_local_backbone=True)


def test_a_geolocator_saves_and_pushes_itself_as_it_is_now(bundle, tmp_path, hf_api):
    """`save_pretrained` / `push_to_hub` on a loaded Geolocator: its bundle with the search defaults and
    calibration set in memory, loaded back by `from_pretrained`; the source bundle stays as it was."""
    import dataclasses

    before = snapshot(bundle)
    geo = Geolocator.from_bundle(bundle, device="cpu")
    geo.options = dataclasses.replace(geo.options, strategy="beam", beam_width=3)
    geo.calibration = Calibration()
    saved = geo.save_pretrained(tmp_path / "saved")
    again = Geolocator.from_pretrained(saved, device="cpu")
    assert again.options == geo.options and again.calibration is not None and again.reward is None
    assert read_bundle(saved)["calibration"] == "calibration.json" and snapshot(bundle) == before
    assert "beam (width 3)" in (saved / "README.md").read_text()
    for name, param in geo.model.state_dict().items():
        assert torch.equal(param, again.model.state_dict()[name])
    with pytest.raises(GeoTokenError, match="holds a model bundle already"):
        geo.save_pretrained(saved)
    geo.calibration = None  # dropped in memory: dropped from the copy
    assert read_bundle(geo.save_pretrained(saved, overwrite=True)).get("calibration") is None
    with pytest.raises(GeoTokenError, match="is the bundle it would copy"):
        geo.save_pretrained(bundle, overwrite=True)

    url = again.push_to_hub("me/saved", token="hf_x")
    assert url == "https://huggingface.co/me/saved/commit/abc"
    [commit] = [c for name, c in hf_api if name == "create_commit"]
    assert {"bundle.json", "calibration.json", "model/model.safetensors"} <= set(commit["files"])
    assert 'from_pretrained("me/saved")' in commit["card"]
    assert not [p for p in bundle.parent.iterdir() if p.name.startswith("tmp")]  # its temporary copy is gone
    parts = Geolocator(geo.model, geo.gallery, index=geo.index, query_modalities=geo.query_modalities)
    with pytest.raises(GeoTokenError, match="assembled in memory"):
        parts.save_pretrained(tmp_path / "x")


def test_a_copied_bundle_records_no_local_path(bundle):
    assert "source" not in read_json(bundle / "gallery" / "store.json")
    assert "store" not in read_json(bundle / "gallery" / "index" / "index.json")


def test_push_failures_are_one_error_naming_the_repo(bundle, monkeypatch):
    from huggingface_hub.errors import HfHubHTTPError, HTTPError

    httpx = pytest.importorskip("httpx2")  # the HTTP library under huggingface_hub 2
    unauthorized = httpx.Response(
        401, request=httpx.Request("POST", "https://huggingface.co/api/repos/create")
    )

    # HF_HUB_OFFLINE=1 (the fixture): the real HfApi refuses before any request
    with pytest.raises(
        GeoTokenError, match="me/x: pushing .* failed: OfflineModeIsEnabled: .*offline mode is enabled"
    ):
        push_to_hub(bundle, "me/x", token="hf_x")

    class Failing(RecordingHfApi):
        error: Exception

        def create_repo(self, repo_id, **kwargs):
            raise self.error

    monkeypatch.setattr(huggingface_hub, "HfApi", Failing)
    for error, reason in [
        (
            HTTPError("[Errno -2] Name or service not known"),
            "HTTPError: \\[Errno -2\\] Name or service",
        ),  # no network
        (
            HfHubHTTPError("401 Client Error: Unauthorized", response=unauthorized),
            "HfHubHTTPError: 401 Client Error",
        ),
        (ConnectionResetError("reset by peer"), "ConnectionResetError: reset by peer"),
    ]:
        Failing.error = error
        with pytest.raises(GeoTokenError, match=f"me/x: pushing .* failed \\(revision dev\\): {reason}"):
            push_to_hub(bundle, "me/x", revision="dev")


def test_the_card_follows_calibration_and_reward(bundle, tmp_path):
    work = tmp_path / "b"
    shutil.copytree(bundle, work)
    spec = json.loads((work / "bundle.json").read_text())
    spec["card"] = {**spec["card"], "license": "mit", "evaluation": "| a | b |"}
    (work / "bundle.json").write_text(json.dumps(spec))
    Calibration().save(work / "calibration.json")
    set_bundle_part(work, "calibration", "calibration.json")
    (work / "reward").mkdir()  # set_bundle_part only needs the part to exist
    set_bundle_part(work, "reward", "reward")
    card = (work / "README.md").read_text()
    assert "| calibrated | yes |" in card and "| reward scorer | yes |" in card
    assert front_matter(card)["license"] == "mit" and "## Evaluation\n\n| a | b |" in card

    # a bundle saved before bundle.json kept the card's info: its README's license and evaluation stay
    del spec["card"]
    (work / "bundle.json").write_text(json.dumps(spec))
    set_bundle_part(work, "reward", None)
    card = (work / "README.md").read_text()
    assert "| reward scorer | no |" in card and front_matter(card)["license"] == "mit" and "| a | b |" in card


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
    stages = ["bundle", "--model", str(bundle / "model"), "--align", str(bundle / "align"), "--gallery", str(tmp_path / "gallery"),
              "--index", str(bundle / "gallery" / "index")]  # fmt: skip
    args = [*stages, "-o", str(tmp_path / "out"), "--license", "mit", "--dataset", "earthviews", "--evaluation",
            str(metrics), "--push-to-hub", "me/demo", "--private", "--revision", "dev"]  # fmt: skip
    assert main(args) == 0
    assert "pushed to https://huggingface.co/me/demo" in capsys.readouterr().out
    meta = front_matter((tmp_path / "out" / "README.md").read_text())
    assert meta["license"] == "mit" and meta["datasets"] == ["earthviews"]
    assert "| geotoken | 1.0 |" in (tmp_path / "out" / "README.md").read_text()
    assert [c[0] for c in hf_api] == ["init", "create_repo", "create_branch", "create_commit"]
    assert hf_api[1][1]["private"] is True and hf_api[3][1]["revision"] == "dev"

    # what would stop the push is found before the bundle is written
    for bad, message in [
        (["--push-to-hub", "me/a b"], "not a Hugging Face Hub repo id"),
        (["--push-to-hub", "me/x", "--link-gallery"], "--link-gallery with --push-to-hub"),
        (["--license", "MIT License"], "license 'MIT License'"),
    ]:
        assert main([*stages, "-o", str(tmp_path / "never"), *bad]) == 2
        assert message in capsys.readouterr().err and not (tmp_path / "never").exists()
    assert main(stages) == 2 and "pass -o/--out" in capsys.readouterr().err

    # `geotoken bundle push`: an existing bundle, as it is now
    hf_api.clear()
    push = [
        "bundle",
        "push",
        str(tmp_path / "out"),
        "me/other",
        "--revision",
        "v2",
        "--commit-message",
        "calibrated",
    ]
    assert main(push) == 0 and "pushed to https://huggingface.co/me/other" in capsys.readouterr().out
    [commit] = [c for name, c in hf_api if name == "create_commit"]
    assert commit["revision"] == "v2" and commit["commit_message"] == "calibrated"
    assert "--model me/other" in commit["card"] and "| geotoken | 1.0 |" in commit["card"]
    assert (
        main(["bundle", "push", str(tmp_path), "me/other"]) == 2
        and "not a model bundle" in capsys.readouterr().err
    )


def test_from_pretrained_passes_hub_options_and_expands_home(bundle, tmp_path, monkeypatch):
    seen = {}

    def snapshot_download(repo_id, **kwargs):
        seen.update(repo_id=repo_id, **kwargs)
        return str(bundle)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    geo = Geolocator.from_pretrained(
        "me/private", token="hf_x", cache_dir=tmp_path / "c", local_files_only=True
    )
    assert geo.root == bundle
    assert seen == {"repo_id": "me/private", "revision": None, "token": "hf_x", "cache_dir": tmp_path / "c", "local_files_only": True}  # fmt: skip

    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(bundle, tmp_path / "mine")
    assert Geolocator.from_pretrained("~/mine").root == tmp_path / "mine"
    assert (
        inspect.signature(Geolocator.from_bundle).parameters["device"].default == "auto"
    )  # as from_pretrained


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

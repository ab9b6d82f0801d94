"""The CLIP vision tower through ONNX Runtime (`geotoken.encoders.ort`) on a tiny random CLIP: the same
features as torch fp32, an int8 copy close to them, "auto" choosing per machine, the on-disk export cache
(reused, rebuilt when damaged, never half-written) and the `--backbone-runtime` flag."""

import json

import pytest
import torch
import torch.nn.functional as F

from geotoken.bench.geoclip import bench_images
from geotoken.bench.predict import backbone_agreement, backbone_compute, backbone_variants
from geotoken.cli import main
from geotoken.encoders import load_backbone, ort
from geotoken.encoders.clip import resolve_precision
from geotoken.encoders.geoclip import GeoCLIPGeolocator
from geotoken.errors import GeoTokenError
from geotoken.predict import Geolocator

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def images():
    return bench_images(4, seed=5)


@pytest.fixture(autouse=True)
def amd_cpu(monkeypatch):
    """These tests exercise ONNX Runtime under "auto": as on a CPU where auto picks it (not Intel's)."""
    monkeypatch.setattr(ort, "cpu_vendor", lambda: "AuthenticAMD")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh geotoken cache; the ONNX exports land in cache / clip-onnx."""
    monkeypatch.setenv("GEOTOKEN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "clip-onnx"


@pytest.fixture
def exports(monkeypatch):
    """Counts the fp32 exports and the int8 quantisations."""
    calls = {"fp32": 0, "int8": 0}
    export, quantize = ort._export_fp32, ort._quantize_int8

    def counted_export(*a, **k):
        calls["fp32"] += 1
        return export(*a, **k)

    def counted_quantize(*a, **k):
        calls["int8"] += 1
        return quantize(*a, **k)

    monkeypatch.setattr(ort, "_export_fp32", counted_export)
    monkeypatch.setattr(ort, "_quantize_int8", counted_quantize)
    return calls


def clip(clip_dir, **options):
    return load_backbone("clip", clip=str(clip_dir), **options)


def test_onnx_fp32_matches_torch_fp32(clip_dir, images, cache):
    torch_fp32 = clip(clip_dir, precision="fp32", runtime="torch")
    onnx_fp32 = clip(clip_dir, precision="fp32", runtime="onnx")
    assert torch_fp32.runtime == "torch" and torch_fp32.onnx is None
    assert onnx_fp32.runtime == "onnx" and onnx_fp32.onnx.cache_status == "exported"
    a, b = torch_fp32.embed(images), onnx_fp32.embed(images)  # a batch of 4 through the dynamic batch axis
    assert a.shape == b.shape == (4, torch_fp32.dim) and b.dtype == torch.float32
    assert F.cosine_similarity(a, b).min() >= 0.99999 and torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    assert torch.allclose(onnx_fp32.embed(images[:1]), b[:1], atol=1e-5)  # batch 1 too
    assert onnx_fp32.config() == torch_fp32.config() == clip(clip_dir, runtime="auto").config()


def test_onnx_int8_is_close_to_fp32(clip_dir, images, cache):
    reference = clip(clip_dir, precision="fp32", runtime="torch").embed(images)
    int8 = clip(clip_dir, precision="int8", runtime="onnx")
    assert int8.runtime == "onnx" and int8.precision == "int8"
    assert int8.net is None  # ORT quantised it, and the session holds the weights: no torch tower kept
    feats = int8.embed(images)
    assert F.cosine_similarity(feats, reference).min() > 0.99 and not torch.equal(feats, reference)


def test_auto_runtime_follows_the_machine(clip_dir, cache, monkeypatch):
    assert ort.resolve_runtime("auto", "fp32") == "onnx"
    monkeypatch.setattr(ort, "cpu_vendor", lambda: "GenuineIntel")  # MKL's fp32 is as fast: no export
    assert (
        ort.resolve_runtime("auto", "fp32") == "torch" and clip(clip_dir, precision="fp32").runtime == "torch"
    )
    assert ort.resolve_runtime("onnx", "fp32") == "onnx"  # an explicit choice still runs it
    monkeypatch.setattr(ort, "cpu_vendor", lambda: "AuthenticAMD")
    assert (
        resolve_precision("auto", runtime="onnx") == "fp32"
        and resolve_precision("bf16", runtime="onnx") == "bf16"
    )
    monkeypatch.setattr("geotoken.encoders.clip.cpu_has_bf16", lambda: True)
    assert (
        resolve_precision("auto") == "bf16" and clip(clip_dir, precision="auto").runtime == "torch"
    )  # bf16 on torch
    assert ort.resolve_runtime("auto", "bf16") == "torch" and ort.resolve_runtime("auto", "int8") == "torch"
    assert ort.resolve_runtime("auto", "fp32", "cuda") == "torch"
    assert ort.resolve_runtime("auto", "fp32", dtype="bfloat16") == "torch"
    assert ort.resolve_runtime("torch", "bf16") == "torch" and ort.resolve_runtime("onnx", "int8") == "onnx"
    assert clip(clip_dir, precision="fp32").runtime == "onnx"  # the default runtime is auto
    assert clip(clip_dir, precision="bf16").runtime == "torch"
    monkeypatch.setattr(ort, "onnx_available", lambda: False)  # as if the onnx extra were not installed
    assert clip(clip_dir, precision="fp32").runtime == "torch"
    with pytest.raises(GeoTokenError, match=r"pip install 'geotoken\[onnx\]'"):
        clip(clip_dir, precision="fp32", runtime="onnx")


def test_onnx_refuses_what_it_cannot_run(clip_dir, cache):
    with pytest.raises(GeoTokenError, match="bf16 runs on torch"):
        clip(clip_dir, precision="bf16", runtime="onnx")
    with pytest.raises(GeoTokenError, match="runtime must be one of auto, torch, onnx"):
        clip(clip_dir, runtime="tensorrt")
    with pytest.raises(GeoTokenError, match="CPU only"):
        ort.resolve_runtime("onnx", "fp32", "cuda")
    with pytest.raises(GeoTokenError, match="float32"):
        clip(clip_dir, dtype="bfloat16", precision="fp32", runtime="onnx")


def test_the_export_is_cached_and_rebuilt_when_damaged(clip_dir, images, cache, exports):
    first = clip(clip_dir, precision="int8", runtime="onnx")  # exports fp32, then quantises it
    assert first.onnx.cache_status == "exported" and exports == {"fp32": 1, "int8": 1}
    path, stamp = first.onnx.path, first.onnx.path.stat().st_mtime_ns
    want = first.embed(images)
    second = clip(clip_dir, precision="int8", runtime="onnx")
    assert second.onnx.cache_status == "loaded" and exports == {"fp32": 1, "int8": 1}
    assert second.onnx.path == path and path.stat().st_mtime_ns == stamp
    assert clip(clip_dir, precision="fp32", runtime="onnx").onnx.cache_status == "loaded"
    assert len(list(cache.iterdir())) == 2 and not list(cache.glob(".*"))  # no temporary folder left

    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a truncated graph
    third = clip(clip_dir, precision="int8", runtime="onnx")
    assert third.onnx.cache_status == "re-exported" and exports == {"fp32": 1, "int8": 2}
    assert torch.allclose(third.embed(images), want, atol=1e-6)

    manifest = path.parent / "manifest.json"  # a graph that loads but is not the one its manifest names
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "key": "another"}))
    assert clip(clip_dir, precision="int8", runtime="onnx").onnx.cache_status == "re-exported"
    manifest.unlink()  # an export killed before its manifest was written
    assert clip(clip_dir, precision="int8", runtime="onnx").onnx.cache_status == "re-exported"
    assert exports == {"fp32": 1, "int8": 4}


def test_a_cached_graph_loads_without_the_torch_tower(clip_dir, images, cache, monkeypatch):
    from geotoken.encoders.clip import CLIPBackbone

    built, load = [], CLIPBackbone._load_tower
    monkeypatch.setattr(CLIPBackbone, "_load_tower", lambda self: built.append(1) or load(self))
    first = clip(clip_dir, precision="fp32", runtime="onnx")
    assert first.onnx.cache_status == "exported" and len(built) == 1 and first.net is None  # not kept
    manifest = json.loads((first.onnx.path.parent / "manifest.json").read_text())
    assert (
        manifest["weights"]
        == first.onnx.weights
        == ort.files_key(clip_dir, dtype="float32", attention="sdpa")
    )
    second = clip(clip_dir, precision="fp32", runtime="onnx")
    assert second.onnx.cache_status == "loaded" and len(built) == 1 and second.net is None
    assert second.dim == first.dim and second.crop == first.crop  # from the config, not the tower
    onnx_features = second.embed(images)
    tower = second.torch_tower()  # built on demand (a move off the CPU, FLOP counting)
    assert len(built) == 2 and second.torch_tower() is tower and second.net is tower
    with torch.no_grad():
        torch_features = tower(
            pixel_values=torch.stack([second.preprocess(im) for im in images])
        ).image_embeds
    assert torch.allclose(onnx_features, torch_features, atol=1e-5, rtol=1e-4)


def test_a_batch_off_the_cpu_runs_on_a_torch_tower_built_and_moved_for_it(clip_dir, images, cache):
    # runtime auto on a CPU machine chooses ONNX Runtime; a batch on another device (a GPU, here the
    # "meta" device, which needs none) goes to the torch tower, built on first use and moved to that device
    backbone = clip(clip_dir, precision="fp32", runtime="auto")
    assert backbone.runtime == "onnx" and backbone.net is None
    cpu_features = backbone.embed(images)
    assert backbone.net is None  # CPU batches stay on the graph
    with torch.no_grad():
        out = backbone(torch.zeros(2, 3, *backbone.crop, device="meta"))
    assert out.device.type == "meta" and out.shape == (2, cpu_features.shape[1])
    assert next(backbone.net.parameters()).device.type == "meta"
    onnx_only = clip(clip_dir, precision="fp32", runtime="onnx")  # asked for ONNX: never the torch tower
    with pytest.raises(GeoTokenError, match="runtime onnx runs on the CPU only, not on meta"):
        onnx_only(torch.zeros(2, 3, *onnx_only.crop, device="meta"))
    assert onnx_only.net is None


def test_files_key_follows_the_files_and_remembers_their_hashes(tmp_path, monkeypatch):
    folder, memo = tmp_path / "model", tmp_path / "memo.json"
    folder.mkdir()
    assert ort.files_key(folder, memo) is None  # no weight file: the caller hashes the tower instead
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"weights")
    hashed, sha = [], ort.sha256_file
    monkeypatch.setattr(ort, "sha256_file", lambda path, **kw: hashed.append(path) or sha(path, **kw))
    key = ort.files_key(folder, memo, dtype="float32", attention="sdpa")
    assert len(hashed) == 2 and ort.files_key(folder, memo, dtype="float32", attention="sdpa") == key
    assert len(hashed) == 2  # remembered by path, size and mtime
    assert ort.files_key(folder, memo, dtype="float32", attention="eager") != key
    (folder / "model.safetensors").write_bytes(b"other weights")
    assert ort.files_key(folder, memo, dtype="float32", attention="sdpa") != key and len(hashed) == 3
    blob = tmp_path / "blobs" / ("ab" * 32)  # an HF cache blob: named by its SHA-256, never read
    blob.parent.mkdir()
    blob.write_bytes(b"blob")
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").symlink_to(blob)
    assert ort.file_sha256(folder / "model.safetensors", {}) == "ab" * 32 and len(hashed) == 3
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").symlink_to(tmp_path / "gone.safetensors")  # an interrupted download
    with pytest.raises(GeoTokenError, match="cannot read weight file .*gone.safetensors"):
        ort.files_key(folder, memo)


def test_the_key_follows_the_weights(clip_dir, cache):
    a = clip(clip_dir, runtime="torch")
    key = ort.weights_sha256(a.net)
    assert key == ort.weights_sha256(clip(clip_dir, runtime="torch").net)
    with torch.no_grad():
        next(a.net.parameters()).add_(1e-3)
    assert ort.weights_sha256(a.net) != key
    assert ort.graph_key(key, (32, 32), "fp32") != ort.graph_key(key, (32, 32), "int8")
    assert ort.graph_key(key, (32, 32), "fp32") != ort.graph_key(key, (64, 64), "fp32")


def test_a_failed_export_leaves_nothing(clip_dir, cache, monkeypatch):
    def killed(net, size, out):
        out.write_bytes(b"half a graph")
        raise KeyboardInterrupt

    monkeypatch.setattr(ort, "_export_fp32", killed)
    with pytest.raises(KeyboardInterrupt):
        clip(clip_dir, precision="fp32", runtime="onnx")
    assert not list(cache.iterdir())


def test_geoclip_predictor_and_bundles_take_a_runtime(
    clip_dir, files, images, tmp_path, cache, random_bundle
):
    from geotoken.pretrained import GeoCLIPPredictor

    geo = GeoCLIPPredictor.load(clip_dir, device="cpu", files=files, cache_dir=tmp_path, runtime="onnx")
    assert geo.model.backbone.precision == "fp32"  # "auto" precision under runtime onnx: fp32, on any CPU
    info = geo.info()
    assert geo.model.backbone.runtime == "onnx" and info["backbone_runtime"] == "onnx"
    assert info["backbone_precision"] == "fp32" and "runtime" not in info["backbone"]
    assert len(geo.predict(images[:2], top_k=1)) == 2
    torch_geo = GeoCLIPPredictor.load(
        clip_dir, device="cpu", files=files, cache_dir=tmp_path, runtime="torch"
    )
    assert torch_geo.model.backbone.runtime == "torch" and torch_geo.info()["backbone"] == info["backbone"]

    folder = random_bundle()  # an EfficientNet bundle: runtimes apply to CLIP only
    assert Geolocator.from_bundle(folder, backbone_runtime="torch").info()["backbone_runtime"] is None
    with pytest.raises(GeoTokenError, match="CLIP"):
        Geolocator.from_bundle(folder, backbone_runtime="onnx")


def test_agreement_rows_name_the_runtime(clip_dir, files, images, tmp_path, cache):
    geoclip = GeoCLIPGeolocator(files, cache_dir=tmp_path)
    res = backbone_agreement(clip_dir, ("fp32/torch", "fp32/onnx", "int8/onnx"), images, geoclip=geoclip)
    assert list(res) == ["fp32/torch", "fp32/onnx", "int8/onnx"]
    assert [r["runtime"] for r in res.values()] == ["torch", "onnx", "onnx"]
    assert res["fp32/onnx"]["cosine_min"] > 0.99999 and res["fp32/onnx"]["geoclip_top1_agreement"] == 1.0
    assert res["int8/onnx"]["resolved"] == "int8" and res["int8/onnx"]["cosine_min"] > 0.99


def test_bench_variants_are_one_per_resolved_pair(monkeypatch):
    monkeypatch.setattr("geotoken.encoders.clip.cpu_has_bf16", lambda: False)
    keep, skipped = backbone_variants(("fp32", "auto", "bf16"), ("torch", "auto", "onnx"))
    assert keep == ["fp32/torch", "fp32/auto", "bf16/torch"]
    assert skipped["auto/torch"] == "runs as fp32/torch" and skipped["fp32/onnx"] == "runs as fp32/auto"
    assert "bf16 runs on torch" in skipped["bf16/onnx"]


def test_backbone_compute_counts_the_tower_and_rates_each_variant(clip_dir, images, cache):
    class Geo:  # what backbone_compute reads of a Geolocator
        backbone = clip(clip_dir, precision="fp32", runtime="torch")

    timed = {v: {"greedy": {"4": {"stages_ms": {"backbone": ms}}}} for v, ms in (("a", 10.0), ("b", 5.0))}
    res = backbone_compute({"a": Geo()}, timed, "greedy", "4", images[0])
    cfg = Geo.backbone.net.config
    tokens = (cfg.image_size // cfg.patch_size) ** 2 + 1
    per_layer = 2 * tokens * cfg.hidden_size * (4 * cfg.hidden_size + 2 * cfg.intermediate_size)
    assert res["gflop_per_image"] * 1e9 >= cfg.num_hidden_layers * per_layer  # at least the Linear layers
    a, b = res["variants"]["a"], res["variants"]["b"]
    assert b["gflops"] == pytest.approx(2 * a["gflops"]) and res["fp32_matmul_gflops"] > 0
    assert a["share_of_fp32_matmul"] == pytest.approx(a["gflops"] / res["fp32_matmul_gflops"])


def test_cli_predict_takes_a_backbone_runtime(shipped, clip_dir, tmp_path, capsys, offline_hub):
    cache = tmp_path / "geotoken-cache" / "clip-onnx"  # offline_hub's cache folder
    photo = tmp_path / "a.png"
    bench_images(1, seed=1)[0].save(photo)
    args = ["predict", str(photo), "--model", "geoclip", "--clip", str(clip_dir), "--top-k", "1", "--json"]
    args += ["--backbone-precision", "fp32"]  # the same arithmetic on both runtimes
    assert main([*args, "--backbone-runtime", "onnx"]) == 0
    onnx_rows = json.loads(capsys.readouterr().out)
    assert main([*args, "--backbone-runtime", "torch"]) == 0
    torch_rows = json.loads(capsys.readouterr().out)
    assert onnx_rows[0]["lat"] == pytest.approx(torch_rows[0]["lat"]) and len(list(cache.iterdir())) == 1
    with pytest.raises(SystemExit):
        main([*args, "--backbone-runtime", "tensorrt"])
    assert main([*args, "--backbone-precision", "bf16", "--backbone-runtime", "onnx"]) == 2  # explicit bf16
    assert "bf16 runs on torch" in capsys.readouterr().err

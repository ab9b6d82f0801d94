"""CLIP backbone precisions (fused attention, bf16 autocast, int8 Linear layers) on a tiny random CLIP:
each must stay close to fp32 with eager attention, and "auto" must pick per machine."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from geotoken.bench.geoclip import bench_images
from geotoken.bench.predict import backbone_agreement
from geotoken.encoders import base, clip, load_backbone
from geotoken.encoders.clip import PRECISIONS, resolve_precision
from geotoken.encoders.geoclip import GeoCLIPGeolocator
from geotoken.errors import GeoTokenError
from geotoken.predict import Geolocator


@pytest.fixture(scope="module")
def images():
    return bench_images(6, seed=3)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_precisions_agree_with_fp32_eager(clip_dir, images, precision, offline_hub):
    ref = load_backbone("clip", model=str(clip_dir), attention="eager")
    assert ref.torch_tower().config._attn_implementation == "eager"
    fast = load_backbone("clip", model=str(clip_dir), precision=precision, runtime="torch")
    assert fast.net.config._attn_implementation == "sdpa" and fast.precision == precision
    quantised = [m for m in fast.net.modules() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)]
    assert bool(quantised) == (precision == "int8")  # every Linear, and only for int8
    assert not [m for m in fast.net.modules() if type(m) is torch.nn.Linear] or precision != "int8"
    a, b = ref.embed(images), fast.embed(images)
    assert b.dtype == torch.float32 and b.shape == a.shape
    cos = F.cosine_similarity(a, b, dim=1)
    assert cos.min() > {"fp32": 0.99999, "bf16": 0.999, "int8": 0.995}[precision]
    if precision != "fp32":
        assert not torch.equal(a, b)  # the precision really changed the arithmetic


def test_auto_precision_follows_the_machine(monkeypatch):
    monkeypatch.setattr(clip, "cpu_has_bf16", lambda: True)
    assert resolve_precision("auto") == "bf16"
    monkeypatch.setattr(clip, "cpu_has_bf16", lambda: False)
    assert resolve_precision("auto") == "fp32" and resolve_precision("auto", "cuda") == "fp32"
    assert [resolve_precision(p) for p in PRECISIONS[1:]] == list(PRECISIONS[1:])
    with pytest.raises(GeoTokenError, match="precision"):
        resolve_precision("fp16")


@pytest.fixture
def cpuinfo(monkeypatch, tmp_path):
    """A file that stands in for /proc/cpuinfo: write the text to test."""
    info = tmp_path / "cpuinfo"
    real_open = open
    monkeypatch.setattr(
        "builtins.open", lambda p, *a, **k: real_open(info if p == "/proc/cpuinfo" else p, *a, **k)
    )
    return info


def test_cpu_flags_are_read(cpuinfo):
    cpuinfo.write_text("processor : 0\nflags\t\t: fpu avx2 avx512f\n")
    assert base.cpu_has_bf16() is False
    cpuinfo.write_text("processor : 0\nflags\t\t: fpu avx2 avx512f amx_bf16\n")
    assert base.cpu_has_bf16() is True


def test_agreement_check_reports_each_precision(clip_dir, files, images, tmp_path, offline_hub):
    geoclip = GeoCLIPGeolocator(files, cache_dir=tmp_path)
    res = backbone_agreement(clip_dir, ("fp32", "int8"), images, geoclip=geoclip)
    assert set(res) == {"fp32", "int8"}
    assert res["fp32"]["cosine_min"] > 0.99999 and res["fp32"]["geoclip_top1_agreement"] == 1.0
    assert res["fp32"]["passes"] and res["int8"]["resolved"] == "int8"
    assert 0.99 < res["int8"]["cosine_min"] <= res["int8"]["cosine_mean"] <= 1.0 + 1e-6
    assert res["int8"]["passes"] == (
        res["int8"]["cosine_min"] >= 0.999 and res["int8"]["geoclip_top1_agreement"] >= 0.99
    )


def test_non_clip_bundle_refuses_other_precisions(random_bundle):
    folder = random_bundle()
    assert Geolocator.from_bundle(folder, backbone_precision="auto").backbone.name == "efficientnet-lite0"
    with pytest.raises(GeoTokenError, match="CLIP"):
        Geolocator.from_bundle(folder, backbone_precision="int8")


def test_geoclip_predictor_takes_a_precision(clip_dir, files, images, tmp_path, offline_hub):
    from geotoken.pretrained import GeoCLIPPredictor

    geo = GeoCLIPPredictor.load(clip_dir, device="cpu", files=files, cache_dir=tmp_path, precision="int8")
    assert geo.model.backbone.precision == "int8" and geo.info()["backbone"]["name"] == "clip"
    preds = geo.predict(images[:2], top_k=1)
    assert len(preds) == 2 and np.isfinite(preds[0].candidates[0].lat)


def test_cpu_vendor_is_read(cpuinfo):
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu avx2\n")
    assert base.cpu_vendor() == "AuthenticAMD"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu\n")
    assert base.cpu_vendor() == ""

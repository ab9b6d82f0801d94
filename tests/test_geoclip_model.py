"""GeoCLIP as a built-in geolocator: the same top-k as the `geoclip` package's own model, a gallery cache
that is written once and never trusted blindly, strict weight loading.

The CLIP tower is a tiny random `transformers` CLIPModel with GeoCLIP's 768-d projection, saved to a folder;
GeoCLIP's own heads, temperature and gallery coordinates come from the installed wheel; nothing is downloaded.
"""

import dataclasses
import json

import huggingface_hub.constants
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from geotoken import assets
from geotoken.encoders import geoclip as geoclip_module
from geotoken.encoders import load_gps_encoder
from geotoken.encoders.base import ImageBackbone
from geotoken.encoders.geoclip import GeoCLIPFiles, GeoCLIPGeolocator, read_gallery
from geotoken.errors import GeoTokenError


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """Folder with a random 2-layer CLIP (32 px images, 768-d projection) and its CLIPImageProcessor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    folder = tmp_path_factory.mktemp("tiny-clip-768")
    tower = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    text = dict(tower, vocab_size=64, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)  # fmt: skip
    config = CLIPConfig(
        text_config=text, vision_config=dict(tower, image_size=32, patch_size=8), projection_dim=768
    )
    torch.manual_seed(0)
    CLIPModel(config).eval().save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder
    )
    return folder


def subset_csv(path, every: int):
    """Every `every`-th row of the wheel's gallery, lines copied verbatim."""
    lines = assets.mp16_coordinates_csv().read_text().splitlines()
    path.write_text("\n".join([lines[0], *lines[1::every]]) + "\n")
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The wheel's weights with a 2,000-row slice of its gallery (GeoCLIP re-encodes the gallery per call)."""
    csv = subset_csv(tmp_path_factory.mktemp("gallery") / "coordinates_2K.csv", every=50)
    return dataclasses.replace(GeoCLIPFiles.shipped(), gallery=csv)


@pytest.fixture
def tiny_files(files, tmp_path):
    return dataclasses.replace(files, gallery=subset_csv(tmp_path / "coordinates_100.csv", every=1000))


@pytest.fixture(scope="module")
def image_paths(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 64, dtype=np.float32)
    generated = {
        "noise.png": Image.fromarray(rng.integers(0, 256, (41, 90, 3), dtype=np.uint8)),
        "ramp.png": Image.fromarray(
            np.stack(
                [ramp[None, :].repeat(64, 0), ramp[:, None].repeat(64, 1), 255 - ramp[None, :].repeat(64, 0)],
                -1,
            ).astype(np.uint8)
        ),  # fmt: skip
        "tall.png": Image.fromarray(rng.integers(0, 256, (120, 30, 3), dtype=np.uint8)),
        "gray.png": Image.fromarray(rng.integers(0, 256, (50, 50), dtype=np.uint8), mode="L"),
    }
    paths = [assets.sample_image()]
    for name, image in generated.items():
        image.save(folder / name)
        paths.append(folder / name)
    return paths


@pytest.mark.slow
def test_same_top5_as_geoclips_own_model(tiny_clip, files, image_paths, tmp_path):
    from geoclip import GeoCLIP
    from geoclip.model.misc import load_gps_data

    torch.set_num_threads(2)
    theirs = GeoCLIP(clip_path=str(tiny_clip)).eval()  # the wheel's heads, CLIP + processor from the folder
    assert torch.equal(theirs.gps_gallery, read_gallery(GeoCLIPFiles.shipped().gallery))  # all 100K rows
    theirs.gps_gallery = load_gps_data(str(files.gallery))
    ours = GeoCLIPGeolocator.load(tiny_clip, files=files, cache_dir=tmp_path)
    assert len(ours) == len(theirs.gps_gallery) == 2000 and ours.cache_status == "computed"
    assert torch.equal(ours.latlon, theirs.gps_gallery)
    assert torch.equal(ours.logit_scale, theirs.logit_scale.detach())

    images = [Image.open(p) for p in image_paths]
    with torch.no_grad():  # the projected CLIP features, through transformers' own image processor
        pixels = torch.cat([theirs.image_encoder.preprocess_image(im.convert("RGB")) for im in images])
        want = theirs.image_encoder.CLIP.get_image_features(pixel_values=pixels)
        want = want.pooler_output if hasattr(want, "pooler_output") else want
    torch.testing.assert_close(ours.embed_images(images), want, rtol=0, atol=1e-5)

    got = ours.predict_images(images, k=5, batch_size=2)
    assert got.latlon.shape == (5, 5, 2) and got.prob.shape == got.index.shape == (5, 5)
    for i, path in enumerate(image_paths):
        gps, prob = theirs.predict(str(path), top_k=5)
        torch.testing.assert_close(got.latlon[i], gps, rtol=0, atol=1e-5)
        torch.testing.assert_close(got.prob[i], prob, rtol=0, atol=1e-5)
        assert torch.equal(ours.latlon[got.index[i]], got.latlon[i])
    assert len({tuple(g[0].tolist()) for g in got.latlon}) > 1  # the images are told apart

    one = ours.predict_images(images, k=5, batch_size=1)
    torch.testing.assert_close(one.prob, got.prob, rtol=0, atol=1e-6)
    assert torch.equal(one.index, got.index)
    full = ours.predict_features(ours.embed_images(images[:1]), k=len(ours))
    torch.testing.assert_close(full.prob.sum(), torch.tensor(1.0))  # softmax over the whole gallery


def test_gallery_cache_is_written_once_and_reused(tiny_files, tmp_path, monkeypatch):
    calls = []
    encode = geoclip_module.encode_gallery
    monkeypatch.setattr(
        geoclip_module, "encode_gallery", lambda *a, **kw: calls.append(1) or encode(*a, **kw)
    )
    monkeypatch.setenv("GEOTOKEN_CACHE", str(tmp_path / "env-cache"))
    first = GeoCLIPGeolocator(tiny_files)
    path = first.cache_path
    assert path.parent == tmp_path / "env-cache" / "geoclip" and path.name == f"gallery-{first.key[:16]}.safetensors"  # fmt: skip
    assert first.cache_status == "computed" and path.is_file() and len(calls) == 1
    stamp = path.stat().st_mtime_ns

    with torch.no_grad():
        want = F.normalize(load_gps_encoder(str(tiny_files.location_encoder))(read_gallery(tiny_files.gallery)), dim=1)  # fmt: skip
    assert torch.equal(first.gallery, want) and first.gallery.shape == (100, 512)

    second = GeoCLIPGeolocator(tiny_files)
    assert second.cache_status == "loaded" and len(calls) == 1 and path.stat().st_mtime_ns == stamp
    assert torch.equal(second.gallery, first.gallery)
    x = torch.randn(3, 768)
    assert torch.equal(first.predict_features(x).index, second.predict_features(x).index)
    second.predict_features(x)
    assert len(calls) == 1  # never per call

    other = dataclasses.replace(tiny_files, gallery=subset_csv(tmp_path / "other.csv", every=1100))
    third = GeoCLIPGeolocator(other, cache_dir=tmp_path / "explicit")
    assert third.key != first.key and third.cache_path.parent == tmp_path / "explicit" / "geoclip"
    assert third.cache_status == "computed" and len(calls) == 2

    blocked = tmp_path / "file-not-folder"
    blocked.write_text("")
    with pytest.warns(UserWarning, match="cannot write the gallery cache"):
        fourth = GeoCLIPGeolocator(tiny_files, cache_dir=blocked)
    assert fourth.cache_status == "computed" and torch.equal(fourth.gallery, first.gallery)


def corrupt_bytes(path):
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # inside the tensor data: the header still parses
    path.write_bytes(bytes(data))


def truncate(path):
    path.write_bytes(path.read_bytes()[:1000])


def garbage(path):
    path.write_bytes(b"not a safetensors file")


def wrong_key(path):  # a well-formed file that claims the key but holds other coordinates
    tensors = load_file(path)
    tensors["latlon"] = tensors["latlon"] + 1
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    save_file(tensors, path, metadata=meta)


@pytest.mark.parametrize("damage", [corrupt_bytes, truncate, garbage, wrong_key])
def test_a_damaged_cache_is_recomputed(tiny_files, tmp_path, damage):
    first = GeoCLIPGeolocator(tiny_files, cache_dir=tmp_path)
    damage(first.cache_path)
    again = GeoCLIPGeolocator(tiny_files, cache_dir=tmp_path)
    assert again.cache_status == "recomputed" and torch.equal(again.gallery, first.gallery)
    assert GeoCLIPGeolocator(tiny_files, cache_dir=tmp_path).cache_status == "loaded"
    assert [p.name for p in (tmp_path / "geoclip").iterdir()] == [first.cache_path.name]  # no temp files left


def test_missing_or_bad_weights_are_clear_errors(tiny_files, tmp_path):
    for field in ("image_head", "location_encoder", "logit_scale", "gallery"):
        missing = dataclasses.replace(tiny_files, **{field: tmp_path / "nope.pth"})
        with pytest.raises(GeoTokenError, match=f"{field.replace('_', ' ')} file .*nope.pth does not exist"):
            GeoCLIPGeolocator(missing, cache_dir=tmp_path)

    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00garbage")
    for field, what in (("image_head", "image head"), ("logit_scale", "logit scale"), ("location_encoder", "location encoder")):  # fmt: skip
        with pytest.raises(GeoTokenError, match=f"{what} weights .*junk.pth"):
            GeoCLIPGeolocator(dataclasses.replace(tiny_files, **{field: junk}), cache_dir=tmp_path / field)

    head = torch.load(tiny_files.image_head, weights_only=True)
    for name, state in (("missing", {k: v for k, v in head.items() if k != "2.bias"}), ("extra", {**head, "4.weight": torch.zeros(1)}), ("shape", {**head, "0.bias": torch.zeros(512)})):  # fmt: skip
        torch.save(state, tmp_path / f"{name}.pth")
        with pytest.raises(GeoTokenError, match=f"image head weights .*{name}.pth: expected tensors"):
            GeoCLIPGeolocator(dataclasses.replace(tiny_files, image_head=tmp_path / f"{name}.pth"), cache_dir=tmp_path)  # fmt: skip

    torch.save(torch.ones(2), tmp_path / "scale.pth")
    with pytest.raises(GeoTokenError, match="logit scale weights .*scale.pth: expected one"):
        GeoCLIPGeolocator(dataclasses.replace(tiny_files, logit_scale=tmp_path / "scale.pth"), cache_dir=tmp_path)  # fmt: skip

    loc = torch.load(tiny_files.location_encoder, weights_only=True)
    loc.pop("LocEnc2.head.0.bias")
    torch.save(loc, tmp_path / "loc.pth")
    with pytest.raises(
        GeoTokenError, match=r"location encoder weights .*loc.pth: .*Missing key.*branches\.2\.head\.bias"
    ):
        GeoCLIPGeolocator(dataclasses.replace(tiny_files, location_encoder=tmp_path / "loc.pth"), cache_dir=tmp_path / "loc")  # fmt: skip

    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("LAT,LON\n10,20\n95,0\n")
    with pytest.raises(GeoTokenError, match="gallery .*bad.csv: .*row 1"):
        GeoCLIPGeolocator(dataclasses.replace(tiny_files, gallery=bad_csv), cache_dir=tmp_path)
    bad_csv.write_text("lat,lng\n10,20\n")
    with pytest.raises(GeoTokenError, match="gallery .*bad.csv: header must name LAT and LON"):
        GeoCLIPGeolocator(dataclasses.replace(tiny_files, gallery=bad_csv), cache_dir=tmp_path)


class SmallBackbone(ImageBackbone):
    name, dim = "small", 16

    def config(self):
        return {"name": self.name}


def test_inputs_are_checked(tiny_files, tmp_path):
    model = GeoCLIPGeolocator(tiny_files, cache_dir=tmp_path)
    with pytest.raises(GeoTokenError, match=r"shape \(B, 768\)"):
        model.predict_features(torch.zeros(2, 512))
    with pytest.raises(GeoTokenError, match="k must be between 1 and 100"):
        model.predict_features(torch.zeros(2, 768), k=101)
    with pytest.raises(GeoTokenError, match="no image backbone"):
        model.predict_images([Image.new("RGB", (8, 8))])
    with pytest.raises(GeoTokenError, match="768-d projected CLIP ViT-L/14 features; backbone .* gives 16-d"):
        GeoCLIPGeolocator(tiny_files, backbone=SmallBackbone(), cache_dir=tmp_path)
    top = model.predict_features(torch.randn(4, 768), k=3)
    assert top.latlon.dtype == torch.float32 and torch.all(top.prob[:, :-1] >= top.prob[:, 1:])
    json.dumps(top.latlon.tolist())  # plain floats

"""The built-in `geoclip` model through the same API as a bundle: `Geolocator.from_pretrained("geoclip")`,
`GeoCLIPPredictor.predict` on paths / bytes / PIL images / arrays, `geotoken predict --model geoclip` (with the
photo's EXIF GPS beside the answer) and `geotoken serve`'s app on it.

CLIP is a tiny random folder (`geotoken.testing.tiny_clip`), GeoCLIP's heads come from the installed wheel with
a 100-row slice of its gallery; nothing is downloaded.
"""

import io
import json
import weakref

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image

from geotoken import assets
from geotoken import predict as predict_module
from geotoken.cli import main
from geotoken.data.images import exif_gps
from geotoken.errors import GeoTokenError
from geotoken.geo import haversine_km
from geotoken.predict import GeoCLIPPredictor, Geolocator, Prediction, resolve_device

torch.set_num_threads(1)


pytestmark = pytest.mark.usefixtures("offline_hub")  # GeoCLIP fixtures: tests/conftest.py


def photo(seed: int, size=(60, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def jpeg(image: Image.Image, gps: tuple[float, float] | None = None, orientation: int | None = None) -> bytes:
    """JPEG bytes with EXIF GPS (degrees, minutes, seconds + N/S/E/W, as cameras write it) and orientation."""
    exif = Image.Exif()
    if orientation:
        exif[ExifTags.Base.Orientation] = orientation
    if gps:
        ifd = exif.get_ifd(ExifTags.IFD.GPSInfo)
        for value, ref_tag, tag, refs in ((gps[0], ExifTags.GPS.GPSLatitudeRef, ExifTags.GPS.GPSLatitude, "NS"), (gps[1], ExifTags.GPS.GPSLongitudeRef, ExifTags.GPS.GPSLongitude, "EW")):  # fmt: skip
            a = abs(value)
            d, m = int(a), int((a - int(a)) * 60)
            ifd[ref_tag] = refs[value < 0]
            ifd[tag] = (float(d), float(m), round((a - d - m / 60) * 3600, 4))
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=95, exif=exif)
    return buf.getvalue()


def test_resolve_device(monkeypatch):
    assert resolve_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == resolve_device(None) == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device() == "mps"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device() == "cpu"
    with pytest.raises(GeoTokenError, match="'gpu0': not a torch device"):
        resolve_device("gpu0")


def test_predictions_are_geoclips_top_k_with_cells_places_and_confidences(geo):
    images = [photo(i) for i in range(3)] + [Image.open(assets.sample_image())]
    preds = geo.predict(images, top_k=4, batch_size=3)
    want = geo.model.predict_images([im.convert("RGB") for im in images], k=4)
    assert len(preds) == 4 and all(isinstance(p, Prediction) for p in preds)
    for b, pred in enumerate(preds):
        assert (pred.strategy, pred.select) == ("geoclip", "softmax") and len(pred.candidates) == 4
        assert [np.exp(c.logp) for c in pred.candidates] == pytest.approx(want.prob[b].tolist(), abs=1e-6)
        assert [[c.lat, c.lon] for c in pred.candidates] == want.latlon[b].tolist()
        assert (pred.lat, pred.lon) == (pred.candidates[0].lat, pred.candidates[0].lon)
        for c in pred.candidates:
            assert (
                c.probability_within_km == 200
                and c.level == 20
                and len(c.cell) == 11
                and c.source == "geoclip"
            )
            # the softmax mass around the coordinate: at least its own probability, growing with the radius
            w = c.within
            assert np.exp(c.logp) - 1e-6 <= w["25km"] <= w["200km"] <= w["750km"] <= 1 + 1e-9
            assert c.probability == w["200km"]
            assert len(c.polygon) == 4 and max(haversine_km(c.lat, c.lon, *np.array(c.polygon).T)) < 0.05
            assert c.place["country"] and c.level_confidence is None
        json.dumps(pred.to_dict())
    # the mass within a radius, by brute force over the gallery for one candidate
    c = preds[3].candidates[1]
    probs = geo.model(geo.model.embed_images(images[3:])).softmax(-1)[0].numpy()
    gallery = geo.model.latlon.numpy().astype(np.float64)
    near = haversine_km(c.lat, c.lon, gallery[:, 0], gallery[:, 1]) <= 750
    assert c.within["750km"] == pytest.approx(float(probs[near].sum()), abs=1e-5)
    # top_k beyond the gallery: all of it; the probabilities of the whole gallery sum to 1
    [everything] = geo.predict(images[:1], top_k=1000)
    assert len(everything.candidates) == 100
    assert sum(np.exp(c.logp) for c in everything.candidates) == pytest.approx(1.0, abs=1e-5)
    assert everything.note == "100 of the 1000 candidates asked for: the gallery has 100 coordinates"


def test_paths_bytes_pil_and_arrays_give_the_same_answer_exif_orientation_applied(geo, tmp_path):
    upright = photo(7, size=(48, 72))
    data = jpeg(upright.transpose(Image.Transpose.ROTATE_90), orientation=6)  # stored sideways, tagged
    path = tmp_path / "sideways.jpg"
    path.write_bytes(data)
    decoded = Image.open(io.BytesIO(data))
    assert decoded.size == (72, 48)  # as stored
    inputs = [
        path,
        str(path),
        data,
        decoded,
        np.asarray(Image.open(path).transpose(Image.Transpose.ROTATE_270)),
    ]
    preds = geo.predict(inputs, top_k=3)
    first = [[c.lat, c.lon, c.probability] for c in preds[0].candidates]
    for p in preds[1:]:
        np.testing.assert_allclose([[c.lat, c.lon, c.probability] for c in p.candidates], first, atol=1e-6)
    [sideways] = geo.predict(np.asarray(Image.open(path)), top_k=3)  # the raw pixels, orientation ignored
    assert [c.probability for c in sideways.candidates] != pytest.approx([x[2] for x in first], abs=1e-6)
    floats = np.asarray(upright, dtype=np.float32) / 255
    [a], [b] = geo.predict(floats), geo.predict(upright)
    assert a.candidates[0].probability == pytest.approx(b.candidates[0].probability, abs=1e-6)

    with pytest.raises(GeoTokenError, match="image 0: an image array must be"):
        geo.predict(np.zeros((4, 4, 2), dtype=np.uint8))
    with pytest.raises(GeoTokenError, match="uint8 or float in"):
        geo.predict([np.zeros((4, 4), dtype=np.int64)])
    with pytest.raises(GeoTokenError, match="image 1: expected a path, bytes"):
        geo.predict([upright, 3.5])
    with pytest.raises(GeoTokenError, match="nope.jpg: image file not found"):
        geo.predict([tmp_path / "nope.jpg"])
    with pytest.raises(GeoTokenError, match="image 0: cannot decode"):
        geo.predict([b"not an image"])


def test_search_options_are_refused_by_name(geo):
    im = photo(0)
    assert geo.predict([im], strategy="geoclip", select="softmax", dtype=None)[0].candidates
    with pytest.raises(
        GeoTokenError, match=r"geoclip: search option\(s\) \['beam_width', 'strategy'\] apply to"
    ):
        geo.predict([im], strategy="beam", beam_width=3)
    with pytest.raises(GeoTokenError, match=r"geoclip: unknown option\(s\) \['foo'\]"):
        geo.predict([im], foo=1)
    with pytest.raises(GeoTokenError, match="top_k must be a whole number in 1..1000"):
        geo.predict([im], top_k=0)
    info = geo.info()
    json.dumps(info)
    assert info["name"] == "geoclip" and info["gallery_rows"] == 100 and info["strategies"] == ["geoclip"]
    assert info["backbone"]["name"] == "clip" and info["parameters"] > 0


def test_long_lists_are_read_and_run_in_chunks(geo, tmp_path, monkeypatch):
    """1,000 paths: at most one chunk of decoded photos is alive at a time, and chunks change no answer."""
    paths = []
    for i in range(1000):
        paths.append(tmp_path / f"{i:04d}.png")
        Image.new("RGB", (16, 12), (i % 256, (7 * i) % 256, (13 * i) % 256)).save(paths[-1])
    alive, peak = set(), [0]
    real = predict_module.as_image

    def counted(x, name="image"):
        im = real(x, name)
        alive.add(id(im))
        weakref.finalize(im, alive.discard, id(im))
        peak[0] = max(peak[0], len(alive))
        return im

    with monkeypatch.context() as m:
        m.setattr(predict_module, "as_image", counted)
        preds = geo.predict(paths, top_k=2, batch_size=64)
    assert len(preds) == 1000 and peak[0] <= 2 * 64
    again = geo.predict(paths[::100], top_k=2, batch_size=3)
    for a, b in zip(again, preds[::100], strict=True):
        assert [c.probability for c in a.candidates] == pytest.approx([c.probability for c in b.candidates], abs=1e-5)  # fmt: skip


def test_from_pretrained_geoclip(shipped, clip_dir, monkeypatch):
    geo = Geolocator.from_pretrained("geoclip", clip=clip_dir, device="auto")
    assert isinstance(geo, GeoCLIPPredictor) and len(geo.model) == 100
    assert geo.info()["backbone"]["clip"] == str(clip_dir) and geo.device.type == resolve_device("auto")
    with pytest.raises(GeoTokenError, match="revision applies to Hugging Face Hub repos"):
        Geolocator.from_pretrained("geoclip", clip=clip_dir, revision="v1")
    with pytest.raises(GeoTokenError, match="no such folder; a model is a bundle folder .* geoclip"):
        Geolocator.from_pretrained("runs/nowhere/bundle")


def test_exif_gps():
    data = jpeg(photo(1), gps=(-33.8568, 151.2153))
    lat, lon = exif_gps(data)
    assert (lat, lon) == pytest.approx((-33.8568, 151.2153), abs=1e-5)
    assert exif_gps(Image.open(io.BytesIO(data))) == pytest.approx((lat, lon))
    assert exif_gps(jpeg(photo(1))) is None and exif_gps(b"junk") is None
    assert exif_gps(jpeg(photo(1), gps=(40.7, -74.0))) == pytest.approx((40.7, -74.0), abs=1e-5)


def test_cli_predict_geoclip_shows_exif_gps_and_distance(shipped, clip_dir, tmp_path, capsys):
    tagged = tmp_path / "sydney.jpg"
    tagged.write_bytes(jpeg(photo(2), gps=(-33.8568, 151.2153)))
    plain = tmp_path / "plain.png"
    photo(3).save(plain)
    args = ["predict", str(tagged), str(plain), "--model", "geoclip", "--clip", str(clip_dir), "--top-k", "3"]
    assert main([*args, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["file"] for r in rows] == [str(tagged), str(plain)]
    assert all(r["strategy"] == "geoclip" and len(r["candidates"]) == 3 for r in rows)
    gps = rows[0]["exif_gps"]
    assert (gps["lat"], gps["lon"]) == pytest.approx((-33.8568, 151.2153), abs=1e-5)
    want = haversine_km(gps["lat"], gps["lon"], rows[0]["lat"], rows[0]["lon"])
    assert gps["distance_km"] == pytest.approx(float(want), abs=1e-3) and "exif_gps" not in rows[1]

    assert main(args) == 0
    out = capsys.readouterr().out
    assert "sydney.jpg  (geoclip, softmax)" in out and "  p(<200 km)=" in out and "cell " in out
    assert "EXIF GPS -33.85680  151.21530" in out and "km from the top candidate" in out

    assert main([*args, "--strategy", "beam"]) == 2
    assert "geoclip: search option(s) ['strategy'] apply to GeoToken bundles only" in capsys.readouterr().err


def test_serve_app_on_geoclip(geo):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from geotoken.serve import ServeConfig, create_app

    buf = io.BytesIO()
    photo(4).save(buf, "PNG")
    with TestClient(create_app(geo, ServeConfig(max_pixels=1_000_000, basemap_width=256))) as client:
        r = client.post(
            "/v1/geolocate", files={"image": ("p.png", buf.getvalue(), "image/png")}, data={"top_k": "3"}
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["strategy"] == "geoclip" and len(body["candidates"]) == 3
        assert body["candidates"][0]["probability"] == pytest.approx(geo.predict([photo(4)], top_k=1)[0].candidates[0].probability, abs=1e-6)  # fmt: skip
        r = client.post("/v1/geolocate", files={"image": ("p.png", buf.getvalue(), "image/png")}, data={"strategy": "beam"})  # fmt: skip
        assert r.status_code == 422 and "not an option of the geoclip model" in r.json()["error"]
        form = client.get("/openapi.json").json()["components"]["schemas"]
        [body] = [b for name, b in form.items() if name.startswith("Body_")]
        assert set(body["properties"]) == {"image", "top_k", "strategy", "select"}  # no constrain to offer
        m = client.get("/v1/model").json()
        assert (
            m["model"]["name"] == "geoclip"
            and m["strategies"] == ["geoclip"]
            and m["selectors"] == ["softmax"]
        )
        schema = client.get("/openapi.json").json()
        assert "beam" not in json.dumps(schema) and "geoclip" in json.dumps(schema)

"""HEIC/HEIF photos, iPhones' default: decoded with their EXIF orientation and GPS where pillow-heif is
installed (the heic extra), refused or left out with the extra named where it is not."""

from __future__ import annotations

import io
import json
import warnings

import numpy as np
import pytest
from PIL import ExifTags, Image

from geotoken.cli import main
from geotoken.data import images
from geotoken.data.images import decode_image, exif_gps, list_images, open_image
from geotoken.errors import GeoTokenError

pillow_heif = pytest.importorskip("pillow_heif")


def heic(size=(64, 48), gps=(48.8582, 2.2945), orientation=6, seed=0) -> bytes:
    """HEIC bytes of a random image with EXIF GPS (degrees, minutes, seconds) and orientation."""
    pillow_heif.register_heif_opener()
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    ifd = exif.get_ifd(ExifTags.IFD.GPSInfo)
    for value, refs, ref_tag, tag in ((gps[0], "NS", ExifTags.GPS.GPSLatitudeRef, ExifTags.GPS.GPSLatitude),
                                      (gps[1], "EW", ExifTags.GPS.GPSLongitudeRef, ExifTags.GPS.GPSLongitude)):  # fmt: skip
        a = abs(value)
        d, m = int(a), int((a - int(a)) * 60)
        ifd[ref_tag] = refs[value < 0]
        ifd[tag] = (float(d), float(m), round((a - d - m / 60) * 3600, 4))
    buf = io.BytesIO()
    image.save(buf, format="HEIF", exif=exif.tobytes(), quality=90)
    return buf.getvalue()


def test_a_heic_photo_decodes_upright_with_its_gps(tmp_path):
    data = heic()
    assert data[4:12] == b"ftypheic"
    path = tmp_path / "IMG_0001.HEIC"
    path.write_bytes(data)
    image = open_image(path)
    assert image.mode == "RGB" and image.size == (48, 64)  # orientation 6: turned upright
    assert exif_gps(image) == pytest.approx((48.8582, 2.2945), abs=1e-5)
    assert exif_gps(data) == pytest.approx((48.8582, 2.2945), abs=1e-5)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.heif").write_bytes(heic(seed=1))
    (tmp_path / "c.jpg").write_bytes(b"")  # a folder scan lists it; decoding it is another matter
    assert list_images([tmp_path]) == [str(path), str(tmp_path / "c.jpg"), str(tmp_path / "sub" / "b.heif")]


def test_without_pillow_heif_the_extra_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(images, "heif_support", lambda: False)
    with pytest.raises(
        GeoTokenError, match=r"x.heic: cannot decode image: a HEIC/HEIF photo; pip install 'geotoken\[heic\]'"
    ):
        decode_image(heic(), "x.heic")
    (tmp_path / "a.heic").write_bytes(heic())
    (tmp_path / "b.jpg").write_bytes(b"x")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert list_images([tmp_path]) == [str(tmp_path / "b.jpg")]
    said = " ".join(str(w.message) for w in caught)
    assert "left out 1 .heic photo(s)" in said and "geotoken[heic]" in said


def test_cli_predict_geoclip_reads_a_heic_photo_and_its_gps(shipped, clip_dir, tmp_path, capsys):
    path = tmp_path / "paris.heic"
    path.write_bytes(heic(gps=(48.8582, 2.2945)))
    args = ["predict", str(path), "--model", "geoclip", "--clip", str(clip_dir), "--top-k", "2", "--json"]
    assert main(args) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["file"] == str(path) and len(row["candidates"]) == 2
    assert (row["exif_gps"]["lat"], row["exif_gps"]["lon"]) == pytest.approx((48.8582, 2.2945), abs=1e-5)


def test_serve_takes_a_heic_upload_and_names_the_extra_without_it(geo, monkeypatch):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from geotoken.serve import ServeConfig, app

    data = heic(gps=(-33.8568, 151.2153))
    with TestClient(app.create_app(geo, ServeConfig(max_pixels=1_000_000, basemap_width=256))) as client:
        upload = {"image": ("IMG_0002.HEIC", data, "image/heic")}
        r = client.post("/v1/geolocate", files=upload, data={"top_k": "2"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["candidates"]) == 2
        assert (body["exif_gps"]["lat"], body["exif_gps"]["lon"]) == pytest.approx(
            (-33.8568, 151.2153), abs=1e-5
        )
        monkeypatch.setattr(app, "heif_support", lambda: False)  # a server without the heic extra
        r = client.post("/v1/geolocate", files=upload)
        assert r.status_code == 415 and "geotoken[heic]" in r.json()["error"]

import builtins
import csv
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image, ImageOps

from geotoken.data import images
from geotoken.data.images import (
    iter_images,
    open_image,
    read_shard_index,
    shard_samples,
    split_ref,
)
from geotoken.data.manifest import Manifest, manifest_from_shards, read_manifest
from geotoken.errors import GeoTokenError
from helpers import jpeg_bytes


def add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shard(path, samples):
    """samples: list of (key, jpg bytes or None, json dict or None), written as img2dataset does."""
    with tarfile.open(path, "w") as tar:
        for key, jpg, meta in samples:
            if jpg is not None:
                add(tar, f"{key}.jpg", jpg)
            if meta is not None:
                add(tar, f"{key}.json", json.dumps(meta).encode())
                add(tar, f"{key}.txt", b"caption")
    return path


def meta(key, lat, lon, **extra):
    return {
        "url": f"http://x/{key}.jpg",
        "key": key,
        "status": "success",
        "error_message": None,
        "LAT": lat,
        "LON": lon,
        **extra,
    }


@pytest.fixture
def shard(tmp_path):
    good = jpeg_bytes(1)
    samples = [
        ("000000", jpeg_bytes(0), meta("000000", 48.85, 2.35, IMG_ID="paris.jpg")),
        ("000001", good, meta("000001", -33.9, 151.2, IMG_ID="sydney.jpg")),
        ("000002", b"not an image at all", meta("000002", 0.0, 0.0, IMG_ID="junk.jpg")),
        ("000003", good[: len(good) // 2], meta("000003", 1.0, 1.0, IMG_ID="half.jpg")),
    ]
    return write_shard(tmp_path / "00000.tar", samples)


def test_split_ref():
    assert split_ref("/d/00001.tar#000010.jpg") == ("/d/00001.tar", "000010.jpg")
    assert split_ref("/d/a#b.jpg") == ("/d/a#b.jpg", None)


def test_open_image_file_and_tar_member(tmp_path, shard):
    path = tmp_path / "x.jpg"
    path.write_bytes(jpeg_bytes(7))
    im = open_image(path)
    assert im.mode == "RGB" and im.size == (24, 16)
    member = open_image(f"{shard}#000001.jpg")
    ref = np.asarray(Image.open(io.BytesIO(jpeg_bytes(1))).convert("RGB"))
    np.testing.assert_array_equal(np.asarray(member), ref)
    gray = tmp_path / "g.png"
    Image.new("L", (5, 3), 100).save(gray)
    assert open_image(gray).mode == "RGB"


@pytest.mark.parametrize(
    "ref, message",
    [
        ("{tmp}/missing.jpg", r"missing.jpg: image file not found"),
        ("{shard}#nope.jpg", r"00000.tar#nope.jpg: no member 'nope.jpg'"),
        ("{shard}#000002.jpg", r"00000.tar#000002.jpg: cannot decode image"),
        ("{shard}#000003.jpg", r"00000.tar#000003.jpg: cannot decode image"),
        ("{tmp}/other.tar#a.jpg", r"other.tar: shard not found"),
        ("", r"no image reference"),
        ("http://example.com/a.jpg", r"remote image references"),
    ],
)
def test_open_image_errors_name_the_reference(tmp_path, shard, ref, message):
    with pytest.raises(GeoTokenError, match=message):
        open_image(ref.format(tmp=tmp_path, shard=shard))


def test_not_a_tar(tmp_path):
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"\x01" * 700)
    with pytest.raises(GeoTokenError, match="bad.tar: not a readable"):
        read_shard_index(bad)


def test_shard_index_is_cached_and_refreshed(tmp_path):
    path = write_shard(tmp_path / "s.tar", [("a", jpeg_bytes(0), None)])
    first = read_shard_index(path)
    assert read_shard_index(path) is first  # cached: no second header scan
    assert list(first) == ["a.jpg"]
    write_shard(path, [("a", jpeg_bytes(0), None), ("b", jpeg_bytes(1, (30, 30)), None)])
    assert set(read_shard_index(path)) == {"a.jpg", "b.jpg"}
    assert open_image(f"{path}#b.jpg").size == (30, 30)
    assert shard_samples(path) == {"a": {"jpg": "a.jpg"}, "b": {"jpg": "b.jpg"}}


def test_iter_images_groups_shards_and_reads_each_once(tmp_path, shard, monkeypatch):
    loose = tmp_path / "loose.jpg"
    loose.write_bytes(jpeg_bytes(9))
    refs = [
        f"{shard}#000001.jpg",
        str(loose),
        f"{shard}#000000.jpg",
        f"{shard}#000002.jpg",
        f"{shard}#zzz.jpg",
    ]
    opened = []

    def counting_open(file, *args, **kwargs):
        opened.append(str(file))
        return builtins.open(file, *args, **kwargs)

    monkeypatch.setattr(images, "open", counting_open, raising=False)
    out = list(iter_images(refs))
    assert [row for row, _ in out] == [
        1,
        4,
        2,
        0,
        3,
    ]  # loose file, missing member, then shard in member order
    assert opened.count(str(shard)) == 1
    results = dict(out)
    assert isinstance(results[3], GeoTokenError) and "000002.jpg" in str(results[3])
    assert isinstance(results[4], GeoTokenError) and "zzz.jpg" in str(results[4])
    for row in (0, 1, 2):
        np.testing.assert_array_equal(np.asarray(results[row]), np.asarray(open_image(refs[row])))
    assert [row for row, _ in iter_images(refs, rows=[2, 1])] == [1, 2]
    raw = dict(iter_images(refs, rows=[0], decode=False))
    assert raw[0] == jpeg_bytes(1)


def test_manifest_from_shards(tmp_path, shard):
    with pytest.raises(GeoTokenError, match=r"00000.tar#000002.json: id 'junk.jpg': .*cannot decode"):
        manifest_from_shards(tmp_path, check_images=True)
    m = manifest_from_shards([shard])  # without image checks every sample with coordinates is a row
    assert m.ids.tolist() == ["paris.jpg", "sydney.jpg", "junk.jpg", "half.jpg"]
    assert m.lat.tolist() == [48.85, -33.9, 0.0, 1.0] and m.lon[1] == 151.2
    assert m.images[1] == f"{shard}#000001.jpg"
    report = tmp_path / "skipped.csv"
    m = manifest_from_shards(tmp_path, check_images=True, on_error="skip", skip_report=report)
    assert m.ids.tolist() == ["paris.jpg", "sydney.jpg"]
    with open(report, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["row"] for r in rows] == [f"{shard}#000002.json", f"{shard}#000003.json"]
    # the written manifest reads back identically, shard references included
    m.write_csv(tmp_path / "manifest.csv")
    back = read_manifest(tmp_path / "manifest.csv", check_images=True)
    assert back.content_hash() == m.content_hash()


def test_manifest_from_shards_bad_samples(tmp_path):
    path = write_shard(
        tmp_path / "a.tar",
        [
            ("k0", jpeg_bytes(0), {"key": "k0", "status": "success", "latitude": 95.0, "longitude": 0.0}),
            ("k1", None, {"key": "k1", "status": "success", "latitude": 1.0, "longitude": 2.0}),
            ("k2", jpeg_bytes(2), {"key": "k2", "status": "failed_to_download", "error_message": "404"}),
            ("k3", jpeg_bytes(3), {"key": "k3", "status": "success", "latitude": "1.5", "longitude": -2}),
        ],
    )
    report = tmp_path / "r.csv"
    m = manifest_from_shards(path, on_error="skip", skip_report=report)
    assert (
        m.ids.tolist() == ["k3"] and m.lat.tolist() == [1.5] and m.lon.tolist() == [-2.0]
    )  # key is the id here
    text = report.read_text()
    assert "outside [-90, 90]" in text and "no image member" in text and "failed_to_download" in text
    nolatlon = write_shard(tmp_path / "b.tar", [("k", jpeg_bytes(0), {"key": "k", "status": "success"})])
    with pytest.raises(GeoTokenError, match="b.tar#k.json: id 'k': no latitude/longitude"):
        manifest_from_shards(nolatlon)
    with pytest.raises(GeoTokenError, match="no .tar shards"):
        (tmp_path / "empty").mkdir()
        manifest_from_shards(tmp_path / "empty")


def test_read_manifest_check_images(tmp_path, shard, jpeg_data):
    (tmp_path / "a.jpg").write_bytes(jpeg_data)
    (tmp_path / "b.jpg").write_bytes(b"garbage")
    p = tmp_path / "m.csv"
    p.write_text(
        "id,lat,lon,image\na,1,2,a.jpg\nb,3,4,b.jpg\nc,5,6,c.jpg\nd,7,8,00000.tar#000000.jpg\ne,0,0,\n"
    )
    assert len(read_manifest(p)) == 5
    with pytest.raises(GeoTokenError, match=r"m.csv: line 4: id 'c': .*c.jpg: image file not found"):
        read_manifest(p, check_images="exists")
    report = tmp_path / "r.csv"
    m = read_manifest(p, check_images="decode", on_error="skip", skip_report=report)
    assert m.ids.tolist() == ["a", "d"]
    lines = report.read_text().splitlines()
    assert lines[0] == "row,id,reason" and [line.split(",")[0] for line in lines[1:]] == ["3", "4", "6"]
    assert "cannot decode" in lines[1] and "not found" in lines[2] and "no image reference" in lines[3]


def test_manifest_rows_stream_through_iter_images(tmp_path, shard):
    m = Manifest(["a", "b"], [0, 0], [0, 0], [f"{shard}#000000.jpg", f"{shard}#000001.jpg"])
    assert sorted(row for row, im in iter_images(m) if isinstance(im, Image.Image)) == [0, 1]


def test_high_bit_depth_greyscale_is_rescaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")  # a 16-bit greyscale PNG
    rgb = np.asarray(open_image(tmp_path / "g16.png"), dtype=np.float64)
    assert (
        rgb.shape == (48, 64, 3)
        and abs(rgb.mean() - 127.5) < 1
        and rgb[0, 0, 0] == 0
        and rgb[-1, -1, 0] == 255
    )
    unit = Image.fromarray(np.linspace(0, 1, 100, dtype=np.float32).reshape(10, 10))  # mode F in 0..1
    assert abs(np.asarray(images.as_image(unit), dtype=np.float64).mean() - 127.5) < 1


def test_a_broken_exif_block_keeps_the_photo(monkeypatch, jpeg_data):
    import struct

    from geotoken.encoders.base import resize_center_crop

    def broken(image):
        raise struct.error("unpack requires a buffer of 4 bytes")

    monkeypatch.setattr(ImageOps, "exif_transpose", broken)
    image = images.decode_image(jpeg_data, "broken-exif.jpg")
    assert image.mode == "RGB" and resize_center_crop(image, 16, (16, 16)).size == (16, 16)


def test_an_extreme_aspect_ratio_is_cropped_before_it_is_resized(monkeypatch):
    from geotoken.encoders import base

    strip = Image.fromarray(np.random.default_rng(0).integers(0, 255, (1, 40000, 3), dtype=np.uint8))
    sizes, resize = [], Image.Image.resize
    monkeypatch.setattr(
        Image.Image, "resize", lambda self, size, *a, **kw: sizes.append(size) or resize(self, size, *a, **kw)
    )
    for crop in ((224, 224), (256, 256)):  # (256, 256): the resized short side (224) is padded
        out = base.resize_center_crop(strip, 224, crop)
        assert out.size == crop[::-1] and max(w * h for w, h in sizes) <= crop[0] * crop[1]
    # within EXACT_ASPECT the whole image is resized, as Hugging Face's processors do
    photo = Image.fromarray(np.random.default_rng(1).integers(0, 255, (30, 90, 3), dtype=np.uint8))
    sizes.clear()
    base.resize_center_crop(photo, 16, (16, 16))
    assert sizes == [(48, 16)]


def test_a_very_large_jpeg_is_decoded_reduced_not_refused(monkeypatch):
    rng = np.random.default_rng(0)
    small = Image.fromarray((rng.random((150, 200, 3)) * 255).astype(np.uint8)).resize((2000, 1500))
    jpeg, png = io.BytesIO(), io.BytesIO()
    small.save(jpeg, "JPEG", quality=90)
    small.save(png, "PNG")
    monkeypatch.setattr(images, "LARGE_JPEG_PIXELS", 1_000_000)
    monkeypatch.setattr(images, "LARGE_JPEG_SIDE", 300)
    im = images.decode_image(jpeg.getvalue(), "pano.jpg")
    assert im.size == (500, 375)  # 1/4 scale: the largest reduction keeping the short side >= 300
    full = np.asarray(small.resize(im.size, Image.BOX), dtype=np.float64)
    assert np.abs(np.asarray(im, dtype=np.float64) - full).mean() < 4  # the same picture, reduced
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)  # 3 MP is over PIL's bomb limit (2x this)
    assert images.decode_image(jpeg.getvalue(), "pano.jpg").size == (500, 375)
    with pytest.raises(GeoTokenError, match="big.png: cannot decode image: Image size"):
        images.decode_image(png.getvalue(), "big.png")  # other formats keep PIL's limit
    monkeypatch.setattr(images, "MAX_JPEG_PIXELS", 2_000_000)
    with pytest.raises(GeoTokenError, match="2000 x 1500 px is over 2,000,000 pixels"):
        images.decode_image(jpeg.getvalue(), "pano.jpg")


def test_a_folder_scan_takes_jfif_and_says_what_it_leaves_out(tmp_path, monkeypatch):
    from geotoken.data.images import list_images

    monkeypatch.setattr(images, "heif_support", lambda: False)  # an install without the heic extra
    for name in ("a.jfif", "b.JPG", "c.heic", "d.HEIC", "e.dng", "notes.txt"):
        (tmp_path / name).write_bytes(jpeg_bytes() if name[-4:].lower() in ("jfif", ".jpg") else b"x")
    with pytest.warns(UserWarning, match=r"left out 1 \.dng, 2 \.heic photo\(s\)"):
        found = list_images([tmp_path])
    assert [p.rsplit("/", 1)[-1] for p in found] == ["a.jfif", "b.JPG"]
    assert images.decode_image((tmp_path / "a.jfif").read_bytes()).size == (24, 16)


def test_a_pipe_or_device_is_refused_not_read_forever(tmp_path):
    import os

    from geotoken.data.images import list_images

    fifo = tmp_path / "stream.jpg"
    os.mkfifo(fifo)
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes())
    assert [p.rsplit("/", 1)[-1] for p in list_images([tmp_path])] == ["a.jpg"]  # a scan skips it
    for ref in (fifo, "/dev/zero"):
        with pytest.raises(GeoTokenError, match="not a regular file"):
            images.open_image(ref)  # given by name: refused at once


def test_a_folder_scan_follows_linked_folders_once_and_names_broken_links(tmp_path):
    from geotoken.data.images import list_images

    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "b.jpg").write_bytes(jpeg_bytes())
    root = tmp_path / "photos"
    root.mkdir()
    (root / "a.jpg").write_bytes(jpeg_bytes())
    (root / "linked").symlink_to(tmp_path / "elsewhere")  # a folder on another disk
    (root / "loop").symlink_to(root)  # a link back up the tree: walked once, not forever
    (root / "gone.jpg").symlink_to(tmp_path / "deleted.jpg")
    with pytest.warns(UserWarning, match=r"left out 1 image link\(s\) that point to nothing"):
        found = list_images([root])
    assert [p.rsplit("/", 2)[-2:] for p in found] == [["photos", "a.jpg"], ["linked", "b.jpg"]]


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "the file is empty"),
        (
            b"photo.jpg".ljust(257, b"\0") + b"ustar\x0000" + b"\0" * 300,
            "an archive, not a photo: name a member as x.jpg#MEMBER",
        ),
        (b"PK\x03\x04" + b"\0" * 100, "an archive, not a photo"),
    ],
)
def test_empty_files_and_archives_are_named_as_such(data, message):
    with pytest.raises(GeoTokenError, match=message):
        images.decode_image(data, "x.jpg")


def test_a_large_png_names_the_limit_and_the_way_out(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    buf = io.BytesIO()
    Image.new("RGB", (30, 30)).save(buf, "PNG")  # 900 px: over twice the limit, PIL's error
    with pytest.raises(
        GeoTokenError, match=r"over the limit of 100 pixels for formats other than JPEG \(convert"
    ):
        images.decode_image(buf.getvalue(), "pano.png")


@pytest.mark.parametrize("photos", [None, {"a.jpg": 1}, 3])
def test_photos_of_the_wrong_type_are_named(photos):
    with pytest.raises(GeoTokenError, match="expected photos"):
        images.as_image_list(photos)


def test_exif_gps_needs_its_hemisphere_and_a_fix():
    from PIL import ExifTags

    def tagged(lat_ref, lat, lon_ref, lon):
        exif = Image.Exif()
        ifd = exif.get_ifd(ExifTags.IFD.GPSInfo)
        for tag, ref_tag, ref, v in ((ExifTags.GPS.GPSLatitude, ExifTags.GPS.GPSLatitudeRef, lat_ref, lat),
                                     (ExifTags.GPS.GPSLongitude, ExifTags.GPS.GPSLongitudeRef, lon_ref, lon)):  # fmt: skip
            ifd[tag] = (float(v), 0.0, 0.0)
            if ref:
                ifd[ref_tag] = ref
        buf = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buf, "JPEG", exif=exif)
        return buf.getvalue()

    assert images.exif_gps(tagged("S", 22, "W", 43)) == (-22.0, -43.0)
    assert images.exif_gps(tagged(None, 22, "W", 43)) is None  # which hemisphere? not guessed
    assert images.exif_gps(tagged("N", 0, "E", 0)) is None  # cameras without a fix write (0, 0)


def test_a_shard_sample_without_a_readable_sidecar_is_a_bad_row_not_the_end_of_the_read(tmp_path):
    """An image without KEY.json was dropped uncounted; one sidecar that was not JSON, a JSON list, or one
    without a longitude stopped the whole manifest (even with on_error='skip')."""
    path = tmp_path / "a.tar"
    with tarfile.open(path, "w") as tar:
        for key, body in (("k0", json.dumps(meta("k0", 1.0, 2.0)).encode()), ("k2", b"{not json"),
                          ("k3", b"[1, 2]"), ("k4", json.dumps({"key": "k4", "latitude": 3.0}).encode())):  # fmt: skip
            add(tar, f"{key}.jpg", jpeg_bytes(0))
            add(tar, f"{key}.json", body)
        add(tar, "k1.jpg", jpeg_bytes(1))  # no k1.json
    report = tmp_path / "r.csv"
    m = manifest_from_shards(path, on_error="skip", skip_report=report)
    assert m.ids.tolist() == ["k0"]
    with open(report, newline="") as f:
        reasons = {r["row"].rsplit("#", 1)[1]: r["reason"] for r in csv.DictReader(f)}
    assert "no KEY.json beside the image" in reasons["k1.jpg"] and "not valid JSON" in reasons["k2.json"]
    assert (
        "is a list, not an object" in reasons["k3.json"]
        and "no latitude/longitude field" in reasons["k4.json"]
    )
    with pytest.raises(GeoTokenError, match=r"a.tar#k1.jpg: .*no KEY.json beside the image"):
        manifest_from_shards(path)

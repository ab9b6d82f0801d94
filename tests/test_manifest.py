import csv

import numpy as np
import pytest

from geotoken import assets
from geotoken.data import manifest as manifest_module
from geotoken.data.manifest import Manifest, detect_columns, read_manifest
from geotoken.errors import GeoTokenError

MP16_HEADER = (
    "IMG_ID,AUTHOR,LAT,LON,S3_Label,S16_Label,S365_Label,Prob_indoor,Prob_natural,Prob_urban,city,country\n"
)
OSV_HEADER = "id,latitude,longitude,thumb_original_url,country,sequence,captured_at,lon_bin,lat_bin\n"


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def read_report(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_mp16_layout_ids_are_image_names(tmp_path):
    p = write(
        tmp_path / "mp16.csv",
        MP16_HEADER
        + "7a_ba_1.jpg,a@N00,48.85,2.35,0,1,2,0.1,0.2,0.7,Paris,France\n"
        + "7a_bb_2.jpg,b@N00,-33.9,151.2,0,1,2,0.1,0.2,0.7,Sydney,Australia\n",
    )
    m = read_manifest(p)
    assert m.ids.tolist() == ["7a_ba_1.jpg", "7a_bb_2.jpg"]
    np.testing.assert_array_equal(m.lat, [48.85, -33.9])
    np.testing.assert_array_equal(m.lon, [2.35, 151.2])
    assert m.lat.dtype == np.float64 and m.ids.dtype.kind == "U"
    assert m.images.tolist() == [str(tmp_path / "7a_ba_1.jpg"), str(tmp_path / "7a_bb_2.jpg")]
    assert m.source == str(p)
    m = read_manifest(p, image_root=tmp_path / "imgs")
    assert m.images[0] == str(tmp_path / "imgs" / "7a_ba_1.jpg")


def test_osv5m_layout(tmp_path):
    p = write(tmp_path / "test.csv", OSV_HEADER + "123,10.5,-20.25,http://x/1.jpg,FR,s,2020,1,2\n")
    m = read_manifest(p, image_root="/data/osv")
    assert m.ids.tolist() == ["123"] and m.lat[0] == 10.5 and m.lon[0] == -20.25
    assert m.images.tolist() == ["/data/osv/123.jpg"]


def test_plain_layouts_and_case_insensitive_columns(tmp_path):
    p = write(tmp_path / "a.csv", "Id,Lat,Lng,Path\nx,1,2,sub/x.png\ny,3,4,/abs/y.png\nz,5,6,\n")
    m = read_manifest(p)
    assert m.images.tolist() == [str(tmp_path / "sub" / "x.png"), "/abs/y.png", ""]
    p = write(tmp_path / "b.csv", "id,lat,lon,image\nq,1,2,shards/00000.tar#000000001.jpg\n")
    assert read_manifest(p).images[0] == str(tmp_path / "shards" / "00000.tar") + "#000000001.jpg"
    p = write(tmp_path / "c.csv", "id,lat,lon\nq,1,2\n")
    assert read_manifest(p).images.tolist() == [""]


def test_latlon_without_ids_numbers_rows():
    m = read_manifest(assets.mp16_coordinates_csv())
    assert len(m) == 100_000
    assert m.ids[:3].tolist() == ["0", "1", "2"] and m.ids[-1] == "99999"
    assert m.lat[0] == -50.943392 and m.lon[0] == -72.935664
    assert (np.abs(m.lat) <= 90).all() and (np.abs(m.lon) <= 180).all()


def test_detect_columns_priority_and_missing():
    assert detect_columns(["IMG_ID", "LAT", "LON"]) == {"id": 0, "lat": 1, "lon": 2}
    assert detect_columns(["id", "latitude", "longitude", "lat_bin", "lon_bin"]) == {
        "id": 0,
        "lat": 1,
        "lon": 2,
    }
    with pytest.raises(GeoTokenError, match=r"f\.csv: line 1: no lon column"):
        detect_columns(["id", "lat", "x"], "f.csv")


@pytest.mark.parametrize(
    "row, message",
    [
        ("b,abc,2", r"line 3: id 'b': lat 'abc' is not a number"),
        ("b,nan,2", r"line 3: id 'b': lat nan is not finite"),
        ("b,91,2", r"line 3: id 'b': lat 91.0 is outside \[-90, 90\]"),
        ("b,1,-181", r"line 3: id 'b': lon -181.0 is outside \[-180, 180\]"),
        ("b,1,", r"line 3: id 'b': lon '' is not a number"),
        ("b,1", r"line 3: id 'b': has 2 fields, the header has 3"),
        ("a,1,2", r"line 3: id 'a': duplicate id 'a' \(first at line 2\)"),
        (",1,2", r"line 3: id '': id is empty"),
    ],
)
def test_bad_rows_name_file_line_and_value(tmp_path, row, message):
    p = write(tmp_path / "bad.csv", f"id,lat,lon\na,0,0\n{row}\nc,0,0\n")
    with pytest.raises(GeoTokenError, match=f"bad.csv: {message}"):
        read_manifest(p)


def test_skip_writes_report_and_keeps_good_rows(tmp_path):
    p = write(tmp_path / "bad.csv", "id,lat,lon\na,0,0\nb,x,0\n\nc,1,200\na,5,5\nd,2,3\n")
    with pytest.raises(GeoTokenError, match=r"line 3: .*\(2 more bad rows") as said:
        read_manifest(p)
    # the hint names a command that has the option, whichever command read the file (tokenize, earthviews)
    assert "`geotoken manifest FILE -o CLEAN.csv --skip-bad` (or --format FORMAT" in str(said.value)
    from geotoken.cli import main

    report = tmp_path / "clean.report.csv"
    assert main(["manifest", str(p), "-o", str(tmp_path / "clean.csv"), "--skip-bad"]) == 0
    assert len(report.read_text().splitlines()) == 4  # header + the 3 bad rows
    with pytest.raises(GeoTokenError, match="skip_report"):
        read_manifest(p, on_error="skip")
    report = tmp_path / "skipped.csv"
    m = read_manifest(p, on_error="skip", skip_report=report)
    assert m.ids.tolist() == ["a", "d"]
    assert m.lat.tolist() == [0.0, 2.0]
    rows = read_report(report)
    assert [(r["row"], r["id"]) for r in rows] == [("3", "b"), ("5", "c"), ("6", "a")]
    assert (
        "not a number" in rows[0]["reason"]
        and "outside" in rows[1]["reason"]
        and "duplicate" in rows[2]["reason"]
    )


def test_line_numbers_follow_multiline_quoted_fields(tmp_path):
    p = write(tmp_path / "q.csv", 'id,lat,lon,note\na,0,0,"two\nlines"\nb,0,999,x\n')
    with pytest.raises(GeoTokenError, match="line 4: id 'b'"):
        read_manifest(p)


def test_tiny_overshoot_is_wrapped_or_clamped(tmp_path):
    p = write(
        tmp_path / "t.csv", "id,lat,lon\na,90.0000001,180.0000001\nb,-90.0000001,-180.0000001\nc,0,180\n"
    )
    m = read_manifest(p)
    assert m.lat.tolist() == [90.0, -90.0, 0.0]
    np.testing.assert_allclose(m.lon, [-179.9999999, 179.9999999, 180.0], atol=1e-9)


def test_file_errors(tmp_path):
    with pytest.raises(GeoTokenError, match="not found"):
        read_manifest(tmp_path / "nope.csv")
    with pytest.raises(GeoTokenError, match="empty"):
        read_manifest(write(tmp_path / "e.csv", ""))
    with pytest.raises(GeoTokenError, match="on_error"):
        read_manifest(write(tmp_path / "ok.csv", "lat,lon\n1,2\n"), on_error="ignore")
    assert len(read_manifest(tmp_path / "ok.csv")) == 1
    empty = read_manifest(write(tmp_path / "h.csv", "lat,lon\n"))
    assert len(empty) == 0 and empty.lat.dtype == np.float64


def test_write_csv_round_trip_and_hash(tmp_path):
    rng = np.random.default_rng(0)
    n = 50
    images = [str(tmp_path / f"img{i}.jpg") for i in range(n - 1)] + ["/elsewhere/x.jpg"]
    m = Manifest(
        [f"id,{i}" for i in range(n)], rng.uniform(-90, 90, n), rng.uniform(-180, 180, n), images, "mem"
    )
    out = tmp_path / "m.csv"
    m.write_csv(out)
    text = out.read_text()
    assert text.startswith("id,lat,lon,image\n") and ",img0.jpg\n" in text  # relative inside the folder
    back = read_manifest(out)
    for name in ("ids", "lat", "lon", "images"):
        np.testing.assert_array_equal(getattr(back, name), getattr(m, name))
    assert back.content_hash() == m.content_hash()
    sub = m.subset([3, 1])
    assert sub.ids.tolist() == ["id,3", "id,1"] and sub.content_hash() != m.content_hash()
    assert m.subset(np.arange(n)).content_hash() == m.content_hash()
    moved = Manifest(m.ids, m.lat, m.lon + 1e-9, m.images)
    assert moved.content_hash() != m.content_hash()
    # the same images under another root (a moved dataset) keep the identity; a renamed image does not
    here = Manifest(m.ids, m.lat, m.lon, [f"/data/mp16/{i // 10:02d}/{i}.jpg" for i in range(n)])
    there = Manifest(m.ids, m.lat, m.lon, [f"/mnt/disk2/copy/{i // 10:02d}/{i}.jpg" for i in range(n)])
    assert here.content_hash() == there.content_hash()
    renamed = [f"/data/mp16/{i // 10:02d}/{i}.jpg" for i in range(n - 1)] + ["/data/mp16/04/x.jpg"]
    assert Manifest(m.ids, m.lat, m.lon, renamed).content_hash() != here.content_hash()
    np.testing.assert_array_equal(m.coords, np.stack([m.lat, m.lon], 1))


def test_manifest_shape_check():
    with pytest.raises(ValueError, match="lat has 1 rows"):
        Manifest(["a", "b"], [1.0], [1.0, 2.0], ["", ""])


TRICKY = (
    "\ufeffIMG_ID,AUTHOR,LAT,LON,city\r\n"
    'a.jpg,"Doe, J.",1.25,2.5,"Washington, D.C."\r\n'
    "\r\n"
    'b.jpg,"say ""hi""",-3,4e1,"two\nlines"\r\n'
    "c.jpg,x,+0.5, 7 ,Paris\r\n"
)


@pytest.mark.parametrize("fast", [True, False])
def test_fast_and_csv_paths_agree(tmp_path, monkeypatch, fast):
    p = tmp_path / "t.csv"
    p.write_bytes(TRICKY.encode())
    if not fast:
        monkeypatch.setattr(manifest_module, "_read_columns_numpy", lambda path, cols, width: None)
    m = read_manifest(p)
    assert m.ids.tolist() == ["a.jpg", "b.jpg", "c.jpg"]
    assert m.lat.tolist() == [1.25, -3.0, 0.5] and m.lon.tolist() == [2.5, 40.0, 7.0]
    p.write_bytes(TRICKY.replace("c.jpg,x,+0.5", "c.jpg,x,95").encode())
    with pytest.raises(GeoTokenError, match="t.csv: line 6: id 'c.jpg': LAT 95.0 is outside"):
        read_manifest(p)


def test_numpy_path_is_used_for_clean_files(tmp_path, monkeypatch):
    p = write(tmp_path / "ok.csv", "id,lat,lon,image\na,1,2,x.jpg\n")
    monkeypatch.setattr(manifest_module, "_read_columns_csv", None)  # would fail if called
    assert read_manifest(p).ids.tolist() == ["a"]


def test_text_that_is_not_utf8_is_an_error_naming_its_line(tmp_path):
    from geotoken.data.manifest import read_annotations

    path = tmp_path / "latin1.csv"
    rows = ["id,lat,lon,image"] + [f"r{i},1.5,2.5,x{i}.jpg" for i in range(20000)]
    rows[15000] = "Café,1.5,2.5,y.jpg"  # line 15001; the decoder reads far ahead of the csv reader
    path.write_bytes("\n".join(rows).encode("latin-1"))
    with pytest.raises(GeoTokenError, match=r"latin1.csv: line 15001: not UTF-8 text \(byte 0xe9"):
        read_annotations(path)
    head = tmp_path / "head.csv"
    head.write_bytes("id,lat,lon,image,légende\na,1,2,a.jpg,x\n".encode("latin-1"))
    with pytest.raises(GeoTokenError, match="head.csv: line 1: not UTF-8"):
        read_annotations(head)
    # a character cut by the 16 MiB read-ahead block is not the error: the bad byte after it is
    from geotoken.data.manifest import not_utf8

    data = b"id,lat,lon,image\n" + b"r,1.5,2.5,x.jpg\n" * ((1 << 24) // 16 - 2)
    data += b"r" * ((1 << 24) - 1 - len(data)) + "é,1.5,2.5,a.jpg\n".encode()  # é's two bytes straddle it
    assert data[(1 << 24) - 1 : (1 << 24) + 1] == "é".encode()
    data += b"b\xff,1.5,2.5,b.jpg\n"
    (tmp_path / "big.csv").write_bytes(data)
    line = data.count(b"\n")  # the bad row is the last line
    assert f"line {line}: not UTF-8 text (byte 0xff at offset {len(data) - 16})" in str(
        not_utf8(tmp_path / "big.csv")
    )


def test_a_row_with_more_fields_than_the_header_is_a_bad_row(tmp_path):
    """An unquoted comma in a path made a fifth field that was dropped: the image became `my photos/a`.
    Quoted commas and empty trailing fields are fine."""
    p = write(tmp_path / "c.csv", "id,lat,lon,image\np1,48.85,2.35,my photos/a,b.jpg\np2,1,2,x.jpg\n")
    with pytest.raises(
        GeoTokenError, match=r"c.csv: line 2: id 'p1': has 5 fields, the header has 4 \(an unquoted"
    ):
        read_manifest(p)
    m = read_manifest(p, on_error="skip", skip_report=tmp_path / "skipped.csv")
    assert m.ids.tolist() == ["p2"]
    fine = write(tmp_path / "q.csv", 'id,lat,lon,image\np1,48.85,2.35,"my photos/a,b.jpg"\np2,1,2,x.jpg,\n')
    m = read_manifest(fine)
    assert m.images.tolist() == [str(tmp_path / "my photos/a,b.jpg"), str(tmp_path / "x.jpg")]


def test_swapped_lat_lon_columns_are_an_error_naming_them(tmp_path):
    """The 2018 im2gps3k_places365.csv: header IMG_ID,AUTHOR,LON,LAT over lat,lon values. Read as named, half
    the rows failed the latitude range and were dropped while the rest were kept with swapped coordinates."""
    cities = [(48.8566, 2.3522), (35.0116, 135.7681), (40.7128, -74.006), (-33.8688, 151.2093), (1.35, 103.8)]
    rows = "".join(f"{i}.jpg,x,{lat},{lon}\n" for i, (lat, lon) in enumerate(cities))
    p = write(tmp_path / "im2gps3k_places365.csv", "IMG_ID,AUTHOR,LON,LAT\n" + rows)
    message = (
        r"im2gps3k_places365.csv: the 'LAT' and 'LON' columns look swapped: 3 of 5 rows .*line 3: 135.7681"
    )
    for options in ({}, {"on_error": "skip", "skip_report": tmp_path / "skipped.csv"}):
        with pytest.raises(GeoTokenError, match=message):
            read_manifest(p, **options)
    # read with the right header, the same values are fine
    m = read_manifest(write(tmp_path / "fixed.csv", "IMG_ID,AUTHOR,LAT,LON\n" + rows))
    assert m.lat.tolist() == [c[0] for c in cities]
    # a row bad either way (999) does not hide the swap: half the rows were dropped, half kept swapped
    garbled = rows + "9.jpg,x,12.5,999\n"
    p = write(tmp_path / "garbled.csv", "IMG_ID,AUTHOR,LON,LAT\n" + garbled)
    with pytest.raises(GeoTokenError, match=r"3 of 6 rows .* exchanged \(but 1 that fit neither way\)"):
        read_manifest(p, on_error="skip", skip_report=tmp_path / "skipped.csv")
    # one garbled latitude is a bad row, not swapped columns
    p = write(tmp_path / "one.csv", "id,lat,lon\na,10,20\nb,123,20\nc,30,40\n")
    with pytest.raises(GeoTokenError, match=r"line 3: id 'b': lat 123.0 is outside"):
        read_manifest(p)


def test_geoclip_img_file_column_is_the_image(tmp_path):
    p = write(tmp_path / "geoclip.csv", "IMG_FILE,LAT,LON\nphotos/a.jpg,1,2\n")
    m = read_manifest(p)
    assert m.images.tolist() == [str(tmp_path / "photos" / "a.jpg")]
    assert m.ids.tolist() == ["photos/a.jpg"]  # no id column: the image reference is the id
    # so a repeated image is a duplicate row, named by its column
    p = write(tmp_path / "twice.csv", "IMG_FILE,LAT,LON\nphotos/a.jpg,1,2\nphotos/a.jpg,3,4\n")
    with pytest.raises(GeoTokenError, match=r"line 3: id 'photos/a.jpg': duplicate IMG_FILE"):
        read_manifest(p)


def test_a_row_cut_inside_a_coordinate_is_a_bad_row(tmp_path):
    """An interrupted download ends '...,-51.33,166.' for 166.156: every column the reader uses is there, and
    the row was kept at longitude 166.0 without a word."""
    path = tmp_path / "a.csv"
    path.write_text("id,lat,lon,image,country\na,-51.33,166.156,a.jpg,NZ\nb,-51.33,166.")
    with pytest.raises(GeoTokenError, match=r"line 3: id 'b': has 3 fields, the header has 5 \(cut short"):
        read_manifest(path)

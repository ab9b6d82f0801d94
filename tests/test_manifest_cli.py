import io
import json
import tarfile

from PIL import Image

from geotoken.cli import main
from geotoken.data.manifest import read_manifest


def test_manifest_command_writes_standard_csv(tmp_path, capsys):
    src = tmp_path / "points.csv"
    src.write_text("id,latitude,longitude,file_path\na,1.5,2.5,a.jpg\nb,-3,4,sub/b.jpg\n")
    out = tmp_path / "out" / "manifest.csv"
    assert main(["manifest", str(src), "-o", str(out), "--image-root", "/data/photos"]) == 0
    assert "wrote 2 rows" in capsys.readouterr().out
    assert (
        out.read_text()
        == "id,lat,lon,image\na,1.5,2.5,/data/photos/a.jpg\nb,-3.0,4.0,/data/photos/sub/b.jpg\n"
    )


def test_manifest_without_format_refuses_images_named_by_id(tmp_path, capsys):
    """An MP16-style IMG_ID joined to --image-root X.tar wrote paths into the tar (X.tar/8a/4c/1.jpg) that
    exist nowhere, and exited 0: the id-named layouts need --format, and the error names it."""
    out = tmp_path / "m.csv"
    cases = [
        ("mp16_places365.csv", "IMG_ID,AUTHOR,LAT,LON\n8a/4c/1.jpg,x,1,2\n", "--format mp16 "),
        ("MP16_Pro_places365.csv", "IMG_ID,LAT,LON,city,state,country\na.jpg,1,2,P,I,F\n", "--format mp16-pro"),
        ("im2gps3k_places365.csv", "IMG_ID,LAT,LON\na.jpg,1,2\n", "--format im2gps3k"),
        ("yfcc25600_places365.csv", "IMG_ID,LAT,LON\na.jpg,1,2\n", "--format yfcc4k"),
        ("test.csv", "id,latitude,longitude,thumb_original_url,sequence\n1,1,2,u,s\n", "--format osv5m"),
    ]  # fmt: skip
    for name, text, hint in cases:
        src = tmp_path / name
        src.write_text(text)
        assert main(["manifest", str(src), "-o", str(out), "--image-root", str(tmp_path / "x.tar")]) == 2
        err = capsys.readouterr().err
        assert f"{name}: line 1: its images are named by the" in err and hint in err, err
        assert not out.exists()
    # ids without images (no image column, not an id-named layout) are still plain manifests
    (tmp_path / "p.csv").write_text("id,lat,lon\na,1,2\n")
    assert main(["manifest", str(tmp_path / "p.csv"), "-o", str(out)]) == 0


def test_manifest_command_bad_input_one_line_exit_2(tmp_path, capsys):
    src = tmp_path / "bad.csv"
    src.write_text("id,lat,lon\na,1,2\nb,100,2\nc,1,1\n")
    out = tmp_path / "m.csv"
    assert main(["manifest", str(src), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.csv: line 3: id 'b': lat 100.0 is outside" in err
    assert not out.exists()
    assert main(["manifest", str(src), "-o", str(out), "--skip-bad"]) == 0
    assert f"1 bad rows left out (listed in {tmp_path / 'm.report.csv'})" in capsys.readouterr().out
    assert read_manifest(out).ids.tolist() == ["a", "c"]
    # the report of --format's layouts: where (file and line), id, reason
    lines = (tmp_path / "m.report.csv").read_text().splitlines()
    assert lines[0] == "where,id,reason" and lines[1].startswith(f"{src}: line 3,b,")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv", "m.csv", "m.report.csv"]


def test_manifest_command_from_shards(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (200, 10, 10)).save(buf, format="JPEG")
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for name, data in [
            ("000000.jpg", buf.getvalue()),
            (
                "000000.json",
                json.dumps(
                    {"key": "000000", "status": "success", "id": "x1", "lat": 5.0, "lon": 6.0}
                ).encode(),
            ),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "m.csv"
    assert main(["manifest", str(tmp_path), "-o", str(out), "--check-images", "decode"]) == 0
    m = read_manifest(out)
    assert m.ids.tolist() == ["x1"] and m.images[0] == f"{tmp_path / '00000.tar'}#000000.jpg"


def test_manifest_command_input_kinds_are_checked_by_the_library(tmp_path, capsys):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    for p in (a, b):
        p.write_text("id,lat,lon\nx,1,2\n")
    assert main(["manifest", str(a), str(b), "-o", str(tmp_path / "m.csv")]) == 2
    assert "give one annotation CSV (got 2 inputs)" in capsys.readouterr().err
    (tmp_path / "shards").mkdir()
    argv = [
        "manifest",
        str(tmp_path / "shards"),
        "-o",
        str(tmp_path / "m.csv"),
        "--image-root",
        str(tmp_path),
    ]
    assert main(argv) == 2
    assert "image_root applies to CSV input" in capsys.readouterr().err

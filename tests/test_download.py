"""`geotoken data download` against a small HTTP server on 127.0.0.1 started by the test (no network)."""

import csv
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from geotoken.cli import main
from geotoken.data.download import DownloadConfig, download, find_url_column, read_url_list
from geotoken.data.images import open_image
from geotoken.data.manifest import read_manifest
from geotoken.errors import GeoTokenError
from helpers import jpeg_bytes


class Handler(BaseHTTPRequestHandler):
    """/img/SEED-WxH.jpg: a generated JPEG; /slow: answers after 3 s; /text: HTML; anything else: 404."""

    def do_GET(self):
        if self.path.startswith("/img/"):
            seed, size = self.path[5:-4].split("-")
            w, h = map(int, size.split("x"))
            self.reply(200, "image/jpeg", jpeg_bytes(int(seed), (w, h), quality=None))
        elif self.path == "/slow":
            time.sleep(3)
            self.reply(200, "image/jpeg", jpeg_bytes(0, (10, 10), quality=None))
        elif self.path == "/text":
            self.reply(200, "text/html", b"<html>not an image</html>")
        else:
            self.reply(404, "text/plain", b"not found")

    def reply(self, code, kind, body):
        try:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout test)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def write_urls(path, rows, header=("IMG_ID", "url", "LAT", "LON")):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_find_url_column(tmp_path):
    p = write_urls(tmp_path / "osv.csv", [], header=("id", "latitude", "longitude", "thumb_original_url"))
    assert find_url_column(p) == "thumb_original_url"
    with pytest.raises(GeoTokenError, match="no URL column"):
        find_url_column(write_urls(tmp_path / "x.csv", [], header=("id", "lat", "lon")))


def test_config_validation():
    with pytest.raises(GeoTokenError, match="resize_mode"):
        DownloadConfig(resize_mode="stretch")
    with pytest.raises(GeoTokenError, match="threads"):
        DownloadConfig(threads=0)


def test_bad_url_list_is_refused_before_downloading(tmp_path):
    p = write_urls(
        tmp_path / "u.csv", [("a", "http://127.0.0.1:9/a", 1, 2), ("b", "http://127.0.0.1:9/b", 95, 0)]
    )
    with pytest.raises(GeoTokenError, match=r"u.csv: line 3: id 'b': LAT 95.0 is outside"):
        download(p, tmp_path / "out")
    assert not list((tmp_path / "out").glob("*.tar"))


@pytest.mark.slow  # img2dataset spawns its worker processes, each importing pandas, pyarrow, opencv
def test_download_end_to_end(tmp_path, server):
    pytest.importorskip("img2dataset")
    good = [(f"im{i}.jpg", f"{server}/img/{i}-{40 + 8 * i}x30.jpg", 10.5 + i, -20.25 - i) for i in range(5)]
    broken = [
        ("missing.jpg", f"{server}/nothing-here.jpg", 1, 1),
        ("text.jpg", f"{server}/text", 2, 2),
        ("slow.jpg", f"{server}/slow", 3, 3),
    ]
    urls = write_urls(tmp_path / "urls.csv", good[:3] + broken + good[3:])
    out = tmp_path / "shards"
    argv = ["data", "download", str(urls), "-o", str(out), "--image-size", "20", "--processes", "1"]
    argv += ["--threads-per-process", "4", "--samples-per-shard", "4", "--retries", "0", "--timeout", "1"]
    assert main(argv) == 0

    m = read_manifest(out / "manifest.csv", check_images="decode")
    assert m.ids.tolist() == [g[0] for g in good]  # input order, whatever order the threads finished in
    np.testing.assert_array_equal(m.lat, [g[2] for g in good])  # exact: float64 all the way
    np.testing.assert_array_equal(m.lon, [g[3] for g in good])
    assert all(".tar#" in ref for ref in m.images)
    for i, ref in zip(m.ids.tolist(), m.images.tolist()):
        seed = int(i[2:-4])
        assert open_image(ref).size[1] == 20  # keep_ratio: shorter side resized to 20
        assert open_image(ref).size[0] == round(20 * (40 + 8 * seed) / 30)

    with open(out / "failed.csv", newline="") as f:
        failed = {r["id"]: r for r in csv.DictReader(f)}
    assert set(failed) == {"missing.jpg", "text.jpg", "slow.jpg"}
    assert "404" in failed["missing.jpg"]["error"]
    assert all(r["status"] != "success" and r["error"] for r in failed.values())

    # same command again (more threads is fine): the finished job is not redone, same manifest
    before = m.content_hash()
    result = download(
        urls, out, DownloadConfig(20, processes=1, threads=8, samples_per_shard=4, retries=0, timeout=1)
    )
    assert (result.requested, result.downloaded, result.failed) == (8, 5, 3)
    assert result.manifest.content_hash() == before
    # another config into the same folder is refused instead of mixing two datasets
    with pytest.raises(GeoTokenError, match="another input or config"):
        download(urls, out, DownloadConfig(image_size=64, samples_per_shard=4))


def test_a_download_that_got_nothing_fails_and_is_retried_by_a_rerun(tmp_path, server, capsys):
    """Offline (here: every URL a 404), img2dataset still writes an empty shard: the command said
    "downloaded 0 of 2" with exit 0, marked the job finished, and a rerun never fetched anything again."""
    pytest.importorskip("img2dataset")
    urls = write_urls(
        tmp_path / "urls.csv", [(f"n{i}.jpg", f"{server}/nothing-here-{i}.jpg", 1, 2) for i in range(2)]
    )
    out = tmp_path / "shards"
    argv = ["data", "download", str(urls), "-o", str(out), "--image-size", "20", "--processes", "1",
            "--threads-per-process", "2", "--retries", "0", "--timeout", "1"]  # fmt: skip
    for _ in range(2):  # the rerun tries again, rather than returning the empty job as done
        assert main(argv) == 2
        assert "none of the 2 images could be downloaded (first: http" in capsys.readouterr().err
        assert (
            not list(out.glob("*.tar"))
            and not json.loads((out / "_geotoken" / "download.json").read_text())["finished"]
        )


def test_missing_img2dataset_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "img2dataset", None)  # import now raises ImportError
    urls = write_urls(tmp_path / "u.csv", [("a", "http://127.0.0.1:9/a.jpg", 1, 2)])
    assert main(["data", "download", str(urls), "-o", str(tmp_path / "out")]) == 2
    assert "pip install 'geotoken[download]'" in capsys.readouterr().err


def test_headerless_id_url_list_takes_coordinates_from_annotations(tmp_path, monkeypatch, capsys):
    """GeoEstimation's mp16_urls.csv: no header, `image_id,url`, no coordinates. It failed with "no URL column
    in header ['8a/4c/1.jpg', 'http://...']"; now its coordinates come from --annotations, joined by id."""
    urls = tmp_path / "mp16_urls.csv"
    urls.write_text(
        "8a/4c/1.jpg,http://farm1.staticflickr.com/1/1_abc.jpg\n"
        "\n"
        "d9/a3/2.jpg,http://farm2.staticflickr.com/1/2_abc.jpg\n"
        "00/00/3.jpg,http://farm3.staticflickr.com/1/3_abc.jpg\n"
    )
    annotations = write_urls(
        tmp_path / "mp16_places365.csv",
        [("d9/a3/2.jpg", "x", 40.5, -74.25), ("8a/4c/1.jpg", "y", 48.75, 2.5), ("other.jpg", "z", 1, 1)],
        header=("IMG_ID", "AUTHOR", "LAT", "LON"),
    )
    with pytest.raises(
        GeoTokenError, match=r"mp16_urls.csv: no header: .*no latitude/longitude; pass --annotations"
    ):
        read_url_list(urls)
    with pytest.raises(
        GeoTokenError, match=r"mp16_urls.csv: line 4: id '00/00/3.jpg': no row with id '00/00/3.jpg'"
    ):
        read_url_list(urls, annotations=annotations)
    m = read_url_list(urls, annotations=annotations, on_error="skip", skip_report=tmp_path / "skipped.csv")
    assert m.ids.tolist() == ["8a/4c/1.jpg", "d9/a3/2.jpg"]
    assert m.lat.tolist() == [48.75, 40.5] and m.lon.tolist() == [2.5, -74.25]
    assert m.images.tolist() == [
        "http://farm1.staticflickr.com/1/1_abc.jpg",
        "http://farm2.staticflickr.com/1/2_abc.jpg",
    ]
    assert (tmp_path / "skipped.csv").read_text().splitlines()[1].startswith("4,00/00/3.jpg,")
    # a list with a header but no coordinates joins the same way
    named = write_urls(
        tmp_path / "named.csv", [("8a/4c/1.jpg", "http://h/1.jpg")], header=("image_id", "url")
    )
    assert read_url_list(named, annotations=annotations).lat.tolist() == [48.75]
    with pytest.raises(GeoTokenError, match="has its own coordinates"):
        read_url_list(write_urls(tmp_path / "u.csv", [("a", "http://h/a", 1, 2)]), annotations=annotations)
    # the command: --annotations gets the list past validation (here to the missing img2dataset)
    monkeypatch.setitem(sys.modules, "img2dataset", None)
    argv = ["data", "download", str(urls), "-o", str(tmp_path / "out"), "--skip-bad"]
    assert main(argv) == 2
    assert "--annotations" in capsys.readouterr().err
    assert main([*argv, "--annotations", str(annotations)]) == 2
    assert "pip install 'geotoken[download]'" in capsys.readouterr().err

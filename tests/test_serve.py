"""`geotoken serve`: the API with FastAPI's test client, around a real (untrained) Geolocator."""

import io
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from geotoken.predict import Candidate, Geolocator, Prediction  # noqa: E402
from geotoken.serve import ServeConfig, create_app  # noqa: E402
from helpers import encode, png_bytes, speckle_image  # noqa: E402


def jpeg_bytes(size=(96, 64)) -> bytes:
    return encode(speckle_image(size, 60), "JPEG", quality=90)  # noise: real entropy-coded data


def png_claiming(width: int, height: int) -> bytes:
    """A tiny valid-looking PNG whose header claims width x height (a decompression bomb's header)."""
    data = png_bytes((8, 8))
    ihdr = struct.pack(">II", width, height) + data[24:29]  # width, height, then depth/colour/.. as before
    chunk = b"IHDR" + ihdr
    return data[:12] + chunk + struct.pack(">I", zlib.crc32(chunk)) + data[33:]


@pytest.fixture(scope="module")
def geolocator(random_bundle):
    """A real bundle (random weights, 64 gallery rows) whose backbone reads 32 px images: fast on a CPU."""
    import torch

    torch.set_num_threads(1)
    return Geolocator.from_bundle(random_bundle(gallery_rows=64, k=5, image_size=32))


@pytest.fixture(scope="module")
def client(geolocator):
    config = ServeConfig(max_upload_mb=0.25, max_pixels=1_000_000, concurrency=8, basemap_width=512)
    return TestClient(create_app(geolocator, config))


def post(client, data: bytes, name="photo.png", mime="image/png", **fields):
    return client.post("/v1/geolocate", files={"image": (name, data, mime)}, data=fields)


def test_good_image_gives_candidates(client, geolocator):
    r = post(client, png_bytes(), top_k="3", strategy="greedy")
    assert r.status_code == 200, r.text
    body = r.json()
    cands = body["candidates"]
    assert 1 <= len(cands) <= 3
    assert body["strategy"] == "greedy"
    T = geolocator.model.cfg.n_tokens
    for c in cands:
        assert -90 <= c["lat"] <= 90 and -180 <= c["lon"] <= 180
        assert 0 <= c["probability"] <= 1
        assert len(c["polygon"]) == 4 and all(len(v) == 2 for v in c["polygon"])
        assert isinstance(c["cell"], str) and c["cell"]
        assert len(c["level_confidence"]) == T
        assert "country" in c["place"]
    assert (body["lat"], body["lon"]) == (cands[0]["lat"], cands[0]["lon"])
    assert body["image"] == {"name": "photo.png", "width": 64, "height": 48, "bytes": len(png_bytes())}
    assert body["timings_ms"]["request"] >= body["timings_ms"]["total"] > 0


def test_options_from_the_query_string(client):
    r = client.post(
        "/v1/geolocate?top_k=1&strategy=greedy", files={"image": ("a.jpg", jpeg_bytes(), "image/jpeg")}
    )
    assert r.status_code == 200, r.text
    assert len(r.json()["candidates"]) == 1


@pytest.mark.parametrize(
    "fields, needle",
    [
        ({"top_k": "0"}, "top_k"),
        ({"top_k": "99"}, "top_k"),
        ({"strategy": "nope"}, "strategy"),
        ({"select": "x"}, "select"),
    ],
)
def test_bad_options_are_422(client, fields, needle):
    r = post(client, png_bytes(), **fields)
    assert r.status_code == 422
    assert needle in r.json()["error"]


def test_non_image_is_415(client):
    r = post(client, b"%PDF-1.4 definitely not a photo", name="notes.pdf", mime="application/pdf")
    assert r.status_code == 415
    assert "notes.pdf" in r.json()["error"] and "not an image" in r.json()["error"]


def test_empty_upload_is_422(client):
    assert post(client, b"", name="empty.jpg").status_code == 422


def test_truncated_jpeg_is_422(client):
    data = jpeg_bytes()
    r = post(client, data[: len(data) // 2], name="cut.jpg", mime="image/jpeg")
    assert r.status_code == 422
    assert "cut.jpg" in r.json()["error"]


def test_too_large_upload_is_413(client):
    data = png_bytes() + b"\0" * (300 * 1024)  # over the 0.25 MB limit
    r = post(client, data, name="big.png")
    assert r.status_code == 413
    assert "MB" in r.json()["error"]


def test_oversize_body_is_refused_before_parsing(client):
    big = png_bytes() + b"\0" * (1024 * 1024)
    assert post(client, big, name="huge.png").status_code == 413  # declared: Content-Length

    def chunks():  # streamed without a length (chunked): counted as it arrives
        boundary = b"--xyz"
        yield boundary + b'\r\nContent-Disposition: form-data; name="image"; filename="s.png"\r\n\r\n'
        for _ in range(64):
            yield b"\0" * 16384
        yield b"\r\n" + boundary + b"--\r\n"

    headers = {"content-type": "multipart/form-data; boundary=xyz"}
    r = client.post("/v1/geolocate", content=chunks(), headers=headers)
    assert r.status_code == 413
    assert "upload limit" in r.json()["error"]


def test_decompression_bomb_is_413_before_decoding(client):
    r = post(client, png_claiming(100_000, 100_000), name="bomb.png")
    assert r.status_code == 413
    assert "bomb.png" in r.json()["error"]
    r = post(client, png_bytes((1200, 1000)), name="big-pixels.png")  # 1.2 M pixels > 1 M limit
    assert r.status_code == 413
    assert "1200x1000" in r.json()["error"]


def test_a_path_is_not_a_file(client):
    r = client.post("/v1/geolocate", data={"image": "/etc/passwd"})  # a form string, not an upload
    assert r.status_code == 422
    assert "root:" not in r.text and "'image'" in r.json()["error"]
    r = post(client, png_bytes(), top_k="many")
    assert r.status_code == 422 and "'top_k'" in r.json()["error"]


def test_health_model_openapi_page(client, geolocator):
    assert client.get("/healthz").json()["status"] == "ok"
    m = client.get("/v1/model").json()
    assert m["model"]["gallery_rows"] == 64 and m["limits"]["max_pixels"] == 1_000_000
    assert "/v1/geolocate" in client.get("/openapi.json").json()["paths"]
    page = client.get("/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    for asset in ("/static/app.js", "/static/style.css"):
        r = client.get(asset)
        assert r.status_code == 200 and "http://" not in r.text.replace("http://www.w3.org/2000/svg", "")
    basemap = client.get("/basemap.jpg")
    assert basemap.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(basemap.content)).size == (512, 256)


def test_concurrent_requests_are_all_answered(client):
    served = client.app.state.runner.served
    with ThreadPoolExecutor(4) as pool:
        responses = list(
            pool.map(lambda i: post(client, png_bytes(color=(i * 60, 90, 30)), strategy="greedy"), range(4))
        )
    assert [r.status_code for r in responses] == [200] * 4
    assert all(r.json()["candidates"] for r in responses)
    assert client.app.state.runner.served == served + 4
    assert client.app.state.runner.in_flight == 0


class BlockingPredictor:
    """Holds each call until released: makes 'the server is full' deterministic."""

    def __init__(self):
        self.release = threading.Event()
        self.calls: list[int] = []  # images per predict call

    def info(self) -> dict:
        return {"name": "blocking"}

    def predict(self, images, top_k=5, strategy=None, select=None):
        self.calls.append(len(images))
        self.release.wait(10)
        cand = Candidate(1.0, 2.0, float("nan"), 200.0, {}, None, "", 20, [], {}, None, "pool")
        return [Prediction([cand], {"total": 1.0}, strategy or "beam", select or "logp") for _ in images]


def wait_until(condition, seconds=10):
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert condition()


def test_full_server_answers_503_at_once():
    predictor = BlockingPredictor()
    client = TestClient(create_app(predictor, ServeConfig(concurrency=1)))
    runner = client.app.state.runner
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(post, client, png_bytes())
        wait_until(lambda: runner.in_flight == 1)
        second = post(client, png_bytes())
        assert second.status_code == 503
        assert second.headers["retry-after"] == "1"
        predictor.release.set()
        assert first.result().status_code == 200
    assert first.result().json()["candidates"][0]["probability"] is None  # NaN is not JSON: null
    assert runner.rejected == 1 and runner.served == 1


def test_requests_that_wait_together_are_one_batch():
    predictor = BlockingPredictor()
    client = TestClient(create_app(predictor, ServeConfig(concurrency=8, max_batch=8)))
    runner = client.app.state.runner
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(post, client, png_bytes(), top_k="2")
        wait_until(lambda: predictor.calls == [1])  # the model thread is busy with the first image
        rest = [pool.submit(post, client, png_bytes(), top_k="2") for _ in range(3)]
        wait_until(lambda: runner.in_flight == 4)
        predictor.release.set()
        responses = [first.result()] + [f.result() for f in rest]
    assert [r.status_code for r in responses] == [200] * 4
    assert predictor.calls == [1, 3]
    assert sorted(r.json()["timings_ms"]["batch_size"] for r in responses) == [1, 3, 3, 3]
    assert runner.batches == 2 and runner.served == 4 and runner.in_flight == 0


def test_the_page_offers_every_strategy_and_selector():
    import re

    from geotoken.search import SELECTORS, STRATEGIES
    from geotoken.serve.app import STATIC_DIR

    page = (STATIC_DIR / "index.html").read_text()
    menus = {
        name: re.findall(r"<option>([^<]+)</option>", body)
        for name, body in re.findall(r'<select id="(\w+)">(.*?)</select>', page, flags=re.S)
    }
    assert menus["strategy"] == list(STRATEGIES)
    assert menus["select"] == list(SELECTORS)

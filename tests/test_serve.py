"""`geotoken serve`: the API with FastAPI's test client, around a real (untrained) Geolocator."""

import io
import re
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from geotoken.cli import main  # noqa: E402
from geotoken.errors import GeoTokenError  # noqa: E402
from geotoken.predict import Candidate, Geolocator, Prediction  # noqa: E402
from geotoken.search import SELECTORS, STRATEGIES  # noqa: E402
from geotoken.serve import Runner, ServeConfig, ServiceRate, ShuttingDown, create_app  # noqa: E402
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
    config = ServeConfig(max_upload_mb=0.25, max_pixels=1_000_000, basemap_width=512)
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


def test_top_k_above_the_servers_bound_is_refused_and_the_bound_is_an_option(geolocator, capsys):
    small = TestClient(create_app(geolocator, ServeConfig(max_top_k=2, basemap_width=512)))
    r = post(small, png_bytes(), top_k="3")
    assert r.status_code == 422 and "less than or equal to 2" in r.json()["error"]
    # a request without top_k (the web page's first, any client's) takes the default within the bound
    r = post(small, png_bytes())
    assert r.status_code == 200 and 1 <= len(r.json()["candidates"]) <= 2
    note = post(small, png_bytes(), top_k="2", strategy="greedy").json()["note"]
    assert "1 of the 2 candidates asked for: the search (greedy)" in note
    with pytest.raises(GeoTokenError, match="max_top_k must be a whole number in 1..1000"):
        ServeConfig(max_top_k=5000)
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "--max-top-k" in capsys.readouterr().out


def test_a_misspelt_field_is_refused_not_dropped(client):
    for r in (post(client, png_bytes(), topk="3"), client.post("/v1/geolocate?stratgy=beam",
              files={"image": ("a.png", png_bytes(), "image/png")})):  # fmt: skip
        assert r.status_code == 422, r.text
        assert "unknown field(s) [" in r.json()["error"] and "select, strategy, top_k" in r.json()["error"]
    body = client.get("/openapi.json").json()["components"]["schemas"]
    assert [b["additionalProperties"] for name, b in body.items() if name.startswith("Body_")] == [False]


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


def test_the_photos_own_gps_comes_back_with_its_distance(client):
    from PIL import ExifTags

    exif = Image.Exif()
    ifd = exif.get_ifd(ExifTags.IFD.GPSInfo)
    ifd.update({ExifTags.GPS.GPSLatitudeRef: "S", ExifTags.GPS.GPSLatitude: (33.0, 51.0, 24.5),
                ExifTags.GPS.GPSLongitudeRef: "E", ExifTags.GPS.GPSLongitude: (151.0, 12.0, 55.1)})  # fmt: skip
    buf = io.BytesIO()
    Image.open(io.BytesIO(jpeg_bytes())).save(buf, "JPEG", exif=exif)
    body = post(client, buf.getvalue(), name="sydney.jpg", mime="image/jpeg").json()
    gps = body["exif_gps"]
    assert (gps["lat"], gps["lon"]) == pytest.approx((-33.856806, 151.215306), abs=1e-6)
    assert gps["distance_km"] >= 0
    assert "exif_gps" not in post(client, jpeg_bytes(), name="plain.jpg", mime="image/jpeg").json()


def test_one_photo_per_request(client):
    files = [("image", ("a.png", png_bytes(), "image/png")), ("image", ("b.png", png_bytes(), "image/png"))]
    r = client.post("/v1/geolocate", files=files)
    assert r.status_code == 422 and "one photo per request, got 2" in r.json()["error"]


@pytest.mark.parametrize(
    "send, kind",
    [
        (dict(json={"image": "aGVsbG8="}), "application/json"),
        (dict(content=png_bytes(), headers={"content-type": "image/png"}), "image/png"),
        (dict(data={"image": "photo.png"}), "application/x-www-form-urlencoded"),
    ],
)
def test_photo_not_sent_as_a_file_part_is_told_how(client, send, kind):
    r = client.post("/v1/geolocate", **send)
    assert r.status_code == 415, r.text
    assert "multipart/form-data with the photo as a file in field 'image'" in r.json()["error"]
    assert f"(got {kind})" in r.json()["error"]


def test_multipart_without_the_image_file_is_422(client):
    r = client.post("/v1/geolocate", files={"photo": ("a.png", png_bytes(), "image/png")})
    assert r.status_code == 422 and "field 'image'" in r.json()["error"]
    r = client.post("/v1/geolocate", files={"top_k": (None, "3")}, data={"image": "photo.png"})
    assert r.status_code == 422 and "send the photo as a file part, not as text" in r.json()["error"]


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
    import warnings

    from PIL import Image

    with warnings.catch_warnings(record=True) as seen:  # 100 MP: PIL warns (above 89 MP), we refuse it
        warnings.simplefilter("always")
        assert post(client, png_claiming(10_000, 10_000), name="wide.png").status_code == 413
    assert not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)]
    r = post(client, png_bytes((1200, 1000)), name="big-pixels.png")  # 1.2 M pixels > 1 M limit
    assert r.status_code == 413
    assert "1200x1000" in r.json()["error"]


def test_a_path_is_not_a_file(client):
    r = client.post("/v1/geolocate", data={"image": "/etc/passwd"})  # a form string, not an upload
    assert r.status_code == 415
    assert "root:" not in r.text and "'image'" in r.json()["error"]
    r = post(client, png_bytes(), top_k="many")
    assert r.status_code == 422 and "'top_k'" in r.json()["error"]


def test_health_model_openapi_page(client, geolocator):
    assert client.get("/healthz").json()["status"] == "ok"
    m = client.get("/v1/model").json()
    assert m["model"]["gallery_rows"] == 64 and m["limits"]["max_pixels"] == 1_000_000
    assert m["limits"]["max_queue_wait_s"] == ServeConfig().max_queue_wait_s == 10.0
    assert "/v1/geolocate" in client.get("/openapi.json").json()["paths"]
    page = client.get("/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    for asset in ("/static/app.js", "/static/style.css"):
        r = client.get(asset)
        assert r.status_code == 200 and "http://" not in r.text.replace("http://www.w3.org/2000/svg", "")
    basemap = client.get("/basemap.jpg")
    assert basemap.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(basemap.content)).size == (512, 256)

    # what this server runs, and why not the rest (the bundle has no reward scorer)
    assert "reward" not in m["selectors"] and "reward scorer" in m["unavailable"]["reward"]
    # the API reference works offline: rendered here, no script from elsewhere
    docs = client.get("/docs")
    assert docs.status_code == 200 and "POST /v1/geolocate" in docs.text and "<code>top_k</code>" in docs.text
    assert "<script" not in docs.text and "cdn" not in docs.text.lower()
    assert client.get("/redoc").status_code == 404
    # Starlette's own errors in our shape
    for r, status in ((client.get("/nowhere"), 404), (client.get("/v1/geolocate"), 405)):
        assert r.status_code == status and set(r.json()) == {"error"}


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


class FakeClock:
    """time.monotonic stand-in: time moves only when a test says so."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def queue_app(
    predictor, seconds_per_image: float, budget_s: float, max_batch: int = 8, clock=None, window=None
):
    """An app whose admission starts from a given service-rate estimate and uses a fake clock (nothing is
    timed); without a window the estimate is frozen: measurements never move it."""
    if window is None:
        rate = ServiceRate(seconds_per_image, frozen=True)
    else:
        rate = ServiceRate(seconds_per_image, window=window)
    runner = Runner(predictor, budget_s, max_batch, rate=rate, clock=clock or FakeClock())
    return create_app(predictor, ServeConfig(max_queue_wait_s=budget_s, max_batch=max_batch), runner)


def test_full_server_answers_503_at_once():
    predictor = BlockingPredictor()
    # 1 s per image, 0.5 s budget: the running image alone puts the next one over the budget
    client = TestClient(queue_app(predictor, seconds_per_image=1.0, budget_s=0.5))
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


def test_a_request_over_the_wait_budget_gets_503_with_retry_after():
    predictor, clock = BlockingPredictor(), FakeClock()
    # 4 s per image so far (counting as one image, halved by each new one: window 2)
    client = TestClient(queue_app(predictor, seconds_per_image=4.0, budget_s=10.0, clock=clock, window=2))
    runner = client.app.state.runner
    with ThreadPoolExecutor(3) as pool:
        admitted = [pool.submit(post, client, png_bytes())]
        wait_until(lambda: predictor.calls == [1])  # running: 4 s left of it
        admitted.append(pool.submit(post, client, png_bytes()))  # expected wait 4 s
        wait_until(lambda: runner.in_flight == 2)
        admitted.append(pool.submit(post, client, png_bytes()))  # 4 + 4 = 8 s
        wait_until(lambda: runner.in_flight == 3)
        assert client.get("/healthz").json()["expected_wait_s"] == 12.0
        r = post(client, png_bytes())  # 4 + 2 x 4 = 12 s > 10 s
        assert r.status_code == 503
        assert r.headers["retry-after"] == "2"  # 12 - 10 s, when the wait would fit again
        assert "12.0 s" in r.json()["error"] and "10 s budget" in r.json()["error"]
        clock.now += 25  # the model stalls: 25 s so far for the running image, counted as if done now:
        r = post(client, png_bytes())  # (4 / 2 + 25) s / (1 / 2 + 1) images = 18 s per image, 2 queued: 36 s
        assert r.status_code == 503 and r.headers["retry-after"] == "26"
        assert client.get("/healthz").json()["expected_wait_s"] == 36.0
        predictor.release.set()
        responses = [f.result() for f in admitted]
    assert [r.status_code for r in responses] == [200] * 3  # everything admitted is answered
    assert predictor.calls == [1, 2]
    assert runner.rejected == 2 and runner.served == 3 and runner.in_flight == 0


def test_within_the_budget_many_concurrent_requests_all_succeed():
    predictor = BlockingPredictor()
    # 0.1 s per image, 10 s budget: 64 images (at most 6.4 s of queue) all fit
    app = queue_app(predictor, seconds_per_image=0.1, budget_s=10.0, max_batch=8)
    runner = app.state.runner
    with TestClient(app) as client, ThreadPoolExecutor(64) as pool:
        futures = [pool.submit(post, client, png_bytes(color=(i, 0, 0)), top_k="1") for i in range(64)]
        wait_until(lambda: runner.in_flight == 64)  # all admitted while the model is held
        assert runner.rejected == 0
        predictor.release.set()
        responses = [f.result() for f in futures]
    assert [r.status_code for r in responses] == [200] * 64
    assert sum(predictor.calls) == 64 and max(predictor.calls) <= 8  # micro-batched, max_batch at most
    assert runner.served == 64 and runner.rejected == 0 and runner.in_flight == 0


def test_expected_wait_from_the_measured_rate_and_the_queue():
    rate = ServiceRate(window=2)  # what came before halves with each new image
    assert rate.value is None
    rate.observe(2.0, 4)  # the first batch sets it: 0.5 s per image
    assert rate.value == 0.5
    rate.observe(2.0, 1)  # then decayed sums: (2 s x 0.5 + 2 s) / (4 x 0.5 + 1) images
    assert rate.value == (2.0 * 0.5 + 2.0) / (4 * 0.5 + 1) == 1.0
    predictor, clock = BlockingPredictor(), FakeClock()
    runner = Runner(predictor, max_queue_wait_s=10, rate=rate, clock=clock)
    assert runner.expected_wait_s() == 0.0  # idle
    first = runner.submit("image")
    wait_until(lambda: predictor.calls == [1])
    assert runner.expected_wait_s() == 1.0  # what is left of the running image
    clock.now += 0.5
    assert runner.expected_wait_s() == 0.5
    rest = [runner.submit("image"), runner.submit("image")]
    assert runner.queued == 2 and runner.expected_wait_s() == 0.5 + 2 * 1.0
    clock.now += 2.0  # running for 2.5 s, more than the estimate said: counted as if it finished now
    assert runner.seconds_per_image == (3 * 0.5 + 2.5) / (3 * 0.5 + 1) == 1.6
    assert runner.expected_wait_s() == 2 * 1.6  # nothing left of the running one; 2 queued
    assert rate.value == 1.0  # provisionally: nothing is recorded before the batch ends
    predictor.release.set()
    assert [f.result()[2] for f in [first, *rest]] == [1, 2, 2]  # batch sizes
    # 2.5 s for 1 image: (4 s, 2.5 images); then 0 s for 2 (fake clock): (4 x 0.25) / (2.5 x 0.25 + 2)
    assert rate.value == pytest.approx(1 / 2.625)
    runner.close()


def test_the_service_rate_shrugs_off_a_slow_call():
    cold = ServiceRate()  # the default window: 64 images
    cold.observe(3.0, 1)  # a slow first call (lazy initialisation)
    for _ in range(8):
        cold.observe(8 * 0.03, 8)  # then full batches at 30 ms per image
    assert 0.03 < cold.value < 2 * 0.03
    steady = ServiceRate(0.05)
    for _ in range(16):
        steady.observe(8 * 0.05, 8)
    steady.observe(8 * 0.3, 8)  # one batch 6x slower (another process took the cores)
    assert steady.value < 2 * 0.05


def test_shutdown_answers_every_admitted_request_first():
    predictor = BlockingPredictor()
    runner = Runner(predictor, max_queue_wait_s=10, rate=ServiceRate(0.1, frozen=True), clock=FakeClock())
    futures = [runner.submit("image")]
    wait_until(lambda: predictor.calls == [1])  # one running, two queued
    futures += [runner.submit("image"), runner.submit("image")]
    closer = threading.Thread(target=runner.close)
    closer.start()
    wait_until(lambda: runner.closing)
    with pytest.raises(ShuttingDown):
        runner.submit("image")  # nothing new once closing
    assert closer.is_alive()  # still answering what it admitted
    predictor.release.set()
    closer.join(10)
    assert not closer.is_alive() and not runner.alive
    assert [f.result()[0].candidates[0].lat for f in futures] == [1.0] * 3
    assert predictor.calls == [1, 2] and runner.in_flight == 0


def test_the_app_serves_again_after_a_restart():
    """Each lifespan's shutdown stops the model thread; the next startup starts it again."""
    predictor = BlockingPredictor()
    predictor.release.set()
    app = create_app(predictor, ServeConfig())
    for _ in range(2):
        with TestClient(app) as client:
            assert app.state.runner.alive
            assert post(client, png_bytes()).status_code == 200
        assert not app.state.runner.alive and app.state.runner.closing
    assert app.state.runner.served == 2


def test_graceful_shutdown_over_http_finishes_admitted_requests(free_port):
    """uvicorn stops listening at once, answers the requests it admitted, then the app stops the model."""
    import socket

    import httpx
    import uvicorn

    predictor = BlockingPredictor()
    app = queue_app(predictor, seconds_per_image=0.1, budget_s=10.0)
    runner = app.state.runner
    port = free_port
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    wait_until(lambda: srv.started)
    url = f"http://127.0.0.1:{port}/v1/geolocate"

    def send(i):
        with httpx.Client(timeout=30) as c:
            return c.post(url, files={"image": ("p.png", png_bytes(color=(i, 0, 0)), "image/png")})

    def refused() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return False
        except OSError:
            return True

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(send, i) for i in range(4)]
        wait_until(lambda: runner.in_flight == 4)
        srv.should_exit = True  # what SIGINT / SIGTERM do
        wait_until(refused)  # no longer listening: nothing new gets in
        assert not any(f.done() for f in futures) and thread.is_alive()
        predictor.release.set()
        responses = [f.result() for f in futures]
    thread.join(10)
    assert [r.status_code for r in responses] == [200] * 4
    assert not thread.is_alive() and runner.closing and not runner.alive
    assert runner.served == 4


def test_requests_that_wait_together_are_one_batch():
    predictor = BlockingPredictor()
    client = TestClient(queue_app(predictor, seconds_per_image=0.1, budget_s=10.0, max_batch=8))
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


def test_null_form_fields_mean_not_given(client):
    """Multipart has no null; the schema says these fields are nullable, so "null" / "" mean the default."""
    r = post(client, png_bytes(), top_k="null", strategy="null", select="")
    assert r.status_code == 200, r.text
    assert 1 <= len(r.json()["candidates"]) <= 5
    r = client.post(
        "/v1/geolocate?top_k=null&select=null", files={"image": ("a.png", png_bytes(), "image/png")}
    )
    assert r.status_code == 200, r.text


def test_options_the_model_cannot_run_are_not_offered(client):
    schema = client.get("/openapi.json").json()["components"]["schemas"]["Body_geolocate_v1_geolocate_post"]
    enum = {name: schema["properties"][name]["anyOf"][0]["enum"] for name in ("strategy", "select")}
    assert enum["strategy"] == list(STRATEGIES)
    assert enum["select"] == [
        "logp",
        "consensus",
        "vote",
        "gate",
    ]  # no reward scorer in the bundle, no MLLM endpoint
    for fields in ({"select": "reward"}, {"select": "mllm"}):
        r = post(client, png_bytes(), **fields)
        assert r.status_code == 422 and "not available on this server" in r.json()["error"]
    r = client.post("/v1/geolocate?select=reward", files={"image": ("a.png", png_bytes(), "image/png")})
    assert r.status_code == 422 and "reward scorer" in r.json()["error"]


def test_cli_defaults_are_the_library_defaults():
    from geotoken.cli import build_parser

    args = build_parser().parse_args(["serve", "--model", "b"])
    cfg = ServeConfig()
    assert (args.max_queue_wait_s, args.max_batch, args.max_upload_mb, args.max_pixels) == (
        cfg.max_queue_wait_s,
        cfg.max_batch,
        cfg.max_upload_mb,
        cfg.max_pixels,
    )
    assert (
        build_parser().parse_args(["serve", "--model", "b", "--max-queue-wait-s", "2.5"]).max_queue_wait_s
        == 2.5
    )


def test_the_page_offers_every_strategy_and_selector():
    import re

    from geotoken.serve.app import STATIC_DIR

    page = (STATIC_DIR / "index.html").read_text()
    menus = {
        name: re.findall(r"<option>([^<]+)</option>", body)
        for name, body in re.findall(r'<select id="(\w+)">(.*?)</select>', page, flags=re.S)
    }
    assert menus["strategy"] == list(STRATEGIES)
    assert menus["select"] == list(SELECTORS)


def test_vote_is_not_offered_without_retrieval():
    from geotoken.serve.app import unavailable_options

    assert "vote" in unavailable_options({"model": {"k": 0}})
    assert "vote" not in unavailable_options({"model": {"k": 5}})
    assert "vote" in unavailable_options({"name": "geoclip", "model": "GeoCLIP", "selectors": ["logp"]})


class MLLMSlowPredictor(BlockingPredictor):
    """select=mllm calls wait for `release` (an MLLM's network round trip); the others answer at once."""

    def info(self) -> dict:
        return {
            "name": "stub",
            "search": {"select": "logp", "mllm": {"base_url": "http://127.0.0.1:9/v1", "model": "m"}},
        }

    def predict(self, images, top_k=5, strategy=None, select=None):
        if select != "mllm":
            cand = Candidate(1.0, 2.0, 0.5, 200.0, {}, None, "", 20, [], {}, None, "pool")
            return [
                Prediction([cand], {"total": 1.0}, strategy or "greedy", select or "logp") for _ in images
            ]
        return super().predict(images, top_k, strategy, select)


def test_a_slow_mllm_request_does_not_hold_up_the_others():
    """One model thread ran everything: a request behind a 30 s MLLM answer waited 30 s, and the MLLM's
    latency entered the service rate every request is admitted by. select=mllm has a lane of its own."""
    predictor = MLLMSlowPredictor()
    with TestClient(create_app(predictor, ServeConfig(basemap_width=512))) as client:
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(post, client, png_bytes(), select="mllm")
            wait_until(lambda: client.app.state.mllm_runner.in_flight == 1)
            fast = post(client, png_bytes(), select="logp")  # answered while the MLLM request waits
            assert fast.status_code == 200 and not slow.done()
            health = client.get("/healthz").json()
            assert health["mllm"]["in_flight"] == 1 and health["in_flight"] == 0
            predictor.release.set()
            assert slow.result().status_code == 200
        assert client.app.state.runner.served == 1 and client.app.state.mllm_runner.served == 1


class PoisonPredictor(BlockingPredictor):
    """Fails any call holding a 7-pixel-wide image, as a model fault on one photo would."""

    def predict(self, images, top_k=5, strategy=None, select=None):
        out = super().predict(images, top_k, strategy, select)
        if any(im.width == 7 for im in images):
            raise RuntimeError("a fault on one photo")
        return out


def test_one_photo_that_fails_does_not_fail_its_batch():
    predictor = PoisonPredictor()
    client = TestClient(queue_app(predictor, seconds_per_image=0.1, budget_s=10.0, max_batch=8))
    runner = client.app.state.runner
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(post, client, png_bytes())
        wait_until(lambda: predictor.calls == [1])  # the model thread holds the first image
        good = [pool.submit(post, client, png_bytes()) for _ in range(2)]
        bad = pool.submit(post, client, png_bytes(size=(7, 9)), name="bad.png")
        wait_until(lambda: runner.in_flight == 4)
        predictor.release.set()
        responses = [first.result()] + [f.result() for f in good]
        failed = bad.result()
    assert [r.status_code for r in responses] == [200] * 3
    assert failed.status_code == 500 and "bad.png" in failed.json()["error"]
    assert predictor.calls[:2] == [1, 3] and sorted(predictor.calls[2:]) == [1, 1, 1]  # then one by one
    assert runner.served == 3


def test_uploads_that_need_an_interpreter_are_refused(client):
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    r = post(client, eps, name="x.eps", mime="application/postscript")
    assert r.status_code == 415 and "not an image in JPEG, PNG" in r.json()["error"]


def test_the_cli_binds_its_port_before_loading_the_model(free_port, capsys):
    from geotoken.cli import main
    from geotoken.cli.serve import listen

    held = listen("127.0.0.1", free_port)
    held.listen()
    try:  # "--model nowhere" would fail later: the port is checked first
        assert main(["serve", "--model", "nowhere", "--port", str(free_port)]) == 2
        assert "Address already in use" in capsys.readouterr().err
    finally:
        held.close()
    assert main(["serve", "--model", "nowhere", "--port", "99999"]) == 2
    assert "a TCP port is 1-65535" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--model", "nowhere", "--threads", "-3"])
    assert "--threads: must be >= 0" in capsys.readouterr().err


def test_decoded_photos_waiting_are_bounded_in_pixels():
    from geotoken.serve import Busy

    predictor = BlockingPredictor()
    runner = Runner(predictor, 100.0, 8, max_queued_pixels=300, rate=ServiceRate(0.0, frozen=True))
    photo = Image.new("RGB", (10, 10))  # 100 px
    first = runner.submit(photo)
    wait_until(lambda: runner.running == 1)  # taken by the model thread: no longer waiting
    waiting = [runner.submit(photo) for _ in range(3)]
    assert runner.queued_pixels == 300
    with pytest.raises(Busy, match="0 MP of photos are waiting, the limit is 0.0003 MP"):
        runner.submit(photo)
    predictor.release.set()
    assert all(f.result(10) for f in [first, *waiting]) and runner.queued_pixels == 0
    big = Runner(BlockingPredictor(), 100.0, 8, max_queued_pixels=50)
    big.predictor.release.set()
    assert big.run(photo)[2] == 1  # a photo over the limit still gets in alone: it can be served
    runner.close(), big.close()


def test_the_cli_folds_mllm_options_into_the_bundles(random_bundle, free_port, monkeypatch):
    import uvicorn

    import geotoken.cli.serve as serve_cli

    served = {}

    def app(geolocator, config, runner):
        served["options"] = geolocator.options
        return create_app(geolocator, config, runner)

    monkeypatch.setattr(serve_cli, "create_app", app)
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets: served.setdefault("ran", True))
    bundle = str(random_bundle(gallery_rows=64, k=5, image_size=32))
    args = ["serve", "--model", bundle, "--port", str(free_port), "--threads", "1"]
    assert main([*args, "--mllm-mode", "free", "--mllm-match-km", "25", "--mllm-concurrency", "2"]) == 0
    mllm = served["options"].mllm
    assert served["ran"] and (mllm.mode, mllm.match_km, mllm.concurrency) == ("free", 25.0, 2)
    assert mllm.template == "paper" and mllm.timeout_s == 60.0  # not given: the bundle's
    with pytest.raises(SystemExit):
        main([*args, "--mllm-retries", "-1"])


def test_a_request_cancelled_while_queued_is_skipped_and_the_model_thread_goes_on():
    """A shutdown past its grace (or a gone client) cancels a waiting request's future: answering it raised
    InvalidStateError in the model thread, which died, and every later request hung."""
    predictor = BlockingPredictor()
    runner = Runner(predictor, max_queue_wait_s=100, max_batch=1)
    first = runner.submit(Image.new("RGB", (8, 8)))
    wait_until(lambda: runner.running == 1)
    gone, kept = runner.submit(Image.new("RGB", (8, 8))), runner.submit(Image.new("RGB", (8, 8)))
    assert gone.cancel()
    predictor.release.set()
    assert first.result(5)[0].lat == 1.0 and kept.result(5)[0].lat == 1.0
    assert runner.alive and runner.in_flight == 0 and predictor.calls == [1, 1]
    runner.close(5)


def test_repeated_fields_infinite_limits_and_internal_faults_are_said_in_json(geolocator, monkeypatch):
    import geotoken.serve.app as app_module

    app = create_app(geolocator, ServeConfig(basemap_width=256))
    client = TestClient(app, raise_server_exceptions=False)
    r = client.post(
        "/v1/geolocate?top_k=7", files={"image": ("a.png", png_bytes(), "image/png")}, data={"top_k": "3"}
    )
    assert r.status_code == 422 and "field 'top_k' is given 2 times" in r.json()["error"]
    assert client.head("/healthz").status_code == 200
    assert client.get("/v1/model").json()["model"]["bundle"] == geolocator.root.name  # not the server's path
    monkeypatch.setattr(app_module, "photo_gps", lambda data, pred: 1 / 0)  # a fault of ours past the model
    r = post(client, png_bytes())
    assert r.status_code == 500 and re.fullmatch(
        r"internal error [0-9a-f]{8} \(ZeroDivisionError; details in the server's log\)", r.json()["error"]
    )  # (an exception's text may name the server's files: it goes to the log)
    from geotoken.serve.app import public_info

    shown = public_info({"bundle": "/srv/b/bundle-1", "backbone": {"name": "clip", "clip": "/srv/models/clip-l14"},
                         "search": {"mllm": {"base_url": "http://10.0.0.5:8000/v1", "model": "m"}}})  # fmt: skip
    assert shown == {
        "bundle": "bundle-1",
        "backbone": {"name": "clip", "clip": "clip-l14"},
        "search": {"mllm": {"model": "m"}},
    }
    for name in ("max_upload_mb", "max_queue_wait_s"):
        with pytest.raises(GeoTokenError, match=f"serve option {name} must be a finite number > 0, got inf"):
            ServeConfig(**{name: float("inf")})


def test_the_mllm_lane_starts_from_its_timeout_not_from_nothing(geolocator):
    """Unmeasured, a lane admitted a whole burst at once (an expected wait of 0): five requests then waited
    minutes on a stalled endpoint. Until measured, each of its concurrent calls counts as one timeout."""
    import dataclasses

    from geotoken.search.mllm import MLLMConfig

    geolocator = Geolocator.from_bundle(geolocator.root)
    geolocator.options = dataclasses.replace(
        geolocator.options,
        mllm=MLLMConfig(base_url="http://127.0.0.1:9/v1", model="m", timeout_s=20, concurrency=4),
    )
    app = create_app(geolocator, ServeConfig(basemap_width=256))
    assert app.state.mllm_runner.seconds_per_image == 5.0 and app.state.runner.seconds_per_image == 0.0


def test_warm_up_starts_from_the_fastest_timed_call():
    """The second call alone ran several times slower than the steady rate on a fresh process."""
    from geotoken.serve import warm_up

    class Slowing:
        def __init__(self):
            self.waits = iter([0.3, 0.3, 0.01, 0.02, 0.01])

        def predict(self, images, top_k=5):
            time.sleep(next(self.waits))
            return []

    assert warm_up(Slowing()).value < 0.1

"""MLLM selection against a small OpenAI-compatible server on 127.0.0.1 started by the test."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from geotoken.errors import GeoTokenError
from geotoken.search.candidates import Candidates
from geotoken.search.mllm import MLLMConfig, parse_answer, select_mllm

# Two images, three candidates each; candidate 0 is the most likely.
LAT = np.array([[48.8566, 51.5074, 40.7128], [35.6762, -33.8688, 55.7558]])
LON = np.array([[2.3522, -0.1278, -74.0060], [139.6503, 151.2093, 37.6173]])


def make_pool():
    tokens = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    logp = np.log(np.array([[0.5, 0.3, 0.2], [0.6, 0.3, 0.1]]))
    return Candidates(tokens, logp, LAT.copy(), LON.copy(), np.full((2, 3, 4), 0.9))


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append((self.path, dict(self.headers), body))
        behaviour = body["model"]
        text = body["messages"][1]["content"][0]["text"]
        second = "(51.5074, -0.1278)" in text  # the first image's second candidate is listed
        answer = (
            {"latitude": 51.5074, "longitude": -0.1278}
            if second
            else {"latitude": -33.8688, "longitude": 151.2093}
        )
        if behaviour == "error500":
            return self.reply(500, {"error": "boom"})
        if behaviour == "flaky":
            with self.server.lock:
                self.server.count += 1
                n = self.server.count
            if n <= 2:
                return self.reply(503, {"error": "busy"})
        if behaviour == "slow":
            time.sleep(1.0)
        content = json.dumps(answer)
        if behaviour == "fence":
            content = "Sure! ```json\n" + content + "\n```"
        elif behaviour == "garbage":
            content = "I think it is Paris."
        elif behaviour == "outofrange":
            content = '{"latitude": 123.0, "longitude": 10}'
        elif behaviour == "free":
            content = '{"latitude": 10.5, "longitude": -20.25}'
        self.reply(200, {"choices": [{"message": {"role": "assistant", "content": content}}]})

    def reply(self, status, obj):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client timed out first (the "slow" case)


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.requests, srv.count, srv.lock = [], 0, threading.Lock()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv, f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    srv.server_close()


IMAGES = [Image.new("RGB", (1200, 800), (10, 120, 30)), Image.new("RGB", (64, 64), (200, 200, 255))]


def cfg(url, model, **kw):
    kw.setdefault("concurrency", 2)
    return MLLMConfig(base_url=url, model=model, backoff_s=0.01, **kw)


def test_pool_selection_picks_the_answered_candidate(server):
    srv, url = server
    sel = select_mllm(make_pool(), IMAGES, cfg(url, "good"))
    assert sel.index.tolist() == [1, 1]
    np.testing.assert_allclose(sel.lat, [51.5074, -33.8688])
    assert sel.notes == ["", ""]
    # the chosen candidate ranks first, the others follow by log-probability
    assert np.argsort(-sel.scores[0]).tolist() == [1, 0, 2]
    path, headers, body = srv.requests[0]
    assert path == "/v1/chat/completions"
    image_part = body["messages"][1]["content"][1]
    assert image_part["image_url"]["url"].startswith("data:image/jpeg;base64,")


def test_json_fence_is_accepted(server):
    _, url = server
    assert select_mllm(make_pool(), IMAGES, cfg(url, "fence")).index.tolist() == [1, 1]


@pytest.mark.parametrize(
    "behaviour,reason", [("garbage", "not JSON"), ("outofrange", "out of range"), ("error500", "HTTP 500")]
)
def test_failures_fall_back_to_logp_with_reason(server, behaviour, reason):
    srv, url = server
    sel = select_mllm(make_pool(), IMAGES, cfg(url, behaviour, retries=1))
    assert sel.index.tolist() == [0, 0]
    assert all(reason in note and "fell back to logp" in note for note in sel.notes)
    if behaviour == "error500":
        assert len(srv.requests) == 4  # 2 images x (1 try + 1 retry)
        assert all(f"from {url} (error500), 2 attempts" in note for note in sel.notes)  # which endpoint


def test_a_server_asking_to_wait_is_waited_for():
    from types import SimpleNamespace

    from geotoken.search.mllm import retry_after

    def answer(**headers):
        return SimpleNamespace(response=SimpleNamespace(headers=headers))

    assert retry_after(answer(**{"retry-after": "3"})) == 3.0
    assert retry_after(answer(**{"retry-after": "9999"})) == 60.0  # at most a minute
    assert retry_after(answer(**{"retry-after": "Wed, 21 Oct 2026 07:28:00 GMT"})) is None
    assert retry_after(answer()) is None and retry_after(ValueError("no response")) is None


def test_retries_recover_from_busy_server(server):
    srv, url = server
    sel = select_mllm(make_pool(), IMAGES, cfg(url, "flaky", retries=3, concurrency=1))
    assert sel.index.tolist() == [1, 1]
    assert len(srv.requests) == 4


def test_timeout_falls_back(server):
    _, url = server
    sel = select_mllm(make_pool(), IMAGES, cfg(url, "slow", timeout_s=0.2, retries=0))
    assert sel.index.tolist() == [0, 0]
    assert all("timeout" in n for n in sel.notes)


def test_pool_mode_rejects_answer_outside_pool_free_mode_keeps_it(server):
    srv, url = server
    sel = select_mllm(make_pool(), IMAGES, cfg(url, "free", strict=True))
    assert sel.index.tolist() == [0, 0] and "not a candidate" in sel.notes[0]
    # not strict (the paper's prompt asks for its own guess when no candidate fits): the answer is kept
    sel = select_mllm(make_pool(), IMAGES, cfg(url, "free"))
    assert sel.index.tolist() == [-1, -1] and "its own guess" in sel.notes[0]
    np.testing.assert_allclose(np.c_[sel.lat, sel.lon], [[10.5, -20.25]] * 2)
    nbrs = np.array([[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]]])
    sel = select_mllm(
        make_pool(), IMAGES, cfg(url, "free", mode="free", template="geotoken"), neighbours_latlon=nbrs
    )
    assert sel.index.tolist() == [-1, -1]
    np.testing.assert_allclose(np.c_[sel.lat, sel.lon], [[10.5, -20.25]] * 2)
    assert "(3.0000, 4.0000)" in srv.requests[-1][2]["messages"][1]["content"][0]["text"]


def test_config_from_environment(server, monkeypatch):
    srv, url = server
    monkeypatch.setenv("GEOTOKEN_MLLM_BASE_URL", url)
    monkeypatch.setenv("GEOTOKEN_MLLM_MODEL", "good")
    monkeypatch.setenv("GEOTOKEN_MLLM_API_KEY", "secret-key")
    select_mllm(make_pool(), IMAGES)
    headers = {k.lower(): v for k, v in srv.requests[0][1].items()}
    assert headers["authorization"] == "Bearer secret-key"
    monkeypatch.delenv("GEOTOKEN_MLLM_MODEL")
    with pytest.raises(GeoTokenError, match="GEOTOKEN_MLLM_MODEL"):
        select_mllm(make_pool(), IMAGES)


@pytest.mark.parametrize(
    "text,expected",
    [
        ('{"latitude": 1.5, "longitude": -2}', (1.5, -2.0)),
        ('```json\n{"latitude": -90, "longitude": 180}\n```', (-90.0, 180.0)),
        ('```\n{"latitude": 0, "longitude": 0}```', (0.0, 0.0)),
        ('I think {"latitude": 48.8566, "longitude": 2.3522}.', (48.8566, 2.3522)),  # prose around it
    ],
)
def test_parse_answer_good(text, expected):
    assert parse_answer(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Paris",
        "[1, 2]",
        '{"latitude": "1", "longitude": 2}',
        '{"latitude": true, "longitude": 2}',
        '{"latitude": 91, "longitude": 2}',
        '{"latitude": 1}',
        '{"latitude": NaN, "longitude": 2}',
    ],
)
def test_parse_answer_bad(text):
    with pytest.raises(ValueError):
        parse_answer(text)


def test_the_geotoken_prompt_shows_the_models_share_among_the_candidates(server):
    """The whole sequence's probability of an 11-token cell is ~e^-23: every candidate read p=0.000."""
    from geotoken.search.mllm import shares

    srv, url = server
    pool = make_pool()
    pool.logp[:] = pool.logp - 23.0  # long sequences: tiny probabilities, the same preferences
    select_mllm(pool, IMAGES, cfg(url, "good", template="geotoken"))
    text = srv.requests[0][2]["messages"][1]["content"][0]["text"]
    assert "p=0.000" not in text and ("p=0.500" in text or "p=0.600" in text)
    np.testing.assert_allclose(shares(np.array([-1.0, -np.inf, -1.0])), [0.5, 0.0, 0.5])


def test_mllm_options_are_replaced_by_name_and_checked():
    cfg = MLLMConfig(base_url="http://x/v1", model="m")
    assert cfg.replace(match_km=5.0, timeout_s=2.0).resolved().match_km == 5.0
    with pytest.raises(GeoTokenError, match=r"unknown MLLM option\(s\) \['match'\]; known: .*match_km"):
        cfg.replace(match=5)
    for name, bad in (
        ("timeout_s", 0.0),
        ("timeout_s", float("inf")),
        ("match_km", -1.0),
        ("match_km", float("nan")),
    ):
        with pytest.raises(GeoTokenError, match=f"MLLM {name} must be"):
            cfg.replace(**{name: bad}).resolved()


def test_mllm_flags_refuse_what_the_client_cannot_take(capsys):
    from geotoken.cli import main

    for flag, value, said in (("--mllm-timeout-s", "inf", "must be a finite number > 0"),
                              ("--mllm-concurrency", "0", "must be >= 1")):  # fmt: skip
        with pytest.raises(SystemExit):
            main(["predict", "x.jpg", "--model", "m", flag, value])
        assert said in capsys.readouterr().err

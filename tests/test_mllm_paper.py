"""The authors' MLLM step: greedy+sample pools, the paper's two prompts, the MLLM's temperature, through the
`openai` client against a loopback server (in process) that checks every request body."""

import base64
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("openai")

from geotoken.errors import GeoTokenError  # noqa: E402
from geotoken.search import STRATEGIES  # noqa: E402
from geotoken.search.candidates import Candidates  # noqa: E402
from geotoken.search.decode import generate  # noqa: E402
from geotoken.search.mllm import PAPER_PROMPTS, MLLMConfig, select_mllm, shown_candidates  # noqa: E402
from geotoken.search.options import SearchOptions  # noqa: E402

torch.set_num_threads(1)

LAT = np.array([[48.8566, 51.5074, 40.7128, 51.5074], [35.6762, -33.8688, 55.7558, 35.6762]])
LON = np.array([[2.3522, -0.1278, -74.0060, -0.1278], [139.6503, 151.2093, 37.6173, 139.6503]])


def make_pool():
    """Two images; candidate 0 is the greedy answer, though not the most likely by logp in image 0; the last
    candidate repeats an earlier one (samples often do)."""
    tokens = np.arange(2 * 4 * 3).reshape(2, 4, 3)
    tokens[0, 3], tokens[1, 3] = tokens[0, 1], tokens[1, 0]
    logp = np.log(np.array([[0.3, 0.4, 0.2, 0.4], [0.6, 0.3, 0.1, 0.6]]))
    return Candidates(tokens, logp, LAT.copy(), LON.copy(), np.full((2, 4, 3), 0.9))


class Handler(BaseHTTPRequestHandler):
    """Checks what a chat-completions request must hold, records it, answers per `answers` (by model)."""

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        problems = []
        if self.path != "/v1/chat/completions":
            problems.append(f"path {self.path}")
        if not isinstance(body.get("model"), str) or not isinstance(body.get("temperature"), int | float):
            problems.append("model / temperature")
        system, user = body["messages"]
        text, image = user["content"][0]["text"], user["content"][1]["image_url"]["url"]
        if (
            system["role"] != "system"
            or user["role"] != "user"
            or not image.startswith("data:image/jpeg;base64,")
        ):
            problems.append("messages")
        Image.open(io.BytesIO(base64.b64decode(image.split(",", 1)[1]))).verify()  # a real JPEG
        self.server.requests.append({"body": body, "text": text, "headers": dict(self.headers)})
        if problems:
            return self.reply(400, {"error": {"message": "; ".join(problems)}})
        content = self.server.answers(body["model"], text)
        self.reply(200, {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": content}}]})  # fmt: skip

    def reply(self, status, obj):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def answer(model, text):
    """'second': the first other guess listed; 'own': a coordinate that is no candidate."""
    if model == "own":
        return '{"latitude": 10.5, "longitude": -20.25}'
    line = text.split("Its other guesses:\n")[1].split("\n")[0]  # "- (lat, lon)"
    lat, lon = (float(x) for x in line.removeprefix("- (").removesuffix(")").split(","))
    return json.dumps({"latitude": lat, "longitude": lon})


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.requests, srv.answers = [], answer
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv, f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    srv.server_close()


IMAGES = [Image.new("RGB", (900, 600), (10, 120, 30)), Image.new("RGB", (64, 64), (200, 200, 255))]


def cfg(url, model="second", **kw):
    return MLLMConfig(base_url=url, model=model, backoff_s=0.01, concurrency=2, **kw)


def test_paper_pool_prompt_lists_best_guess_then_other_guesses(server):
    srv, url = server
    sel = select_mllm(make_pool(), IMAGES, cfg(url), best_index=0)
    requests = sorted(srv.requests, key=lambda r: "48.8566" not in r["text"])  # image 0 first
    body, text = requests[0]["body"], requests[0]["text"]
    assert body["model"] == "second" and body["temperature"] == 0.7  # the paper templates' default
    assert "Its best guess (latitude, longitude): (48.8566, 2.3522)" in text  # the greedy answer
    others = text.split("Its other guesses:\n")[1]
    # the other distinct guesses by log-probability; the repeat is listed once
    assert others.startswith("- (51.5074, -0.1278)\n- (40.7128, -74.0060)\n")
    assert others.count("51.5074") == 1
    assert "If none of them seems correct, give your own best guess" in text
    assert '{"latitude": <float>, "longitude": <float>}' in text
    # image 1: the greedy answer is also the most likely; its repeat (candidate 3) is not listed again
    assert "Its best guess (latitude, longitude): (35.6762, 139.6503)" in requests[1]["text"]
    assert requests[1]["text"].count("35.6762") == 1
    assert sel.index.tolist() == [1, 1] and sel.notes == ["", ""]
    # without best_index the most likely candidate is the best guess
    srv.requests.clear()
    select_mllm(make_pool(), IMAGES[:1] * 2, cfg(url))
    texts = [r["text"] for r in srv.requests]  # two requests in flight at once: either may arrive first
    assert any("best guess (latitude, longitude): (51.5074, -0.1278)" in t for t in texts)


def test_paper_free_prompt_and_own_guesses(server):
    srv, url = server
    sel = select_mllm(make_pool(), IMAGES, cfg(url, "own", mode="free", temperature=0.2), best_index=0)
    text = srv.requests[0]["text"]
    assert "You may answer any coordinate" in text and "Its other guesses" in text
    assert srv.requests[0]["body"]["temperature"] == 0.2
    assert sel.index.tolist() == [-1, -1]
    np.testing.assert_allclose(np.c_[sel.lat, sel.lon], [[10.5, -20.25]] * 2)
    # pool mode: an answer that is none of the candidates is the MLLM's own guess, unless strict
    sel = select_mllm(make_pool(), IMAGES, cfg(url, "own"))
    assert sel.index.tolist() == [-1, -1] and "its own guess" in sel.notes[1]
    sel = select_mllm(make_pool(), IMAGES, cfg(url, "own", strict=True))
    assert sel.index.tolist() == [1, 0] and "fell back to logp" in sel.notes[0]


def test_geotoken_template_and_temperature_defaults(server):
    srv, url = server
    select_mllm(make_pool(), IMAGES[:1] * 2, cfg(url, "own", template="geotoken"))
    assert srv.requests[0]["body"]["temperature"] == 0.0
    assert "p=0." in srv.requests[0]["text"] and "best guess" not in srv.requests[0]["text"]
    assert set(PAPER_PROMPTS) == {"pool", "free"}
    with pytest.raises(GeoTokenError, match="template"):
        MLLMConfig(base_url=url, model="m", template="gemini").resolved()
    assert MLLMConfig(base_url=url, model="m").resolved().temperature == 0.7
    assert SearchOptions.from_dict(SearchOptions().to_dict()).mllm.template == "paper"


def test_shown_candidates_put_the_best_index_first():
    pool = make_pool()
    shown = shown_candidates(pool, best_index=0)
    assert [s.tolist() for s in shown] == [[0, 1, 2], [0, 1, 2]]
    assert [s.tolist() for s in shown_candidates(pool)] == [[1, 0, 2], [0, 1, 2]]
    assert [s.tolist() for s in shown_candidates(pool, max_candidates=2, best_index=2)] == [[2, 1], [2, 0]]


def test_greedy_sample_pool_is_the_greedy_answer_then_the_samples(tiny_model):
    from geotoken.model import Batch

    assert "greedy+sample" in STRATEGIES
    model = tiny_model({"visual": 8}, k=0, head_std=0.6, dropout=0.0, level=6, group=2)
    batch = Batch({"visual": torch.randn(3, 8, generator=torch.Generator().manual_seed(0))}, {}, None)
    pool, _ = generate(model, batch, "greedy+sample", num_samples=5, temperature=0.7, seed=4)
    greedy, _ = generate(model, batch, "greedy")
    samples, _ = generate(model, batch, "sample", num_samples=5, temperature=0.7, seed=4)
    assert pool.shape == (3, 6)
    np.testing.assert_array_equal(pool.tokens[:, :1], greedy.tokens)
    np.testing.assert_array_equal(pool.tokens[:, 1:], samples.tokens)
    np.testing.assert_allclose(pool.logp_scaled[:, 1:], samples.logp_scaled)


def test_geolocator_greedy_sample_mllm_names_the_greedy_answer(server, random_bundle):
    from geotoken.predict import Geolocator

    srv, url = server
    geo = Geolocator.from_bundle(random_bundle())
    geo.options = geo.options.replace(mllm=cfg(url))
    [pred] = geo.predict(
        [IMAGES[1]], strategy="greedy+sample", select="mllm", num_samples=6, temperature="paper"
    )
    assert pred.select == "mllm" and pred.note == ""
    [greedy] = geo.predict([IMAGES[1]], strategy="greedy", top_k=1)
    c = greedy.candidates[0]
    assert f"Its best guess (latitude, longitude): ({c.lat:.4f}, {c.lon:.4f})" in srv.requests[0]["text"]
    first_other = srv.requests[0]["text"].split("Its other guesses:\n- (")[1].split(")")[0]
    assert f"{pred.lat:.4f}, {pred.lon:.4f}" == first_other  # the server picked it, the pool's cell came back


def test_mllm_options_may_be_given_as_a_mapping():
    """SearchOptions(mllm={...}) as JSON / YAML give it (it was refused: "must be MLLMConfig")."""
    from geotoken.errors import GeoTokenError
    from geotoken.search.mllm import MLLMConfig

    options = SearchOptions(select="mllm", mllm={"mode": "free", "timeout_s": 5.0})
    assert options.mllm == MLLMConfig(mode="free", timeout_s=5.0)
    with pytest.raises(GeoTokenError, match=r"unknown MLLM option\(s\) \['timeout'\]"):
        SearchOptions(mllm={"timeout": 5})

"""`geotoken serve`: the `constrain` request field (gallery-constrained or free decoding) and the page's box."""

import numpy as np
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from geotoken.predict import Geolocator  # noqa: E402
from geotoken.s2 import latlon_to_tokens  # noqa: E402
from geotoken.serve import ServeConfig, create_app  # noqa: E402
from helpers import png_bytes  # noqa: E402


class Recording:
    """The real geolocator, with every predict call's options recorded."""

    def __init__(self, geo):
        self.geo, self.calls = geo, []

    def predict(self, images, **options):
        self.calls.append(options)
        return self.geo.predict(images, **options)

    def info(self):
        return self.geo.info()


@pytest.fixture(scope="module")
def served(random_bundle):
    import torch

    torch.set_num_threads(1)
    geo = Geolocator.from_bundle(random_bundle(gallery_rows=64, k=5, image_size=32))
    rec = Recording(geo)
    return geo, rec, TestClient(create_app(rec, ServeConfig(basemap_width=256)))


def post(client, query: str = "", **fields):
    return client.post(
        f"/v1/geolocate{query}", files={"image": ("a.png", png_bytes(), "image/png")}, data=fields
    )


def in_gallery(geo, body) -> np.ndarray:
    lat = np.array([c["lat"] for c in body["candidates"]])
    lon = np.array([c["lon"] for c in body["candidates"]])
    cfg = geo.model.cfg
    return geo.constraint.contains(latlon_to_tokens(lat, lon, cfg.level, cfg.group))


def test_constrain_field_reaches_the_search(served):
    geo, rec, client = served
    free = post(client, strategy="beam", top_k="5", constrain="false")
    assert free.status_code == 200, free.text
    assert rec.calls[-1]["constrain"] is False
    held = post(client, strategy="beam", top_k="5", constrain="true")
    assert held.status_code == 200 and rec.calls[-1]["constrain"] is True
    assert in_gallery(geo, held.json()).all()  # every answer a gallery photo's cell
    assert not in_gallery(geo, free.json()).all()  # an untrained model decoding freely leaves them
    # not given, or "null": the bundle's default (constrained), not passed on
    for fields in ({}, {"constrain": "null"}, {"constrain": ""}):
        r = post(client, strategy="beam", top_k="5", **fields)
        assert r.status_code == 200 and "constrain" not in rec.calls[-1]
        assert [c["cell"] for c in r.json()["candidates"]] == [c["cell"] for c in held.json()["candidates"]]
    # the query string works as for the other fields
    assert post(client, "?constrain=false&strategy=beam").status_code == 200
    assert rec.calls[-1]["constrain"] is False


def test_bad_constrain_is_422_and_the_schema_lists_it(served):
    _, _, client = served
    r = post(client, constrain="maybe")
    assert r.status_code == 422 and "constrain" in r.json()["error"]
    schema = client.get("/openapi.json").json()["components"]["schemas"]["Body_geolocate_v1_geolocate_post"]
    prop = schema["properties"]["constrain"]
    assert {"type": "boolean"} in prop["anyOf"] and {"type": "null"} in prop["anyOf"]
    assert client.get("/v1/model").json()["model"]["search"]["constrain"] is True  # the page's default


def test_a_model_without_gallery_decoding_refuses_constrain(served):
    geo, _, _ = served

    class NoSearch(Recording):
        def info(self):
            return {"name": "geoclip", "strategies": ["greedy"], "selectors": ["logp"]}

    client = TestClient(create_app(NoSearch(geo), ServeConfig(basemap_width=256)))
    r = post(client, constrain="true")
    assert r.status_code == 422 and "no gallery decoding" in r.json()["error"]


def test_the_page_has_the_constrain_box():
    from geotoken.serve.app import STATIC_DIR

    page = (STATIC_DIR / "index.html").read_text()
    script = (STATIC_DIR / "app.js").read_text()
    assert '<input id="constrain" type="checkbox"' in page
    assert 'form.append("constrain"' in script and "search.constrain" in script

"""End to end in a real browser: `geotoken serve`'s page in headless Chromium (Debian `chromium` + Playwright).

Starts the server on a free loopback port around a real (untrained) bundle, uploads a photo through the
page's file input, and checks that the candidates are listed and drawn on the map.
"""

import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from helpers import free_port, speckle_image

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists() and shutil.which("chromium") is None,
        reason="Debian chromium is not installed (apt-get install -y chromium; .ci/run does it)",
    ),
]


@pytest.fixture(scope="module")
def server(random_bundle):
    """uvicorn in a thread on 127.0.0.1:<free port>; yields the base URL."""
    import uvicorn

    from geotoken.predict import Geolocator
    from geotoken.serve import ServeConfig, create_app

    bundle = random_bundle(gallery_rows=64, k=5, image_size=32)
    app = create_app(Geolocator.from_bundle(bundle), ServeConfig(basemap_width=1024))
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.started, "server did not start"
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


def test_upload_shows_candidates_on_the_map(server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    photo = tmp_path / "photo.jpg"
    speckle_image((120, 80), 60).save(photo)
    external = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM if CHROMIUM.exists() else shutil.which("chromium")), args=ARGS
        )
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            page.on(
                "request",
                lambda r: (
                    external.append(r.url) if not r.url.startswith((server, "data:", "blob:")) else None
                ),
            )
            basemap = []
            page.on(
                "response", lambda r: basemap.append(r.status) if r.url.endswith("/basemap.jpg") else None
            )
            page.goto(server + "/")
            page.select_option("#strategy", "greedy")
            page.fill("#top_k", "3")
            page.locator("#top_k").blur()  # its change event now, before a photo: not a second request later
            page.set_input_files("#file", str(photo))
            page.wait_for_selector("#map[data-state]", timeout=60_000)
            assert page.get_attribute("#map", "data-state") == "done", page.inner_text("#status")
            n = page.locator("#candidates li").count()
            assert 1 <= n <= 3
            assert page.locator("#markers circle.marker").count() == n
            assert page.locator("#markers circle.best").count() == 1
            assert page.locator("#cells polygon").count() == n
            # the markers sit where the API put them: data-lat/lon -> x = lon + 180, y = 90 - lat
            m = page.locator("#markers circle.best")
            lat, lon = float(m.get_attribute("data-lat")), float(m.get_attribute("data-lon"))
            assert abs(float(m.get_attribute("cx")) - (lon + 180)) < 1e-6
            assert abs(float(m.get_attribute("cy")) - (90 - lat)) < 1e-6
            assert page.locator("#photo").is_visible()
            assert "%" in page.inner_text("#candidates li >> nth=0")
            # zoom and pan change the view box
            before = page.get_attribute("#map", "viewBox")
            page.click("#zoom-in")
            assert page.get_attribute("#map", "viewBox") != before
            # a click on a candidate zooms onto its S2 cell: the outline becomes a visible shape
            page.click("#candidates li >> nth=0")
            box = page.locator("#cells polygon >> nth=0").bounding_box()
            assert box is not None and box["width"] > 10 and box["height"] > 10
            assert basemap == [200]
            page.screenshot(path=str(tmp_path / "page.png"))
            if os.environ.get("GEOTOKEN_SCREENSHOT"):  # to look at the page yourself
                page.screenshot(path=os.environ["GEOTOKEN_SCREENSHOT"])
        finally:
            browser.close()
    assert external == []  # nothing outside the server: no CDN
    assert (tmp_path / "page.png").stat().st_size > 10_000


def test_an_error_clears_the_last_answer_a_photo_can_be_retried_and_candidates_take_the_keyboard(
    server, tmp_path
):
    sync_api = pytest.importorskip("playwright.sync_api")
    photo, bad = tmp_path / "photo.jpg", tmp_path / "notimage.jpg"
    speckle_image((120, 80), 60).save(photo)
    bad.write_text("this is not a jpeg")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM if CHROMIUM.exists() else shutil.which("chromium")), args=ARGS
        )
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            posts = []
            page.on("request", lambda r: posts.append(r.url) if r.url.endswith("/v1/geolocate") else None)
            page.goto(server + "/")
            page.set_input_files("#file", str(photo))
            page.wait_for_function("document.querySelector('#map').dataset.state === 'done'", timeout=60_000)
            assert page.locator("#candidates li").count() >= 1
            # keyboard: a candidate takes focus and Enter zooms onto it
            before = page.get_attribute("#map", "viewBox")
            page.focus("#candidates li >> nth=0")
            page.keyboard.press("Enter")
            assert page.get_attribute("#map", "viewBox") != before
            # a bad file: its error, and none of the last photo's candidates or markers under it
            page.set_input_files("#file", str(bad))
            page.wait_for_function("document.querySelector('#map').dataset.state === 'error'", timeout=60_000)
            assert "not an image" in page.inner_text("#status")
            assert (
                page.locator("#candidates li").count() == 0 and page.locator("#markers circle").count() == 0
            )
            # the same photo picked twice is asked twice (a retry), and an option change asks again
            page.set_input_files("#file", str(photo))
            page.wait_for_function("document.querySelector('#map').dataset.state === 'done'", timeout=60_000)
            page.set_input_files("#file", str(photo))
            page.wait_for_timeout(300)
            page.select_option("#strategy", "greedy")
            page.wait_for_function(
                "document.querySelector('#status').textContent.includes('greedy')", timeout=60_000
            )
            assert len(posts) == 5, posts
            assert page.locator("#file").is_enabled() and page.get_attribute("#file", "aria-label")
        finally:
            browser.close()

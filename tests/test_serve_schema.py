"""`geotoken serve` against its own OpenAPI schema: property-based requests (Schemathesis, in process).

Two properties, each over every operation of /openapi.json:
- any generated request, schema-valid or not (random bytes as the image included): no server error,
  every status code is one the schema lists, and every response matches its declared body and headers;
- every schema-valid request that carries a real photo is accepted (2xx): the schema promises nothing
  the server then refuses (e.g. `top_k` sent as "null", an option the loaded model cannot run).
The app runs in process over ASGI: no network. Examples are bounded and derandomized (a fixed seed).
"""

import io

import pytest
from PIL import Image

pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import positive_data_acceptance  # noqa: E402

from geotoken.predict import Geolocator  # noqa: E402
from geotoken.serve import ServeConfig, create_app  # noqa: E402
from helpers import encode  # noqa: E402

EXAMPLES = 40  # per operation and property


def photos() -> list[bytes]:
    """Real images of the kinds users send, odd ones included (1 px, a strip, palette, CMYK, 16-bit)."""
    noise = Image.effect_noise((96, 64), 60)
    rgb = Image.merge("RGB", (noise, noise.rotate(90, expand=False), noise.transpose(0)))
    frames = [Image.new("P", (20, 20), i) for i in (1, 50)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:])
    return [
        encode(rgb, "JPEG", quality=90),
        encode(rgb, "PNG"),
        encode(rgb.convert("RGBA"), "PNG"),
        encode(rgb.convert("L"), "PNG"),
        encode(rgb.convert("CMYK"), "JPEG"),
        encode(Image.new("I;16", (40, 30), 40000), "PNG"),
        encode(rgb.convert("P"), "BMP"),
        encode(rgb, "TIFF"),
        encode(rgb, "WEBP"),
        encode(Image.new("RGB", (1, 1), (255, 0, 0)), "PNG"),
        encode(Image.new("RGB", (2000, 1), (0, 0, 255)), "PNG"),
        gif.getvalue(),
    ]


PHOTOS = photos()
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module")
def app(random_bundle):
    """A real bundle (random weights, 64 gallery rows) whose backbone reads 32 px images: fast on a CPU."""
    import torch

    torch.set_num_threads(1)
    config = ServeConfig(max_upload_mb=1, max_pixels=4_000_000, basemap_width=256)
    return create_app(Geolocator.from_bundle(random_bundle(gallery_rows=64, k=5, image_size=32)), config)


@pytest.fixture(scope="module")
def operations(app) -> dict:
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    ops = {op.label: op for op in (result.ok() for result in schema.get_all_operations())}
    assert set(ops) == {"GET /healthz", "GET /v1/model", "POST /v1/geolocate"}
    return ops


@pytest.mark.slow
def test_no_server_error_and_every_response_as_declared(operations):
    for op in operations.values():
        cases = st.one_of(op.as_strategy(GenerationMode.POSITIVE), op.as_strategy(GenerationMode.NEGATIVE))

        @SETTINGS
        @given(case=cases)
        def check(case):
            # random bytes are schema-valid as an image but no photo: 415 / 422 is the right answer there
            case.call_and_validate(excluded_checks=[positive_data_acceptance])

        check()


@pytest.mark.slow
def test_every_schema_valid_request_with_a_photo_is_accepted(operations):
    for op in operations.values():

        @SETTINGS
        @given(case=op.as_strategy(GenerationMode.POSITIVE), photo=st.sampled_from(PHOTOS))
        def check(case, photo):
            if isinstance(case.body, dict) and "image" in case.body:
                case.body["image"] = photo
            response = case.call_and_validate()  # all checks, positive_data_acceptance included
            assert response.status_code < 300, response.text

        check()

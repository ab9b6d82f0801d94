"""The HTTP API and web page around a loaded `Geolocator`.

    app = create_app(Geolocator.from_bundle("runs/demo/bundle"), ServeConfig(max_queue_wait_s=5))
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes:
    POST /v1/geolocate   multipart `image` (+ form or query fields top_k, strategy, select, constrain) -> JSON
    GET  /v1/model       what is loaded, and the server's limits
    GET  /healthz        liveness
    GET  /               the page (package static files; nothing from a CDN)
    GET  /basemap.jpg    the Blue Marble image at a reduced size (equirectangular, made once)
    GET  /docs           the API's reference, rendered here from /openapi.json (no CDN script: works offline)
    GET  /openapi.json   FastAPI's schema

The model runs on one worker thread fed by a queue (PyTorch modules are not safe to call concurrently,
and on a CPU a second concurrent forward pass only competes for the same cores); requests that wait at
the same time are predicted together as one batch (micro-batching). Admission is on a wait budget
(`max_queue_wait_s`, `geotoken serve --max-queue-wait-s`): a request is admitted while its expected wait
in the queue, from the measured seconds per image of recent batches and the images already queued, fits
the budget; beyond it, 503 with Retry-After (integer seconds, from the same estimate), checked before the
upload is even decoded (see `geotoken.serve.runner`). On shutdown the server takes nothing new and
answers every request it admitted. Uploads are checked before any pixel is decoded: body size
(413), image header dimensions against `max_pixels` (413, decompression bombs), then a full decode
(non-images 415, truncated or corrupt files 422). The client sends bytes only: no path it names is
ever opened. The OpenAPI schema offers only the strategies and selectors the loaded model can run
(no `reward` without a reward scorer, no `mllm` without an endpoint); multipart has no null, so a form
field sent as "null" or "" counts as not given.
"""

import asyncio
import html
import io
import json
import logging
import math
import os
import threading
import time
import uuid
import warnings
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Literal

from PIL import Image, UnidentifiedImageError

from geotoken import __version__, assets
from geotoken.data.images import HEIC_HINT, heif_support, is_heif, to_rgb
from geotoken.errors import GeoTokenError
from geotoken.io import is_whole
from geotoken.photos import photo_gps
from geotoken.prediction import MAX_TOP_K
from geotoken.search import SELECTORS, STRATEGIES
from geotoken.search.mllm import MLLMConfig
from geotoken.serve.runner import Busy, Predictor, Runner, ServiceRate

STATIC_DIR = Path(__file__).parent / "static"
DECODE_SLOTS = max(2, min(8, os.cpu_count() or 2))  # uploads decoded at the same time
log = logging.getLogger(__name__)


@dataclass
class ServeConfig:
    max_upload_mb: float = 10.0  # request body limit (413 above it)
    max_pixels: int = 40_000_000  # width x height limit, read from the header before decoding (413)
    max_queue_wait_s: float = 10.0  # admit while the expected wait in the queue fits; beyond, 503
    max_top_k: int = 20
    max_batch: int = 8  # images predicted together when requests wait at the same time
    max_queued_pixels: int = 400_000_000  # decoded photos waiting (~1.2 GB as RGB); beyond, 503
    basemap_width: int = 2048  # width of the served Blue Marble image (height = width / 2)

    def __post_init__(self) -> None:
        for name in (
            "max_upload_mb",
            "max_pixels",
            "max_queue_wait_s",
            "max_top_k",
            "max_batch",
            "max_queued_pixels",
            "basemap_width",
        ):
            if not 0 < getattr(self, name) < math.inf:
                raise GeoTokenError(
                    f"serve option {name} must be a finite number > 0, got {getattr(self, name)!r}"
                )
        if not is_whole(self.max_top_k, 1, MAX_TOP_K):
            raise GeoTokenError(f"serve option max_top_k must be a whole number in 1..{MAX_TOP_K}")

    def runner(self, predictor: Predictor, rate: ServiceRate | None = None) -> Runner:
        """The model thread these limits describe."""
        return Runner(predictor, self.max_queue_wait_s, self.max_batch, max_queued_pixels=self.max_queued_pixels,
                      rate=rate)  # fmt: skip

    @property
    def shutdown_grace_s(self) -> float:
        """How long a shutdown waits for admitted requests: the wait budget, and time to send the answers."""
        return self.max_queue_wait_s + SHUTDOWN_GRACE_S

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


SHUTDOWN_GRACE_S = 30.0  # beyond the wait budget, for the last answers to be sent


def public_info(info: dict) -> dict:
    """`predictor.info()` as clients see it (/v1/model): folders by their names, no MLLM endpoint. Where the
    server keeps its files, and which internal endpoint it calls, are not the clients' business."""
    info = json.loads(json.dumps(info))  # a copy
    if info.get("bundle"):
        info["bundle"] = Path(info["bundle"]).name
    backbone = info.get("backbone") or {}
    if isinstance(backbone.get("clip"), str) and Path(backbone["clip"]).is_absolute():  # a local CLIP folder
        backbone["clip"] = Path(backbone["clip"]).name
    mllm = (info.get("search") or {}).get("mllm") or {}
    mllm.pop("base_url", None)
    return info


class BadImage(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


# Raster formats PIL decodes itself. Not EPS / PS / PDF: PIL hands those to Ghostscript, and a server
# must not run an external interpreter on a client's bytes.
UPLOAD_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF", "PPM", "TGA", "ICO", "JPEG2000")


def decode_upload(data: bytes, name: str, max_pixels: int):
    """Bytes -> RGB PIL image; the header's size is checked before any pixel is decoded."""
    if not data:
        raise BadImage(422, f"upload {name!r} is empty")
    formats = UPLOAD_FORMATS
    if is_heif(data):  # iPhones' photos: with the heic extra (pillow-heif) only
        if not heif_support():
            raise BadImage(
                415, f"upload {name!r} is a HEIC/HEIF photo; this server cannot read it ({HEIC_HINT})"
            )
        formats += ("HEIF",)
    try:  # reads the header only; PIL itself refuses > 2 x Image.MAX_IMAGE_PIXELS here
        with warnings.catch_warnings():  # its warning above 1x: the size is checked against ours below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=formats)
    except Image.DecompressionBombError:  # (PIL's own limit, far above ours: say ours)
        raise BadImage(413, f"upload {name!r} has more pixels than the limit of {max_pixels}") from None
    except UnidentifiedImageError:
        raise BadImage(415, f"upload {name!r} is not an image in {', '.join(formats)}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImage(415, f"upload {name!r} is not a readable image ({exc})") from None
    w, h = im.size
    if w * h > max_pixels:
        raise BadImage(413, f"upload {name!r} is {w}x{h} = {w * h} pixels; the limit is {max_pixels}")
    try:
        im.load()  # the full decode: truncated or corrupt data fails here
        return to_rgb(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise BadImage(422, f"upload {name!r} ({im.format} {w}x{h}) cannot be decoded: {exc}") from None


class BodyLimit:
    """ASGI middleware: 413 once a request body passes `limit` bytes, declared (Content-Length) or streamed
    (chunked), before the multipart parser spools it anywhere."""

    class TooLarge(Exception):
        pass

    def __init__(self, app, limit: int, message: str):
        self.app, self.limit, self.message = app, limit, message

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers", [])).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            return await self._refuse(send)
        seen, started, refused = 0, False, False

        async def counted_receive():
            # the 413 is sent from here: whatever the app makes of the error below is dropped
            nonlocal seen, started, refused
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    if not started:
                        started = refused = True
                        await self._refuse(send)
                    raise BodyLimit.TooLarge()
            return message

        async def tracked_send(message):
            nonlocal started
            if refused:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except BodyLimit.TooLarge:
            pass

    async def _refuse(self, send):
        body = json.dumps({"error": self.message}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def decode_bounded(slots: threading.BoundedSemaphore, data: bytes, name: str, max_pixels: int):
    """`decode_upload` in one of a few slots: each decode may hold max_pixels x 3 bytes and more."""
    with slots:
        return decode_upload(data, name, max_pixels)


def json_safe(x):
    """NaN / inf -> None (JSON has no such numbers), numpy scalars -> Python numbers, recursively."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def basemap_jpeg(width: int, name: str = "bmng") -> bytes:
    """The whole-Earth image resized to width x width/2, as JPEG bytes."""
    with Image.open(assets.basemap_image(name)) as im:
        im.draft("RGB", (width, width // 2))  # JPEG: decode at a reduced scale directly
        small = im.convert("RGB").resize((width, width // 2), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    small.save(buf, "JPEG", quality=85, optimize=True)
    return buf.getvalue()


def nullish(value):
    """Multipart has no null: a form field sent as "null" or "" counts as not given."""
    return None if isinstance(value, str) and value in ("", "null") else value


def offered_options(info: dict) -> tuple[list[str], list[str]]:
    """The strategies and selectors a predictor has: those its `info()` lists (GeoCLIP: its own one each),
    else GeoToken's."""
    return list(info.get("strategies") or STRATEGIES), list(info.get("selectors") or SELECTORS)


def unavailable_options(info: dict) -> dict[str, str]:
    """{strategy or selector: why this predictor cannot run it}, from its `info()` (empty if it says
    nothing): `reward` without a reward scorer, `vote` on a model without retrieval, `mllm` without an
    endpoint (config or environment), and GeoToken's search options on a predictor whose `info()` lists its own."""
    strategies, selectors = offered_options(info)
    name = info.get("name") or "loaded"
    out = {o: f"is not an option of the {name} model" for o in (*STRATEGIES, *SELECTORS)}
    for o in (*strategies, *selectors):
        out.pop(o, None)
    if info.get("reward_scorer") is False:
        out["reward"] = "needs a reward scorer in the bundle (geotoken train-reward)"
    model = info.get("model")
    if isinstance(model, dict) and model.get("k") == 0:  # a GeoToken model without retrieval
        out["vote"] = "needs retrieved neighbours (the model reads none: k = 0)"
    mllm = (info.get("search") or {}).get("mllm")
    if isinstance(mllm, dict):
        try:
            MLLMConfig(**mllm).resolved()
        except (GeoTokenError, TypeError) as exc:  # (no endpoint, or settings it cannot run with)
            out["mllm"] = f"its MLLM settings: {exc}"
    return out


def docs_html(schema: dict) -> str:
    """The API reference as one static page from the OpenAPI schema: FastAPI's /docs and /redoc load their
    scripts from a CDN and stay blank on a machine without internet, where this server often runs."""
    parts = []
    components = schema.get("components", {}).get("schemas", {})
    for path, methods in schema.get("paths", {}).items():
        for method, op in methods.items():
            rows = [(p["name"], p.get("in", ""), p.get("description", "")) for p in op.get("parameters", [])]
            for content in (op.get("requestBody") or {}).get("content", {}).values():
                ref = content.get("schema", {}).get("$ref", "")
                body = components.get(ref.rsplit("/", 1)[-1], content.get("schema", {}))
                rows += [(n, "form", f.get("description", "")) for n, f in body.get("properties", {}).items()]
            fields = "".join(
                f"<li><code>{html.escape(n)}</code> ({w}) {html.escape(d)}</li>" for n, w, d in rows
            )
            answers = "".join(
                f"<li><code>{c}</code> {html.escape(r.get('description', ''))}</li>"
                for c, r in op.get("responses", {}).items()
            )
            parts.append(
                f"<h2><code>{method.upper()} {html.escape(path)}</code></h2><p>{html.escape(op.get('summary', ''))}</p>"
                + (f"<h3>Fields</h3><ul>{fields}</ul>" if fields else "")
                + f"<h3>Responses</h3><ul>{answers}</ul>"
            )
    title = html.escape(f"{schema['info']['title']} {schema['info']['version']}")
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{title} API</title>'
        '<link rel="stylesheet" href="/static/style.css"></head><body><header><h1>'
        f'{title} API</h1><span class="muted">{html.escape(schema["info"].get("description", ""))}</span>'
        '</header><article style="padding: 0 1.2em">'
        '<p>The machine-readable schema: <a href="/openapi.json">/openapi.json</a>. Errors are '
        '<code>{"error": "..."}</code>.</p>' + "".join(parts) + "</article></body></html>"
    )


DEFAULT_TOP_K = 5
REQUEST_FIELDS = frozenset({"image", "top_k", "strategy", "select", "constrain"})  # of POST /v1/geolocate


def api_models(max_top_k: int):
    """The pydantic models of the API's schema (built here: pydantic comes with fastapi)."""
    from pydantic import BaseModel, ConfigDict, Field

    class ErrorBody(BaseModel):
        error: str = Field(description="what was wrong, naming the field or the upload")

    class Candidate(BaseModel):
        model_config = ConfigDict(extra="allow")
        lat: float
        lon: float
        probability: float | None = Field(description="calibrated P(within probability_within_km)")
        cell: str = Field(description="S2 cell token")
        polygon: list[list[float]] = Field(description="the cell's corners, [lat, lon] x 4")
        place: dict = Field(description="nearest city, region, country")

    class UploadInfo(BaseModel):
        name: str
        width: int
        height: int
        bytes: int

    class Answer(BaseModel):
        model_config = ConfigDict(extra="allow")
        lat: float
        lon: float
        candidates: list[Candidate] = Field(max_length=max_top_k, description="best first")
        strategy: str
        select: str
        note: str = Field("", description="e.g. fewer candidates than top_k (the search found no more)")
        timings_ms: dict[str, float]
        image: UploadInfo
        exif_gps: dict[str, float] | None = Field(
            None,
            description="the photo's own EXIF GPS (lat, lon) and its distance_km to the answer, if it has one",
        )

    return ErrorBody, Answer


def create_app(
    predictor: Predictor,
    config: ServeConfig | None = None,
    runner: Runner | None = None,
    mllm_runner: Runner | None = None,
):
    """A FastAPI app serving `predictor` (already loaded: the model is loaded once, by the caller).

    `runner` (tests) replaces the model thread built from `config`, e.g. one with a fake clock. Requests
    that select with the MLLM run in a lane of their own (`mllm_runner`, the same limits): their network
    round trips, seconds each, would otherwise hold up every other request behind them and enter the
    service rate the other requests are admitted by."""

    from fastapi import FastAPI, File, Form, Query, Request, UploadFile
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
    from fastapi.staticfiles import StaticFiles
    from pydantic import BeforeValidator, Field
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    cfg = config or ServeConfig()
    runner = runner or cfg.runner(predictor)
    decode_slots = threading.BoundedSemaphore(DECODE_SLOTS)  # full-size decodes at once: bounded memory
    info = json_safe(predictor.info())  # (what the server decides by; clients see `public_info` of it)
    missing = unavailable_options(info)
    strategies, selectors = ([o for o in offered if o not in missing] for offered in offered_options(info))
    if "mllm" in selectors:  # until measured, each of its `concurrency` calls taken to last its timeout
        mllm = getattr(getattr(predictor, "options", None), "mllm", None)
        prior = ServiceRate(initial=mllm.timeout_s / max(1, mllm.concurrency)) if mllm is not None else None
        mllm_runner = mllm_runner or cfg.runner(predictor, prior)
    lanes = [runner, *([mllm_runner] if mllm_runner is not None else [])]
    default_select = (info.get("search") or {}).get("select")
    searchable = "constrain" in (info.get("search") or {})  # GeoToken's decoding options (not GeoCLIP's)
    basemap: dict[str, bytes] = {}
    basemap_lock = threading.Lock()
    ErrorBody, Answer = api_models(cfg.max_top_k)
    default_top_k = min(DEFAULT_TOP_K, cfg.max_top_k)  # a request without top_k fits any --max-top-k

    def not_available(value: str) -> str:
        return f"{value!r} is not available on this server: it {missing[value]}"

    def option_error(field: str, value, choices: list[str]) -> str | None:
        if value is None or value in choices:
            return None
        if value in missing:
            return f"field {field!r}: {not_available(value)}"
        return f"field {field!r} must be one of {choices}, got {value!r}"

    def offered(choices: list[str]):
        """An optional form field whose schema lists `choices`; refusals of the others say why."""

        def check(value):
            value = nullish(value)
            if value in missing:
                raise ValueError(not_available(value))
            return value

        return Annotated[Literal[tuple(choices)] | None, BeforeValidator(check)]

    @asynccontextmanager
    async def lifespan(app):
        for lane in lanes:
            await run_in_threadpool(lane.start)  # no-op unless a previous lifespan closed it
        yield
        for lane in lanes:  # answers every admitted request first; one stuck on a call is left (a daemon)
            await run_in_threadpool(lane.close, cfg.shutdown_grace_s)

    app = FastAPI(
        title="GeoToken",
        version=__version__,
        description="Where was this photo taken? Hierarchical S2-token geolocalization.",
        lifespan=lifespan,
        docs_url=None,  # FastAPI's pages load their scripts from a CDN: /docs is rendered here instead
        redoc_url=None,
    )
    app.state.runner, app.state.mllm_runner, app.state.config = runner, mllm_runner, cfg

    def error(status: int, message: str, headers: dict | None = None):
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    def fault(exc: Exception, what: str, said: str = ""):
        """500 for a fault of ours in `what` (logged; `said`: the answer's prefix): its details, which may name
        the server's files, go to the log under an id that the answer gives."""
        ref = uuid.uuid4().hex[:8]
        log.error("%s failed (error %s)", what, ref, exc_info=exc)
        return error(500, f"{said}internal error {ref} ({type(exc).__name__}; details in the server's log)")

    def busy(exc: Busy):
        return error(503, exc.message, {"Retry-After": str(exc.retry_after_s)})

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, exc: RequestValidationError):
        """FastAPI's own 422s in the same {"error": "..."} shape, naming the field; a photo sent as JSON or
        as a raw body (415) or as a text field is told how to send it instead of "field required"."""
        image_errors = [e for e in exc.errors() if e["loc"][-1] == "image"]
        if image_errors and request.url.path == "/v1/geolocate":
            kind = request.headers.get("content-type", "").split(";")[0].strip() or "no content type"
            if kind != "multipart/form-data":  # a body this route does not take
                return error(
                    415, f"send multipart/form-data with the photo as a file in field 'image' (got {kind})"
                )
            if image_errors[0]["type"] != "missing":  # the right body, the photo as a text field
                return error(422, "field 'image': send the photo as a file part, not as text")
        parts = [
            f"field {str(e['loc'][-1])!r}: {e['msg'].removeprefix('Value error, ')}" for e in exc.errors()
        ]
        return error(422, "; ".join(parts) or "invalid request")

    @app.exception_handler(Exception)
    async def internal_error(request, exc: Exception):
        """A fault of ours anywhere in a route: still the {"error": "..."} JSON the page and clients read; the
        details (which may name the server's files) go to the log, under an id the answer gives."""
        return fault(exc, f"{request.method} {request.url.path}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        """Starlette's own 400 / 404 / 405 answers in the same {"error": "..."} shape as ours."""
        return error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.get("/docs", include_in_schema=False)
    def docs():
        return HTMLResponse(docs_html(app.openapi()))

    def lane_state(lane: Runner) -> dict:
        return {
            "in_flight": lane.in_flight,
            "queued": lane.queued,
            "expected_wait_s": round(lane.expected_wait_s(), 3),
            "seconds_per_image": round(lane.seconds_per_image, 4),
            "served": lane.served,
            "rejected": lane.rejected,
            "batches": lane.batches,
        }

    @app.head("/healthz", include_in_schema=False)  # (load balancers' probes)
    @app.get("/healthz", summary="liveness, and the queue")
    def healthz() -> dict:
        state = {"status": "shutting down" if runner.closing else "ok", **lane_state(runner)}
        if mllm_runner is not None:  # select=mllm requests: their own queue
            state["mllm"] = lane_state(mllm_runner)
        return state

    @app.get("/v1/model", summary="what is loaded, and the server's limits")
    def model() -> dict:
        return {
            "model": public_info(info),
            "limits": asdict(cfg),
            "strategies": strategies,  # what this server runs; `unavailable` says why the others are not
            "selectors": selectors,
            "unavailable": missing,
        }

    def described(text: str) -> dict:
        return {"model": ErrorBody, "description": text}

    @app.post(
        "/v1/geolocate",
        summary="geolocate one uploaded photo",
        responses={
            200: {"model": Answer, "description": "candidates, best first"},
            400: described("bad request"),
            413: described("upload or image too large"),
            415: described("not an image"),
            422: described("bad option, or a truncated / corrupt image"),
            503: {
                **described(
                    f"busy: the expected wait in the queue is over {cfg.max_queue_wait_s:g} s "
                    "(or the server is shutting down)"
                ),
                "headers": {
                    "Retry-After": {
                        "description": "seconds until the expected wait would fit again",
                        "required": True,
                        "schema": {"type": "integer", "minimum": 1},
                    }
                },
            },
        },
    )
    async def geolocate(
        request: Request,
        image: UploadFile = File(..., description="the photo (JPEG, PNG, WebP, GIF, BMP, TIFF, ...)"),
        top_k: Annotated[
            Annotated[int, Field(ge=1, le=cfg.max_top_k)] | None,
            BeforeValidator(nullish),
            Form(description=f"candidates to return (default {default_top_k})"),
        ] = None,
        strategy: Annotated[offered(strategies), Form(description="decoding (default: the bundle's)")] = None,
        select: Annotated[offered(selectors), Form(description="selector (default: the bundle's)")] = None,
        constrain: Annotated[
            bool | None,
            BeforeValidator(nullish),
            Form(
                description="decode only cells of gallery photos (true) or freely (false, as the paper's "
                "authors); default: the bundle's"
            ),
        ] = None,
        # the same fields in the query string (older clients; not in the schema), "null" alike
        top_k_q: Annotated[
            int | None, BeforeValidator(nullish), Query(alias="top_k", include_in_schema=False)
        ] = None,
        strategy_q: Annotated[
            str | None, BeforeValidator(nullish), Query(alias="strategy", include_in_schema=False)
        ] = None,
        select_q: Annotated[
            str | None, BeforeValidator(nullish), Query(alias="select", include_in_schema=False)
        ] = None,
        constrain_q: Annotated[
            bool | None, BeforeValidator(nullish), Query(alias="constrain", include_in_schema=False)
        ] = None,
    ):
        t0 = time.perf_counter()
        chosen = select or nullish(select_q) or default_select
        lane = mllm_runner if chosen == "mllm" and mllm_runner is not None else runner
        try:
            lane.check()  # before decoding the upload (FastAPI has read and spooled the body by now)
        except Busy as exc:
            return busy(exc)
        form = await request.form()  # the form FastAPI parsed, cached
        unknown = sorted((set(form) | set(request.query_params)) - REQUEST_FIELDS)
        if unknown:  # a misspelt option (topk=3) would be dropped and the default used without a word
            return error(
                422, f"unknown field(s) {unknown}: the fields are {', '.join(sorted(REQUEST_FIELDS))}"
            )
        parts = len(form.getlist("image"))
        if parts > 1:  # FastAPI would keep the last one and drop the others without a word
            return error(422, f"field 'image': one photo per request, got {parts} (send one request each)")
        for field in sorted(REQUEST_FIELDS - {"image"}):  # likewise top_k=3 and top_k=7: one would be dropped
            given = len(form.getlist(field)) + len(request.query_params.getlist(field))
            if given > 1:
                both = form.getlist(field) and request.query_params.getlist(field)
                return error(
                    422,
                    f"field {field!r} is given {given} times" + (" (form and query string)" if both else ""),
                )
        top_k = top_k if top_k is not None else top_k_q if top_k_q is not None else default_top_k
        strategy, select = strategy or strategy_q, select or select_q
        constrain = constrain if constrain is not None else constrain_q
        if constrain is not None and not searchable:
            return error(
                422, f"field 'constrain': the {info.get('name') or 'loaded'} model has no gallery decoding"
            )
        if not 1 <= top_k <= cfg.max_top_k:
            return error(422, f"field 'top_k' must be between 1 and {cfg.max_top_k}, got {top_k}")
        bad = option_error("strategy", strategy, strategies) or option_error("select", select, selectors)
        if bad:
            return error(422, bad)
        name = image.filename or "image"
        data = await image.read(cfg.max_upload_bytes + 1)
        if len(data) > cfg.max_upload_bytes:
            return error(413, f"upload {name!r} is larger than the limit of {cfg.max_upload_mb:g} MB")
        try:
            im = await run_in_threadpool(decode_bounded, decode_slots, data, name, cfg.max_pixels)
        except BadImage as exc:
            return error(exc.status, exc.message)
        t_decode = 1e3 * (time.perf_counter() - t0)
        try:
            options = {} if constrain is None else {"constrain": constrain}  # None: the bundle's
            future = lane.submit(im, top_k=top_k, strategy=strategy, select=select, **options)
            pred, waited, batch = await asyncio.wrap_future(future)
        except Busy as exc:
            return busy(exc)
        except GeoTokenError as exc:
            return error(422, str(exc))
        except Exception as exc:  # noqa: BLE001  a fault of ours: still a JSON answer, and logged
            return fault(exc, f"upload {name!r}", f"upload {name!r}: ")
        out = pred.to_dict()
        out["image"] = {"name": name, "width": im.width, "height": im.height, "bytes": len(data)}
        gps = photo_gps(data, pred)
        if gps:
            out["exif_gps"] = gps
        out["timings_ms"] = {
            **out.get("timings_ms", {}),
            "decode_upload": round(t_decode, 3),
            "queue": round(waited, 3),
            "batch_size": batch,
            "request": round(1e3 * (time.perf_counter() - t0), 3),
        }
        return JSONResponse(json_safe(out))

    @app.get("/basemap.jpg", include_in_schema=False)
    def basemap_image():
        with basemap_lock:
            if "jpg" not in basemap:
                basemap["jpg"] = basemap_jpeg(cfg.basemap_width)
        return Response(basemap["jpg"], media_type="image/jpeg", headers={"Cache-Control": "max-age=86400"})

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    slack = 64 * 1024  # multipart boundaries and form fields around the image
    message = f"request body is larger than the upload limit of {cfg.max_upload_mb:g} MB"
    app.add_middleware(BodyLimit, limit=cfg.max_upload_bytes + slack, message=message)
    base_openapi = app.openapi

    def closed_openapi() -> dict:
        """FastAPI's schema, the upload's form closed to other fields: the server refuses them (a misspelt
        option), and the schema says so."""
        if app.openapi_schema is None:
            schema = base_openapi()
            form = schema["paths"]["/v1/geolocate"]["post"]["requestBody"]["content"]["multipart/form-data"]
            body = schema["components"]["schemas"][form["schema"]["$ref"].rsplit("/", 1)[1]]
            body["additionalProperties"] = False
            if not searchable:  # GeoCLIP: no gallery decoding to switch, every value is refused
                body["properties"].pop("constrain", None)
        return app.openapi_schema

    app.openapi = closed_openapi
    return app

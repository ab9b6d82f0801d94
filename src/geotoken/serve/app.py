"""The HTTP API and web page around a loaded `Geolocator`.

    app = create_app(Geolocator.from_bundle("runs/demo/bundle"), ServeConfig(concurrency=4))
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes:
    POST /v1/geolocate   multipart `image` (+ form or query fields top_k, strategy, select) -> JSON
    GET  /v1/model       what is loaded, and the server's limits
    GET  /healthz        liveness
    GET  /               the page (package static files; nothing from a CDN)
    GET  /basemap.jpg    the Blue Marble image at a reduced size (equirectangular, made once)
    GET  /docs, /openapi.json   FastAPI's schema

The model runs on one worker thread fed by a queue (PyTorch modules are not safe to call concurrently,
and on a CPU a second concurrent forward pass only competes for the same cores); requests that wait at
the same time are predicted together as one batch (micro-batching). At most `concurrency` requests are
admitted (running + queued); the next gets 503 with Retry-After at once, so a burst never piles up
unbounded work. Uploads are checked before any pixel is decoded: body size
(413), image header dimensions against `max_pixels` (413, decompression bombs), then a full decode
(non-images 415, truncated or corrupt files 422). The client sends bytes only: no path it names is
ever opened.
"""

import asyncio
import io
import json
import math
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from geotoken.errors import GeoTokenError
from geotoken.search import SELECTORS, STRATEGIES

STATIC_DIR = Path(__file__).parent / "static"


class Predictor(Protocol):
    """What the server needs: `geotoken.predict.Geolocator`, or anything with the same two methods."""

    def predict(
        self, images: list, top_k: int = 5, strategy: str | None = None, select: str | None = None
    ): ...

    def info(self) -> dict: ...


@dataclass
class ServeConfig:
    max_upload_mb: float = 10.0  # request body limit (413 above it)
    max_pixels: int = 40_000_000  # width x height limit, read from the header before decoding (413)
    concurrency: int = 8  # requests admitted at once (1 running + the rest waiting); more get 503
    max_top_k: int = 20
    max_batch: int = 8  # images predicted together when requests wait at the same time
    basemap_width: int = 2048  # width of the served Blue Marble image (height = width / 2)

    def __post_init__(self) -> None:
        for name in ("max_upload_mb", "max_pixels", "concurrency", "max_top_k", "max_batch", "basemap_width"):
            if not getattr(self, name) > 0:
                raise GeoTokenError(f"serve option {name} must be > 0, got {getattr(self, name)!r}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


class Busy(Exception):
    """All `concurrency` slots are taken."""


class Runner:
    """One model thread fed by a queue; at most `concurrency` requests admitted (queued + running).

    Requests that wait together with the same options are predicted as one batch of up to `max_batch`
    images (micro-batching: one backbone pass and one decode for all of them instead of one each).
    """

    def __init__(self, predictor: Predictor, concurrency: int, max_batch: int = 8):
        self.predictor, self.capacity, self.max_batch = predictor, concurrency, max_batch
        self._slots = threading.BoundedSemaphore(concurrency)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._count = threading.Lock()
        self.in_flight = self.served = self.rejected = self.batches = 0
        threading.Thread(target=self._loop, name="geotoken-model", daemon=True).start()

    def submit(self, image, **options) -> Future:
        """Queue one image -> Future of (Prediction, ms waited in the queue, batch size). Busy when full."""
        if not self._slots.acquire(blocking=False):
            with self._count:
                self.rejected += 1
            raise Busy()
        with self._count:
            self.in_flight += 1
        future: Future = Future()
        self._queue.put((image, options, future, time.perf_counter()))
        return future

    def run(self, image, **options) -> tuple[Any, float, int]:
        """`submit` and wait (for callers without an event loop)."""
        return self.submit(image, **options).result()

    def _loop(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < self.max_batch:  # whatever else is already waiting
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            groups: dict[tuple, list] = {}
            for item in batch:
                groups.setdefault(tuple(sorted(item[1].items())), []).append(item)
            for options, items in groups.items():
                self._predict(dict(options), items)

    def _predict(self, options: dict, items: list) -> None:
        t0 = time.perf_counter()
        try:
            preds = self.predictor.predict([it[0] for it in items], **options)
            results = [(p, 1e3 * (t0 - it[3]), len(items)) for p, it in zip(preds, items, strict=True)]
        except Exception as exc:  # the same options fail the same way for every image of the group
            results = [exc] * len(items)
        with self._count:
            self.batches += 1
            self.served += sum(not isinstance(r, Exception) for r in results)
            self.in_flight -= len(items)
        for it, r in zip(items, results):
            self._slots.release()
            if isinstance(r, Exception):
                it[2].set_exception(r)
            else:
                it[2].set_result(r)


class BadImage(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def decode_upload(data: bytes, name: str, max_pixels: int):
    """Bytes -> RGB PIL image; the header's size is checked before any pixel is decoded."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise BadImage(422, f"upload {name!r} is empty")
    try:  # reads the header only; PIL itself refuses > 2 x Image.MAX_IMAGE_PIXELS here
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise BadImage(413, f"upload {name!r}: image too large ({exc})") from None
    except UnidentifiedImageError:
        raise BadImage(
            415, f"upload {name!r} is not an image (JPEG, PNG, WebP, GIF, BMP, TIFF, ...)"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImage(415, f"upload {name!r} is not a readable image ({exc})") from None
    w, h = im.size
    if w * h > max_pixels:
        raise BadImage(413, f"upload {name!r} is {w}x{h} = {w * h} pixels; the limit is {max_pixels}")
    try:
        im.load()  # the full decode: truncated or corrupt data fails here
        return im.convert("RGB")
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
    from PIL import Image

    from geotoken import assets

    with Image.open(assets.basemap_image(name)) as im:
        im.draft("RGB", (width, width // 2))  # JPEG: decode at a reduced scale directly
        small = im.convert("RGB").resize((width, width // 2), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    small.save(buf, "JPEG", quality=85, optimize=True)
    return buf.getvalue()


def create_app(predictor: Predictor, config: ServeConfig | None = None):
    """A FastAPI app serving `predictor` (already loaded: the model is loaded once, by the caller)."""
    from fastapi import FastAPI, File, Form, Query, UploadFile
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, Response
    from fastapi.staticfiles import StaticFiles
    from starlette.concurrency import run_in_threadpool

    from geotoken import __version__

    cfg = config or ServeConfig()
    runner = Runner(predictor, cfg.concurrency, cfg.max_batch)
    info = json_safe(predictor.info())
    basemap: dict[str, bytes] = {}
    basemap_lock = threading.Lock()

    app = FastAPI(
        title="GeoToken",
        version=__version__,
        description="Where was this photo taken? Hierarchical S2-token geolocalization.",
    )
    app.state.runner, app.state.config = runner, cfg

    def error(status: int, message: str, headers: dict | None = None):
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, exc: RequestValidationError):
        """FastAPI's own 422s in the same {"error": "..."} shape, naming the field."""
        parts = [f"field {str(e['loc'][-1])!r}: {e['msg']}" for e in exc.errors()]
        return error(422, "; ".join(parts) or "invalid request")

    @app.get("/healthz", summary="liveness")
    def healthz() -> dict:
        return {
            "status": "ok",
            "in_flight": runner.in_flight,
            "served": runner.served,
            "batches": runner.batches,
        }

    @app.get("/v1/model", summary="what is loaded, and the server's limits")
    def model() -> dict:
        return {"model": info, "limits": asdict(cfg), "strategies": STRATEGIES, "selectors": SELECTORS}

    @app.post(
        "/v1/geolocate",
        summary="geolocate one uploaded photo",
        responses={
            400: {"description": "bad request"},
            413: {"description": "upload or image too large"},
            415: {"description": "not an image"},
            422: {"description": "bad option, or a truncated / corrupt image"},
            503: {"description": "server busy; retry after a second"},
        },
    )
    async def geolocate(
        image: UploadFile = File(..., description="the photo (JPEG, PNG, WebP, ...)"),
        top_k: int | None = Form(None, description="candidates to return (default 5)"),
        strategy: str | None = Form(None, description=f"one of {STRATEGIES} (default: the bundle's)"),
        select: str | None = Form(None, description=f"one of {SELECTORS} (default: the bundle's)"),
        top_k_q: int | None = Query(None, alias="top_k", include_in_schema=False),
        strategy_q: str | None = Query(None, alias="strategy", include_in_schema=False),
        select_q: str | None = Query(None, alias="select", include_in_schema=False),
    ):
        t0 = time.perf_counter()
        top_k = top_k if top_k is not None else (top_k_q if top_k_q is not None else 5)
        strategy, select = strategy or strategy_q, select or select_q
        if not 1 <= top_k <= cfg.max_top_k:
            return error(422, f"field 'top_k' must be between 1 and {cfg.max_top_k}, got {top_k}")
        if strategy is not None and strategy not in STRATEGIES:
            return error(422, f"field 'strategy' must be one of {list(STRATEGIES)}, got {strategy!r}")
        if select is not None and select not in SELECTORS:
            return error(422, f"field 'select' must be one of {list(SELECTORS)}, got {select!r}")
        name = image.filename or "image"
        data = await image.read(cfg.max_upload_bytes + 1)
        if len(data) > cfg.max_upload_bytes:
            return error(413, f"upload {name!r} is larger than the limit of {cfg.max_upload_mb:g} MB")
        try:
            im = await run_in_threadpool(decode_upload, data, name, cfg.max_pixels)
        except BadImage as exc:
            return error(exc.status, exc.message)
        t_decode = 1e3 * (time.perf_counter() - t0)
        try:
            future = runner.submit(im, top_k=top_k, strategy=strategy, select=select)
            pred, waited, batch = await asyncio.wrap_future(future)
        except Busy:
            return error(
                503, f"busy: {runner.capacity} requests in flight; retry shortly", {"Retry-After": "1"}
            )
        except GeoTokenError as exc:
            return error(422, str(exc))
        out = pred.to_dict()
        out["image"] = {"name": name, "width": im.width, "height": im.height, "bytes": len(data)}
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
    return app

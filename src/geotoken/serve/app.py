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

The model runs on one thread at a time (a lock: PyTorch modules are not safe to call concurrently, and
on a CPU a second concurrent forward pass only competes for the same cores). At most `concurrency`
requests are admitted (running + waiting for the lock); the next gets 503 with Retry-After at once, so
a burst never piles up unbounded work. Uploads are checked before any pixel is decoded: body size
(413), image header dimensions against `max_pixels` (413, decompression bombs), then a full decode
(non-images 415, truncated or corrupt files 422). The client sends bytes only: no path it names is
ever opened.
"""

import io
import math
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from geotoken.errors import GeoTokenError

STATIC_DIR = Path(__file__).parent / "static"
STRATEGIES = ("greedy", "beam", "sample", "beam+sample")
SELECTORS = ("logp", "consensus", "reward", "mllm")


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
    basemap_width: int = 2048  # width of the served Blue Marble image (height = width / 2)

    def __post_init__(self) -> None:
        for name in ("max_upload_mb", "max_pixels", "concurrency", "max_top_k", "basemap_width"):
            if not getattr(self, name) > 0:
                raise GeoTokenError(f"serve option {name} must be > 0, got {getattr(self, name)!r}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


class Busy(Exception):
    """All `concurrency` slots are taken."""


class Runner:
    """Admission control (a bounded count of requests in flight) + one model call at a time (a lock)."""

    def __init__(self, predictor: Predictor, concurrency: int):
        self.predictor = predictor
        self.capacity = concurrency
        self._slots = threading.BoundedSemaphore(concurrency)
        self._model = threading.Lock()
        self._count = threading.Lock()
        self.in_flight = 0
        self.served = 0
        self.rejected = 0

    def run(self, image, **options) -> tuple[Any, float]:
        """Predict one image -> (Prediction, ms spent waiting for the model). Raises Busy when full."""
        if not self._slots.acquire(blocking=False):
            with self._count:
                self.rejected += 1
            raise Busy()
        try:
            with self._count:
                self.in_flight += 1
            t0 = time.perf_counter()
            with self._model:
                waited = 1e3 * (time.perf_counter() - t0)
                [pred] = self.predictor.predict([image], **options)
            with self._count:
                self.served += 1
            return pred, waited
        finally:
            with self._count:
                self.in_flight -= 1
            self._slots.release()


class BadImage(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def decode_upload(data: bytes, name: str, max_pixels: int):
    """Bytes -> RGB PIL image; the header's size is checked before any pixel is decoded."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    if not data:
        raise BadImage(422, f"upload {name!r} is empty")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
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
    from fastapi import FastAPI, File, Form, Query, Request, UploadFile
    from fastapi.responses import FileResponse, JSONResponse, Response
    from fastapi.staticfiles import StaticFiles
    from starlette.concurrency import run_in_threadpool

    from geotoken import __version__

    cfg = config or ServeConfig()
    runner = Runner(predictor, cfg.concurrency)
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

    @app.get("/healthz", summary="liveness")
    def healthz() -> dict:
        return {"status": "ok", "in_flight": runner.in_flight, "served": runner.served}

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
        request: Request,
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
            pred, waited = await run_in_threadpool(
                runner.run, im, top_k=top_k, strategy=strategy, select=select
            )
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
            "request": round(1e3 * (time.perf_counter() - t0), 3),
        }
        return JSONResponse(json_safe(out))

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        """Refuse a declared oversize body before reading it (the handler re-checks what arrives)."""
        length = request.headers.get("content-length")
        slack = 64 * 1024  # multipart boundaries and form fields
        if length and length.isdigit() and int(length) > cfg.max_upload_bytes + slack:
            return error(413, f"request body of {int(length)} bytes is larger than {cfg.max_upload_mb:g} MB")
        return await call_next(request)

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
    return app

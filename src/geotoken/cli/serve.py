"""`geotoken serve --model MODEL`: the HTTP API and the web page with a map (MODEL: a bundle folder, a Hugging
Face Hub repo id holding one, or `geoclip`)."""

from __future__ import annotations

import dataclasses
import math
import socket

from geotoken.cli import DEVICE_HELP, THREADS_HELP, add_mllm_arguments, count, mllm_changes, use_threads
from geotoken.cli.predict import add_backbone_precision
from geotoken.errors import GeoTokenError
from geotoken.predict import Geolocator
from geotoken.serve import ServeConfig, create_app, warm_up

DEFAULTS = ServeConfig()


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="HTTP API + web page (upload a photo, see candidates on a world map)",
        description="Load a model bundle once and serve it: POST /v1/geolocate (multipart 'image'; fields "
        "top_k (1..--max-top-k, default 5), strategy, select, constrain; one photo per request), GET /v1/model, GET /healthz, the API reference at /docs (the schema at "
        "/openapi.json), and a web page at / with an offline Blue Marble map. One model thread; requests that wait together are batched. "
        "A request is admitted while its expected wait in the queue (measured seconds per image x images "
        "queued) fits --max-queue-wait-s; beyond it, 503 with Retry-After. On Ctrl-C / SIGTERM the server "
        "stops accepting and answers every admitted request before it exits. Listens on loopback unless "
        "--host says otherwise.",
    )
    p.add_argument(
        "--model",
        required=True,
        metavar="MODEL",
        help="model bundle folder (has bundle.json), a Hugging Face Hub repo id (ORG/NAME) holding one, or "
        "geoclip (GeoCLIP's pretrained weights)",
    )
    p.add_argument(
        "--clip",
        metavar="PATH_OR_ID",
        help="CLIP ViT-L/14 weights, a folder or hub id (default: openai/clip-vit-large-patch14 for geoclip, "
        "the bundle's own for a bundle)",
    )
    p.add_argument("--revision", help="branch, tag or commit of a Hugging Face Hub MODEL (default main)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=count, default=8000, help="port (default 8000)")
    p.add_argument(
        "--max-upload-mb",
        type=float,
        default=DEFAULTS.max_upload_mb,
        help=f"request size limit in MB (default {DEFAULTS.max_upload_mb:g})",
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULTS.max_pixels,
        help=f"image size limit, width x height (default {DEFAULTS.max_pixels:,})",
    )
    p.add_argument(
        "--max-queue-wait-s",
        type=float,
        default=DEFAULTS.max_queue_wait_s,
        help="admit a request while its expected wait in the queue fits this many seconds; beyond, 503 "
        f"with Retry-After (default {DEFAULTS.max_queue_wait_s:g})",
    )
    p.add_argument(
        "--max-top-k",
        type=int,
        default=DEFAULTS.max_top_k,
        help="most candidates a request may ask for (field top_k, default 5; a search may find fewer, and "
        f"the answer's note says so) (default {DEFAULTS.max_top_k})",
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=DEFAULTS.max_batch,
        help=f"images predicted together when requests wait (default {DEFAULTS.max_batch})",
    )
    p.add_argument(
        "--max-queued-pixels",
        type=int,
        default=DEFAULTS.max_queued_pixels,
        help="decoded photos waiting in memory, in pixels; beyond, 503 with Retry-After "
        f"(default {DEFAULTS.max_queued_pixels:,}, about {3 * DEFAULTS.max_queued_pixels / 1e9:.1f} GB)",
    )
    p.add_argument("--access-log", action="store_true", help="log every request (method, path, status)")
    p.add_argument("--threads", type=count, default=0, help=THREADS_HELP)
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    add_backbone_precision(p)
    add_mllm_arguments(p)  # select=mllm requests: over the bundle's MLLM settings
    p.set_defaults(func=run)


def listen(host: str, port: int) -> socket.socket:
    """Bind the server's socket first, so a port in use (or a bad address) is said before the model loads."""
    if not 0 < port <= 65535:
        raise GeoTokenError(f"--port {port}: a TCP port is 1-65535")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart right after a stop
        sock.bind(address)
    except OSError as exc:
        raise GeoTokenError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def run(args) -> int:
    import uvicorn

    config = ServeConfig(
        max_upload_mb=args.max_upload_mb,
        max_pixels=args.max_pixels,
        max_queue_wait_s=args.max_queue_wait_s,
        max_top_k=args.max_top_k,
        max_batch=args.max_batch,
        max_queued_pixels=args.max_queued_pixels,
    )
    sock = listen(args.host, args.port)
    use_threads(args.threads)
    geolocator = Geolocator.from_pretrained(
        args.model,
        clip=args.clip,
        revision=args.revision,
        device=args.device,
        backbone_precision=args.backbone_precision,
        backbone_runtime=args.backbone_runtime,
    )
    changes = mllm_changes(args)
    if changes:
        if not hasattr(geolocator, "options"):  # GeoCLIP: no selection step
            raise GeoTokenError(f"--mllm-*: the {args.model} model has no MLLM selection")
        options = geolocator.options
        geolocator.options = dataclasses.replace(options, mllm=options.mllm.replace(**changes))
    app = create_app(geolocator, config, config.runner(geolocator, warm_up(geolocator)))
    print(f"geotoken serve: {args.model} on http://{args.host}:{args.port}/ (API docs at /docs)", flush=True)
    # on Ctrl-C / SIGTERM: admitted requests are answered (they fit the wait budget); a client that stalls
    # its upload or its read is cut off after the grace time instead of holding the exit forever
    grace = math.ceil(config.shutdown_grace_s)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            log_level="info" if args.access_log else "warning",
            access_log=args.access_log,
            timeout_graceful_shutdown=grace,
        )
    )
    server.run(sockets=[sock])
    return 0

"""Selection by a multimodal LLM behind any OpenAI-compatible chat-completions endpoint.

Works with vLLM (`vllm serve ... --api-key`), Ollama (`http://localhost:11434/v1`) or a hosted service.
The image goes as a base64 data URL; the prompt lists the model's candidates. Two modes, as in the paper:

- `pool`: the answer must be one of the candidates (matched within `match_km`);
- `free`: any coordinate; candidates and the retrieved neighbours' coordinates are context.

The answer must be JSON {"latitude": float, "longitude": float} (a ```json fence is accepted). Transport
errors, HTTP 429/5xx and timeouts are retried with exponential backoff; a request that still fails, or an
answer that does not parse or is out of range, falls back to the `logp` choice for that image and the
reason is kept in `Selection.notes`. Requests run on a thread pool of `concurrency` workers.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import numpy as np
from PIL import Image

from geotoken.errors import GeoTokenError
from geotoken.geo import haversine_km
from geotoken.search.candidates import Candidates, Selection, select_logp

ENV_PREFIX = "GEOTOKEN_MLLM_"
MODES = ("pool", "free")


@dataclass
class MLLMConfig:
    """Endpoint and behaviour. Empty base_url / model / api_key are read from GEOTOKEN_MLLM_* variables."""

    base_url: str = ""  # e.g. http://localhost:8000/v1 (the /chat/completions path is appended)
    model: str = ""
    api_key: str = ""
    mode: str = "pool"  # "pool" or "free"
    timeout_s: float = 60.0
    retries: int = 3  # extra attempts after the first
    backoff_s: float = 1.0  # first wait; doubles each retry
    concurrency: int = 4
    temperature: float = 0.0
    max_tokens: int = 256
    max_image_side: int = 768  # images are downscaled to this before upload
    match_km: float = 1.0  # pool mode: how close an answer must be to a candidate

    def resolved(self) -> MLLMConfig:
        """A copy with empty fields filled from the environment; errors name the missing variable."""
        values = dict(self.__dict__)
        for name in ("base_url", "model", "api_key"):
            if not values[name]:
                values[name] = os.environ.get(ENV_PREFIX + name.upper(), "")
        for name in ("base_url", "model"):
            if not values[name]:
                raise GeoTokenError(
                    f"MLLM selection needs a {name}: set it in the config or the environment variable "
                    f"{ENV_PREFIX}{name.upper()}"
                )
        if values["mode"] not in MODES:
            raise GeoTokenError(f"MLLM mode must be one of {MODES}, got {values['mode']!r}")
        if values["concurrency"] < 1:
            raise GeoTokenError(f"MLLM concurrency must be >= 1, got {values['concurrency']}")
        return MLLMConfig(**values)


SYSTEM_PROMPT = (
    "You are an expert in image geolocalization. You look at a photo and say where on Earth it was taken. "
    'Answer only with JSON of the form {"latitude": float, "longitude": float}.'
)


def build_prompt(
    cand_latlon: np.ndarray, cand_prob: np.ndarray, mode: str, nbr_latlon: np.ndarray | None = None
) -> str:
    """The user message for one image: candidates (N, 2) best first with probabilities, neighbours (k, 2)."""
    lines = [
        f"{i + 1}. ({lat:.4f}, {lon:.4f}) p={p:.3f}"
        for i, ((lat, lon), p) in enumerate(zip(cand_latlon, cand_prob))
    ]
    text = "A geolocation model proposed these candidates (latitude, longitude), most likely first:\n"
    text += "\n".join(lines) + "\n"
    if mode == "pool":
        text += "Choose the candidate that best matches the photo. Your answer must be one of the coordinates above.\n"
    else:
        if nbr_latlon is not None and len(nbr_latlon):
            text += "Coordinates of visually similar photos from a reference gallery:\n"
            text += "\n".join(f"- ({lat:.4f}, {lon:.4f})" for lat, lon in nbr_latlon) + "\n"
        text += "Using the photo and this context, give your best estimate of where it was taken (any coordinate).\n"
    return text + 'Reply with JSON only: {"latitude": <float>, "longitude": <float>}'


def image_data_url(image, max_side: int = 768) -> str:
    """PIL image or encoded bytes -> a JPEG base64 data URL, downscaled so its longer side is <= max_side."""
    if isinstance(image, bytes | bytearray):
        image = Image.open(io.BytesIO(image))
    image = image.convert("RGB")
    if max(image.size) > max_side:
        image = image.copy()
        image.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)


def parse_answer(text: str) -> tuple[float, float]:
    """Strictly parse {"latitude": float, "longitude": float}; raise ValueError saying what is wrong."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("empty answer")
    fenced = _FENCE.search(text)
    body = (fenced.group(1) if fenced else text).strip()
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as exc:
        raise ValueError(f"answer is not JSON: {body[:80]!r}") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"answer is not a JSON object: {body[:80]!r}")
    out = []
    for key, limit in (("latitude", 90.0), ("longitude", 180.0)):
        value = obj.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"field {key!r} is not a number: {value!r}")
        if not math.isfinite(value) or abs(value) > limit:
            raise ValueError(f"field {key!r} out of range: {value!r}")
        out.append(float(value))
    return out[0], out[1]


class _Retryable(Exception):
    pass


def _chat(client, cfg: MLLMConfig, messages: list[dict]) -> str:
    """POST one chat completion with retries; return the message text or raise RuntimeError with the reason."""
    url = cfg.base_url.rstrip("/") + "/chat/completions"
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    body = {
        "model": cfg.model,
        "messages": messages,
        "temperature": cfg.temperature,
        "max_tokens": cfg.max_tokens,
    }
    reason = ""
    for attempt in range(cfg.retries + 1):
        if attempt:
            time.sleep(cfg.backoff_s * 2 ** (attempt - 1))
        try:
            r = client.post(url, json=body, headers=headers, timeout=cfg.timeout_s)
            if r.status_code == 429 or r.status_code >= 500:
                raise _Retryable(f"HTTP {r.status_code}")
            if r.status_code >= 400:
                raise RuntimeError(f"HTTP {r.status_code}: {r.text[:120]}")
            return r.json()["choices"][0]["message"]["content"]
        except _Retryable as exc:
            reason = str(exc)
        except httpx.TimeoutException:
            reason = f"timeout after {cfg.timeout_s:g} s"
        except httpx.TransportError as exc:
            reason = f"connection error: {exc}"
        except (KeyError, IndexError, TypeError, json.JSONDecodeError) as exc:
            raise RuntimeError(f"malformed response: {exc!r}") from exc
    raise RuntimeError(f"{reason} ({cfg.retries + 1} attempts)")


def ask_one(
    client, cfg: MLLMConfig, image, cand_latlon: np.ndarray, cand_prob: np.ndarray, nbr_latlon=None
) -> tuple[float, float]:
    """One image: the MLLM's (lat, lon), or RuntimeError/ValueError saying why there is none."""
    content = [
        {"type": "text", "text": build_prompt(cand_latlon, cand_prob, cfg.mode, nbr_latlon)},
        {"type": "image_url", "image_url": {"url": image_data_url(image, cfg.max_image_side)}},
    ]
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}]
    return parse_answer(_chat(client, cfg, messages))


def select_mllm(
    pool: Candidates,
    images: list,
    config: MLLMConfig | None = None,
    neighbours_latlon: np.ndarray | None = None,
    max_candidates: int = 10,
) -> Selection:
    """Ask the MLLM for each image (concurrently); fall back to `logp` per image on any failure.

    images: B PIL images or encoded bytes; neighbours_latlon: optional (B, k, 2) context for free mode.
    Candidates shown are the `max_candidates` most likely distinct ones.
    """
    cfg = (config or MLLMConfig()).resolved()
    B, N = pool.shape
    if len(images) != B:
        raise GeoTokenError(f"select_mllm: {len(images)} images for a pool of {B}")
    base = select_logp(pool)
    shown = np.argsort(-base.scores, axis=1, kind="stable")[:, :max_candidates]  # (B, M) distinct, best first
    shown_ok = np.take_along_axis(np.isfinite(base.scores), shown, axis=1)
    prob = np.exp(pool.logp)

    def work(b: int):
        idx = shown[b][shown_ok[b]]
        latlon = np.stack([pool.lat[b, idx], pool.lon[b, idx]], axis=1)
        nbr = None if neighbours_latlon is None else neighbours_latlon[b]
        try:
            return ask_one(client, cfg, images[b], latlon, prob[b, idx], nbr), idx, ""
        except (RuntimeError, ValueError, OSError) as exc:
            return None, idx, f"mllm failed ({exc}); fell back to logp"

    with httpx.Client() as client, ThreadPoolExecutor(max_workers=cfg.concurrency) as executor:
        results = list(executor.map(work, range(B)))

    index, lat, lon = base.index.copy(), base.lat.copy(), base.lon.copy()
    scores, notes = base.scores.copy(), []
    for b, (answer, idx, note) in enumerate(results):
        if answer is not None:
            d = haversine_km(answer[0], answer[1], pool.lat[b, idx], pool.lon[b, idx])
            j = int(np.argmin(d))
            if cfg.mode == "pool" and d[j] > cfg.match_km:
                note = f"mllm answer ({answer[0]:.4f}, {answer[1]:.4f}) is not a candidate; fell back to logp"
            elif cfg.mode == "pool":
                index[b], lat[b], lon[b] = idx[j], pool.lat[b, idx[j]], pool.lon[b, idx[j]]
                scores[b, idx[j]] = np.inf  # the chosen one ranks first, the rest keep their logp order
            else:
                index[b], (lat[b], lon[b]) = -1, answer
        notes.append(note)
    return Selection(index=index, lat=lat, lon=lon, scores=scores, notes=notes)

"""Selection by a multimodal LLM behind any OpenAI-compatible chat-completions endpoint.

Works with vLLM (`vllm serve ... --api-key`), Ollama (`http://localhost:11434/v1`) or a hosted service
(the paper used Gemini 2.0 Flash), through the `openai` client package (`pip install geotoken[mllm]`):
the one client every such endpoint is tested against, its request and response types kept up to date by
others. The image goes as a base64 data URL; the prompt lists the model's candidates. Two modes, as in
the paper:

- `pool`: choose among the candidates. The `paper` template (the authors' prompt) names the model's best
  guess (the greedy answer of a `greedy+sample` pool) and its other guesses, and asks for the MLLM's own
  guess if none seems correct: an answer within `match_km` of a candidate selects it, any other answer is
  kept as the MLLM's own (`strict=True` refuses it instead and falls back to `logp`);
- `free`: any coordinate; the candidates (and, in the `geotoken` template, the retrieved neighbours'
  coordinates) are context.

Templates (`TEMPLATES`): `paper` (the authors' two prompts, `PAPER_PROMPTS`; MLLM temperature 0.7 unless
set) and `geotoken` (candidates with their probabilities; temperature 0 unless set). The answer must be
JSON {"latitude": float, "longitude": float} (a ```json fence is accepted). Connection errors, HTTP
429/5xx and timeouts are retried with exponential backoff (the client's own retries are off, so
`retries` / `backoff_s` mean what they say); a request that still fails, or an answer that does not parse
or is out of range, falls back to the `logp` choice for that image and the reason is kept in
`Selection.notes`. Requests run on a thread pool of `concurrency` workers.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import math
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image

from geotoken.errors import GeoTokenError
from geotoken.geo import haversine_km
from geotoken.search.candidates import Candidates, Selection, select_logp

ENV_PREFIX = "GEOTOKEN_MLLM_"
MODES = ("pool", "free")
TEMPLATES = ("paper", "geotoken")
DEFAULT_TEMPERATURE = {"paper": 0.7, "geotoken": 0.0}  # the authors sampled their MLLM at 0.7


@dataclass
class MLLMConfig:
    """Endpoint and behaviour. Empty base_url / model / api_key are read from GEOTOKEN_MLLM_* variables."""

    base_url: str = ""  # e.g. http://localhost:8000/v1 (the /chat/completions path is appended)
    model: str = ""
    api_key: str = ""
    mode: str = "pool"  # "pool" or "free"
    template: str = "paper"  # the prompt's wording: "paper" (the authors') or "geotoken"
    strict: bool = False  # pool mode: refuse (fall back to logp) an answer not within match_km of a candidate
    timeout_s: float = 60.0
    retries: int = 3  # extra attempts after the first
    backoff_s: float = 1.0  # first wait; doubles each retry
    concurrency: int = 4
    temperature: float | None = None  # the MLLM's sampling temperature; None: DEFAULT_TEMPERATURE[template]
    max_tokens: int = 256
    max_image_side: int = 768  # images are downscaled to this before upload
    match_km: float = 1.0  # pool mode: how close an answer must be to a candidate to select it

    def replace(self, **changes) -> MLLMConfig:
        """A copy with `changes` applied (a bundle's settings under the command line's); unknown names are an
        error that lists the known ones."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise GeoTokenError(f"unknown MLLM option(s) {unknown}; known: {sorted(known)}")
        return dataclasses.replace(self, **changes)

    def identity(self) -> dict:
        """What decides its answers (the endpoint and model as the environment fills them, the prompt and
        sampling options), without the API key: for cache keys and records."""
        values = {k: v for k, v in self.__dict__.items() if k != "api_key"}
        for name in ("base_url", "model"):
            values[name] = values[name] or os.environ.get(ENV_PREFIX + name.upper(), "")
        return values

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
        if values["template"] not in TEMPLATES:
            raise GeoTokenError(f"MLLM template must be one of {TEMPLATES}, got {values['template']!r}")
        if values["concurrency"] < 1:
            raise GeoTokenError(f"MLLM concurrency must be >= 1, got {values['concurrency']}")
        if values["temperature"] is None:
            values["temperature"] = DEFAULT_TEMPERATURE[values["template"]]
        if not values["temperature"] >= 0:
            raise GeoTokenError(f"MLLM temperature must be >= 0, got {values['temperature']}")
        if not 0 < values["timeout_s"] < 1e6:  # (inf or 1e12 overflow the socket's timeout)
            raise GeoTokenError(
                f"MLLM timeout_s must be a number of seconds in (0, 1e6), got {values['timeout_s']}"
            )
        if not 0 <= values["match_km"] < math.inf:
            raise GeoTokenError(f"MLLM match_km must be a finite number >= 0, got {values['match_km']}")
        return MLLMConfig(**values)


SYSTEM_PROMPT = (
    "You are an expert in image geolocalization. You look at a photo and say where on Earth it was taken. "
    'Answer only with JSON of the form {"latitude": float, "longitude": float}.'
)


# The authors' two prompts (our wording of what they ask): {best} is the model's best guess (the greedy
# answer), {others} its other guesses, one "(lat, lon)" a line.
PAPER_PROMPTS = {
    "pool": (
        "A geolocation model looked at this photo.\n"
        "Its best guess (latitude, longitude): {best}\n"
        "Its other guesses:\n{others}\n"
        "Which of these locations was the photo taken at? Answer with the coordinates of the one that best "
        "matches the photo. If none of them seems correct, give your own best guess instead.\n"
        'Reply with JSON only: {{"latitude": <float>, "longitude": <float>}}'
    ),
    "free": (
        "A geolocation model looked at this photo.\n"
        "Its best guess (latitude, longitude): {best}\n"
        "Its other guesses:\n{others}\n"
        "Using the photo, with these guesses as hints, where was it taken? You may answer any coordinate, "
        "one of the guesses or not.\n"
        'Reply with JSON only: {{"latitude": <float>, "longitude": <float>}}'
    ),
}


def build_prompt(
    cand_latlon: np.ndarray,
    cand_prob: np.ndarray,
    mode: str,
    nbr_latlon: np.ndarray | None = None,
    template: str = "geotoken",
) -> str:
    """The user message for one image: candidates (N, 2) best first with probabilities, neighbours (k, 2).

    template "paper": the first candidate is the model's best guess, the rest its other guesses
    (probabilities and neighbours are not shown); "geotoken": all with probabilities, neighbours in free mode.
    """
    if template == "paper":
        others = "\n".join(f"- ({lat:.4f}, {lon:.4f})" for lat, lon in cand_latlon[1:]) or "- (none)"
        best = f"({cand_latlon[0][0]:.4f}, {cand_latlon[0][1]:.4f})"
        return PAPER_PROMPTS[mode].format(best=best, others=others)
    lines = [
        f"{i + 1}. ({lat:.4f}, {lon:.4f}) p={p:.3f}"
        for i, ((lat, lon), p) in enumerate(zip(cand_latlon, cand_prob))
    ]
    text = "A geolocation model proposed these candidates (latitude, longitude), most likely first (p: its share of belief among them):\n"
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


FELL_BACK = "fell back to logp"  # ends the note of an image whose MLLM answer could not be used


def fell_back(note: str) -> bool:
    """Whether a selection note says the MLLM's answer was not used (the image kept its logp choice)."""
    return FELL_BACK in note


_OBJECT = re.compile(r"\{[^{}]*\}")  # a flat JSON object inside other text


def parse_answer(text: str) -> tuple[float, float]:
    """Strictly parse {"latitude": float, "longitude": float}; raise ValueError saying what is wrong."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("empty answer")
    fenced = _FENCE.search(text)
    body = (fenced.group(1) if fenced else text).strip()
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as exc:
        inline = _OBJECT.search(body)  # chat models often wrap it: 'I think {"latitude": ...}.'
        try:
            obj = json.loads(inline.group(0)) if inline else None
        except json.JSONDecodeError:
            obj = None
        if obj is None:
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


def make_client(cfg: MLLMConfig):
    """An `openai.OpenAI` client for the endpoint, its own retries off (`_chat` retries with our backoff)."""
    try:
        from openai import OpenAI
    except ImportError:
        raise GeoTokenError(
            "MLLM selection needs the openai package: pip install 'geotoken[mllm]' (or openai>=1.0)"
        ) from None
    # an endpoint without keys (a local vLLM or Ollama) ignores the header the client insists on sending
    return OpenAI(base_url=cfg.base_url, api_key=cfg.api_key or "none", timeout=cfg.timeout_s, max_retries=0)


def retry_after(exc) -> float | None:
    """Seconds a 429 / 503 answer asks the client to wait (its Retry-After header), at most a minute."""
    value = getattr(getattr(exc, "response", None), "headers", {}).get("retry-after")
    try:
        return min(60.0, max(0.0, float(value))) if value is not None else None
    except ValueError:  # an HTTP date: not worth parsing here
        return None


def _chat(client, cfg: MLLMConfig, messages: list[dict]) -> str:
    """One chat completion with retries; return the message text or raise RuntimeError with the reason
    (naming the endpoint and model). Waits double from `backoff_s`, or what the server's Retry-After asks."""
    import openai

    reason, asked = "", None
    for attempt in range(cfg.retries + 1):
        if attempt:
            time.sleep(max(cfg.backoff_s * 2 ** (attempt - 1), asked or 0.0))
        try:
            response = client.chat.completions.create(
                model=cfg.model, messages=messages, temperature=cfg.temperature, max_tokens=cfg.max_tokens
            )
        except (openai.RateLimitError, openai.InternalServerError) as exc:
            reason, asked = f"HTTP {exc.status_code}", retry_after(exc)
            continue
        except openai.APITimeoutError:
            reason = f"timeout after {cfg.timeout_s:g} s"
            continue
        except openai.APIConnectionError as exc:
            reason = f"connection error: {exc}"
            continue
        except openai.APIStatusError as exc:
            raise RuntimeError(
                f"HTTP {exc.status_code} from {cfg.base_url} ({cfg.model}): {str(exc.message)[:120]}"
            ) from None
        except (openai.APIResponseValidationError, json.JSONDecodeError) as exc:
            raise RuntimeError(f"malformed response: {exc!r}") from None
        try:
            content = response.choices[0].message.content
        except (AttributeError, IndexError, TypeError) as exc:
            raise RuntimeError(f"malformed response: {exc!r}") from None
        if not isinstance(content, str):
            raise RuntimeError("malformed response: no message content")
        return content
    raise RuntimeError(f"{reason} from {cfg.base_url} ({cfg.model}), {cfg.retries + 1} attempts")


def ask_one(
    client, cfg: MLLMConfig, image, cand_latlon: np.ndarray, cand_prob: np.ndarray, nbr_latlon=None
) -> tuple[float, float]:
    """One image: the MLLM's (lat, lon), or RuntimeError/ValueError saying why there is none."""
    text = build_prompt(cand_latlon, cand_prob, cfg.mode, nbr_latlon, cfg.template)
    content = [
        {"type": "text", "text": text},
        {"type": "image_url", "image_url": {"url": image_data_url(image, cfg.max_image_side)}},
    ]
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}]
    return parse_answer(_chat(client, cfg, messages))


def shown_candidates(pool: Candidates, max_candidates: int = 10, best_index: int | None = None) -> list:
    """Per image, the candidate indices the prompt lists: the best guess first (`best_index`, e.g. 0 for
    the greedy answer of a `greedy+sample` pool; None: the most likely), then the other distinct ones by
    log-probability, `max_candidates` in all."""
    base = select_logp(pool)
    order = np.argsort(-base.scores, axis=1, kind="stable")  # distinct first, best first
    ok = np.take_along_axis(np.isfinite(base.scores), order, axis=1)
    out = []
    for b in range(pool.shape[0]):
        idx = order[b][ok[b]]
        if best_index is not None and 0 <= best_index < pool.shape[1]:
            first = best_index if np.isfinite(pool.logp[b, best_index]) or not len(idx) else idx[0]
            same = (pool.tokens[b, idx] == pool.tokens[b, first]).all(-1)  # its repeats (samples often are)
            idx = np.concatenate([[first], idx[~same]])
        out.append(idx[:max_candidates].astype(np.int64))
    return out


def shares(logp: np.ndarray) -> np.ndarray:
    """The model's preference among the candidates shown, summing to 1: a whole sequence's probability is
    tiny (e^-23 for 11 tokens) and would read p=0.000 for every one of them."""
    logp = np.asarray(logp, dtype=np.float64)
    finite = np.isfinite(logp)
    if not finite.any():
        return np.full(len(logp), 1.0 / max(1, len(logp)))
    w = np.where(finite, np.exp(logp - logp[finite].max()), 0.0)
    return w / w.sum()


def select_mllm(
    pool: Candidates,
    images: list,
    config: MLLMConfig | None = None,
    neighbours_latlon: np.ndarray | None = None,
    max_candidates: int = 10,
    best_index: int | None = None,
) -> Selection:
    """Ask the MLLM for each image (concurrently); fall back to `logp` per image on any failure.

    images: B PIL images or encoded bytes; neighbours_latlon: optional (B, k, 2) context for free mode
    (geotoken template). Candidates shown: `shown_candidates(pool, max_candidates, best_index)`.
    """
    cfg = (config or MLLMConfig()).resolved()
    B, N = pool.shape
    if len(images) != B:
        raise GeoTokenError(f"select_mllm: {len(images)} images for a pool of {B}")
    base = select_logp(pool)
    shown = shown_candidates(pool, max_candidates, best_index)

    def work(b: int):
        idx = shown[b]
        latlon = np.stack([pool.lat[b, idx], pool.lon[b, idx]], axis=1)
        nbr = None if neighbours_latlon is None else neighbours_latlon[b]
        try:
            return ask_one(client, cfg, images[b], latlon, shares(pool.logp[b, idx]), nbr), idx, ""
        except (RuntimeError, ValueError, OSError) as exc:
            return None, idx, f"mllm failed ({exc}); {FELL_BACK}"

    client = make_client(cfg)
    try:
        with ThreadPoolExecutor(max_workers=cfg.concurrency) as executor:
            results = list(executor.map(work, range(B)))
    finally:
        client.close()

    index, lat, lon = base.index.copy(), base.lat.copy(), base.lon.copy()
    scores, notes = base.scores.copy(), []
    for b, (answer, idx, note) in enumerate(results):
        if answer is not None:
            d = haversine_km(answer[0], answer[1], pool.lat[b, idx], pool.lon[b, idx])
            j = int(np.argmin(d))
            outside = d[j] > cfg.match_km
            if cfg.mode == "pool" and outside and cfg.strict:
                note = f"mllm answer ({answer[0]:.4f}, {answer[1]:.4f}) is not a candidate; {FELL_BACK}"
            elif cfg.mode == "pool" and not outside:
                index[b], lat[b], lon[b] = idx[j], pool.lat[b, idx[j]], pool.lon[b, idx[j]]
                scores[b, idx[j]] = np.inf  # the chosen one ranks first, the rest keep their logp order
            else:  # free mode, or no candidate fits and the MLLM gave its own guess
                index[b], (lat[b], lon[b]) = -1, answer
                if cfg.mode == "pool":
                    note = "mllm answer is none of the candidates: its own guess"
        notes.append(note)
    return Selection(index=index, lat=lat, lon=lon, scores=scores, notes=notes)

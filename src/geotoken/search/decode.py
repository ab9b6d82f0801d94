"""Test-time search over location tokens: greedy, beam search and sampling, cached or uncached.

The encoder runs once per image. Generation then goes one token position at a time through the model's
cached path (`init_cache` + `step`): cross-attention keys/values of the memory are computed once per
image and layer and shared by all beams/samples of that image (or, for greedy, folded into the queries so
the memory is read as it is), and self-attention keys/values of earlier positions are kept, so each step
costs one decoder position per row. The uncached path (`cached=False`)
re-runs the whole decoder on the prefix at every step, as the reference code does; it exists for the
equivalence tests and the benchmark, and gives the same results.

All strategies return a `geotoken.search.candidates.Candidates` pool: tokens (B, N, T), sequence log-probabilities
(B, N), cell-centre lat/lon (B, N) and the per-level probabilities of each path (B, N, T). An optional
`PrefixConstraint` (the cells of the training gallery) masks every token that would leave the set of
known cells. By default the kept tokens keep the model's probabilities (no renormalisation): after a
prefix with a single gallery cell below it, renormalising would make every later token certain, and beam
search would then favour paths into sparsely covered regions over the model's real preference.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from geotoken.errors import GeoTokenError
from geotoken.model import precision
from geotoken.s2 import tokens_to_latlon
from geotoken.search.candidates import STRATEGIES, Candidates


class PrefixConstraint:
    """The set of token sequences allowed (e.g. the gallery's cells), as a trie stored per level.

    Level t holds the sorted unique codes of all length-(t+1) prefixes, code = mixed-radix number of the
    prefix tokens with radices `vocab_sizes` (6 * 16^10 < 2^63 for level 20, g 2). Which tokens may follow
    a batch of prefixes is one `searchsorted` over (rows, V) candidate codes.
    """

    def __init__(self, tokens: np.ndarray, vocab_sizes: list[int], renormalize: bool = False):
        self.renormalize = (
            renormalize  # scores: P(token | prefix, allowed) instead of the model's P(token | prefix)
        )
        tokens = np.asarray(tokens, dtype=np.int64)
        if tokens.ndim != 2 or tokens.shape[1] != len(vocab_sizes) or len(tokens) == 0:
            raise GeoTokenError(f"constraint tokens must be (N>0, {len(vocab_sizes)}), got {tokens.shape}")
        vs = np.asarray(vocab_sizes, dtype=np.int64)
        bad = np.argwhere((tokens < 0) | (tokens >= vs))
        if len(bad):
            r, t = bad[0]
            raise GeoTokenError(
                f"constraint tokens row {r} position {t}: {tokens[r, t]} outside 0..{vs[t] - 1}"
            )
        self.vocab_sizes = [int(v) for v in vs]
        codes = np.zeros(len(tokens), dtype=np.int64)
        self.levels: list[torch.Tensor] = []  # level t: sorted unique prefix codes (n_t,)
        for t, v in enumerate(self.vocab_sizes):
            codes = codes * v + tokens[:, t]
            self.levels.append(torch.from_numpy(np.unique(codes)))

    def extend(self, codes: torch.Tensor, t: int, tokens: torch.Tensor) -> torch.Tensor:
        """Prefix codes (R,) of length t + the chosen tokens (R,) -> codes of length t + 1."""
        return codes * self.vocab_sizes[t] + tokens

    def allowed(self, codes: torch.Tensor, t: int, vmax: int) -> torch.Tensor:
        """(R, vmax) bool: tokens allowed at position t after prefixes with codes (R,) (ignored at t = 0)."""
        v = self.vocab_sizes[t]
        cand = codes[:, None] * v + torch.arange(v, device=codes.device)  # (R, v)
        table = self.levels[t] = self.levels[t].to(codes.device)
        i = torch.searchsorted(table, cand).clamp_(max=len(table) - 1)
        ok = table[i] == cand  # (R, v)
        return F.pad(ok, (0, vmax - v), value=False)

    def contains(self, tokens: np.ndarray) -> np.ndarray:
        """(..., T) token sequences -> bool (...): is each a full sequence of the set?"""
        tokens = np.asarray(tokens, dtype=np.int64)
        codes = np.zeros(tokens.shape[:-1], dtype=np.int64)
        for t, v in enumerate(self.vocab_sizes):
            codes = codes * v + tokens[..., t]
        table = self.levels[-1].numpy()
        i = np.searchsorted(table, codes).clip(max=len(table) - 1)
        return table[i] == codes


class _Cached:
    """One decoder position per call through the model's key/value cache."""

    def __init__(self, model, memory: torch.Tensor, copies: int):
        self.model, self.cache = model, model.init_cache(memory, copies=copies)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:  # tokens (R, t) so far -> logits (R, Vmax)
        t = tokens.shape[1]
        return self.model.step(self.cache, tokens[:, -1] if t else None, t)

    def reorder(self, rows: torch.Tensor) -> None:
        self.model.reorder_cache(self.cache, rows)


class _Uncached:
    """The reference's way: the whole decoder on the whole prefix at every step, memory copied per row."""

    def __init__(self, model, memory: torch.Tensor, copies: int):
        self.model, self.memory = model, memory.repeat_interleave(copies, dim=0)  # (R, S, d)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        R, t = tokens.shape
        tokens_in = torch.cat([tokens, tokens.new_zeros(R, 1)], dim=1)  # the last column is not read
        return self.model.decode(self.memory, tokens_in)[:, t]

    def reorder(self, rows: torch.Tensor) -> None:
        pass  # the state is the token prefix itself


def _stepper(model, memory, copies, cached):
    return (_Cached if cached else _Uncached)(model, memory, copies)


def _log_probs(logits: torch.Tensor, allowed: torch.Tensor | None, renormalize: bool = False) -> torch.Tensor:
    """Log-probabilities (R, Vmax) with disallowed tokens at -inf; renormalised over the allowed ones or not.
    A row with nothing allowed is all -inf (not NaN)."""
    logits = logits.float()
    if allowed is None:
        return torch.log_softmax(logits, dim=-1)
    if renormalize:
        logp = torch.log_softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    else:
        logp = torch.log_softmax(logits, dim=-1).masked_fill(~allowed, float("-inf"))
    return logp.masked_fill(logp.isnan(), float("-inf"))


def _pool(
    model, tokens: torch.Tensor, level_logp: torch.Tensor, scaled_logp: torch.Tensor | None = None
) -> Candidates:
    """tokens (B, N, T), level_logp (B, N, T) -> Candidates with coordinates (cell centres); scaled_logp
    (B, N, T): per-level log-probabilities under the sampling distribution (None: the model's own)."""
    B, N, T = tokens.shape
    tok = tokens.cpu().numpy()
    lat, lon = tokens_to_latlon(tok.reshape(B * N, T), model.cfg.level, model.cfg.group)
    level_logp = level_logp.double().cpu().numpy()
    return Candidates(
        tokens=tok,
        logp=level_logp.sum(-1),
        lat=np.asarray(lat, dtype=np.float64).reshape(B, N),
        lon=np.asarray(lon, dtype=np.float64).reshape(B, N),
        level_probs=np.exp(level_logp),
        logp_scaled=None if scaled_logp is None else scaled_logp.double().sum(-1).cpu().numpy(),
    )


@torch.no_grad()
def beam_search(
    model,
    memory: torch.Tensor,
    beam_width: int = 5,
    constraint: PrefixConstraint | None = None,
    cached: bool = True,
) -> Candidates:
    """All `beam_width` beams per image, best first, by cumulative log-probability (exact top-W of W x V each step).

    memory (B, S, d) from `model.encode`. If fewer than `beam_width` sequences exist (e.g. a constraint with few
    cells), the missing beams repeat the best one with log-probability -inf.
    """
    if beam_width < 1:
        raise GeoTokenError(f"beam_width must be >= 1, got {beam_width}")
    B, W, T = memory.shape[0], beam_width, model.cfg.n_tokens
    step = _stepper(model, memory, W, cached)
    dev = memory.device
    scores = torch.full((B, W), float("-inf"), device=dev)
    scores[:, 0] = 0.0  # all beams start identical: only the first one may expand at position 0
    tokens = torch.zeros(B * W, 0, dtype=torch.long, device=dev)
    level_logp = torch.zeros(B * W, 0, device=dev)
    codes = torch.zeros(B * W, dtype=torch.long, device=dev)
    base = (torch.arange(B, device=dev) * W)[:, None]  # (B, 1) first row of each image
    for t in range(T):
        logits = step(tokens)  # (B*W, V)
        V = logits.shape[-1]
        allowed = constraint.allowed(codes, t, V) if constraint is not None else None
        logp = _log_probs(logits, allowed, constraint is not None and constraint.renormalize)  # (B*W, V)
        total = (scores[:, :, None] + logp.view(B, W, V)).view(B, W * V)
        scores, idx = total.topk(W, dim=1)  # (B, W), sorted best first
        src, tok = idx // V, idx % V  # beam it extends, token it adds
        rows = (base + src).view(-1)  # (B*W,)
        tok = tok.view(-1)
        if t + 1 < T:  # the cache is not read after the last position
            step.reorder(rows)
        level_logp = torch.cat([level_logp[rows], logp[rows, tok][:, None]], dim=1)
        tokens = torch.cat([tokens[rows], tok[:, None]], dim=1)
        if constraint is not None:
            codes = constraint.extend(codes[rows], t, tok)
    tokens, level_logp = tokens.view(B, W, T), level_logp.view(B, W, T)
    dead = ~torch.isfinite(scores)  # (B, W) beams that never had a valid sequence
    if dead.any():
        tokens = torch.where(dead[..., None], tokens[:, :1], tokens)
        level_logp = torch.where(dead[..., None], float("-inf"), level_logp)
    return _pool(model, tokens, level_logp)


def _sampling_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Reshape a distribution (R, V) logits for sampling: temperature, then top-k, then nucleus top-p.
    Excluded tokens (-inf) stay excluded at any temperature: one beyond the logits' float range (where
    -inf / inf would be NaN) samples the allowed tokens uniformly, as its limit does."""
    if temperature < torch.finfo(logits.dtype).max:
        logits = logits / temperature
    else:
        logits = torch.zeros_like(logits).masked_fill(torch.isneginf(logits), float("-inf"))
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (R, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # mass before this token already reaches top_p
        drop[:, 0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))
    return logits


@torch.no_grad()
def sample(
    model,
    memory: torch.Tensor,
    num_samples: int = 10,
    temperature: float = 1.0,
    sample_top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    constraint: PrefixConstraint | None = None,
    cached: bool = True,
    seed: int | torch.Tensor | None = None,
) -> Candidates:
    """`num_samples` sequences per image, drawn from the (reshaped) model distribution, all images and samples batched.

    seed: image b's draws depend on (its key, sample, position) only (`row_uniforms`): an int keys image b
    by seed + b (a caller at row offset s passes seed + s), a (B,) int64 tensor gives each image's key
    (`Geolocator.predict`: from its pixels, so a photo's samples are the same wherever it is in a list
    and whatever else is in its batch). Without it, one `generator` stream over the batch.

    temperature 0 means argmax (greedy). `logp` and the per-level probabilities are the model's own
    (temperature 1; see `PrefixConstraint` on renormalisation), so samples compare with beams;
    `logp_scaled` is the log-probability under the distribution sampled from (temperature, top-k, top-p
    applied; at temperature 0 the model's own). With a constraint, samples are drawn from the
    distribution renormalised over the allowed tokens.
    """
    n = num_samples
    if n < 1 or temperature < 0 or not 0 < top_p <= 1 or sample_top_k < 0:
        raise GeoTokenError(
            f"bad sampling options: num_samples={n} temperature={temperature} sample_top_k={sample_top_k} "
            f"top_p={top_p}"
        )
    B, T = memory.shape[0], model.cfg.n_tokens
    R = B * n
    step = _stepper(model, memory, n, cached)
    dev = memory.device
    tokens = torch.zeros(R, 0, dtype=torch.long, device=dev)
    level_logp = torch.zeros(R, 0, device=dev)
    scaled_logp = torch.zeros(R, 0, device=dev)
    codes = torch.zeros(R, dtype=torch.long, device=dev)
    for t in range(T):
        logits = step(tokens)  # (R, V)
        allowed = constraint.allowed(codes, t, logits.shape[-1]) if constraint is not None else None
        logp = _log_probs(logits, allowed, constraint is not None and constraint.renormalize)  # (R, V)
        if temperature == 0:
            tok = logp.argmax(-1)
            scaled = logp
        else:
            shaped = _sampling_logits(logp, temperature, sample_top_k, top_p)
            probs = shaped.softmax(-1)
            if seed is None:
                tok = torch.multinomial(probs, 1, generator=generator)[:, 0]
            else:  # inverse CDF at this row's own uniform: the first token whose cumulative share passes it
                cdf = probs.double().cumsum(-1)
                u = row_uniforms(seed, B, n, t, dev) * cdf[:, -1]
                tok = torch.searchsorted(cdf, u[:, None], right=True)[:, 0].clamp_(max=probs.shape[-1] - 1)
            scaled = shaped.log_softmax(-1)
        level_logp = torch.cat([level_logp, logp.gather(1, tok[:, None])], dim=1)
        scaled_logp = torch.cat([scaled_logp, scaled.gather(1, tok[:, None])], dim=1)
        tokens = torch.cat([tokens, tok[:, None]], dim=1)
        if constraint is not None:
            codes = constraint.extend(codes, t, tok)
    return _pool(model, tokens.view(B, n, T), level_logp.view(B, n, T), scaled_logp.view(B, n, T))


_MIX = (-7046029254386353131, -4658895280553007687, -7723592293110705685)  # splitmix64's odd constants


def _splitmix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (wrapping products; logical shifts by masking)."""
    z = z + _MIX[0]
    z = (z ^ ((z >> 30) & ((1 << 34) - 1))) * _MIX[1]
    z = (z ^ ((z >> 27) & ((1 << 37) - 1))) * _MIX[2]
    return z ^ ((z >> 31) & ((1 << 33) - 1))


def row_uniforms(
    seed: int | torch.Tensor, images: int, samples: int, position: int, device=None
) -> torch.Tensor:
    """Uniforms in [0, 1), (images * samples,) float64, rows image-major: a counter-based draw keyed by
    (image key, sample, position), the same on every device and for every batch it is computed in. The
    image keys are seed + 0 .. images - 1, or `seed` itself when it is an (images,) int64 tensor."""
    if isinstance(seed, torch.Tensor):
        if seed.shape != (images,):
            raise ValueError(f"{images} images need {images} sampling keys, got shape {tuple(seed.shape)}")
        image = seed.to(device=device, dtype=torch.int64)
    else:
        image = torch.arange(images, dtype=torch.int64, device=device) + seed
    sample = torch.arange(samples, dtype=torch.int64, device=device)
    z = _splitmix64(_splitmix64(_splitmix64(image)[:, None] + sample) + position).reshape(-1)
    return ((z >> 11) & ((1 << 53) - 1)).double() * 2.0**-53


@torch.no_grad()
def generate(
    model,
    batch,
    strategy: str = "beam",
    beam_width: int = 5,
    num_samples: int = 10,
    temperature: float = 1.0,
    sample_top_k: int = 0,
    top_p: float = 1.0,
    seed: int | torch.Tensor = 0,
    constraint: PrefixConstraint | None = None,
    cached: bool = True,
    dtype: str = "fp32",
    retrieved: int = 5,
) -> tuple[Candidates, torch.Tensor]:
    """Encode once, search with `strategy`; returns (candidates, memory) so selectors can reuse the memory.

    "greedy+sample" puts the greedy answer first, before the samples. "sample+retrieval" adds the cells of
    the first `retrieved` neighbours in `batch` to the samples, with the model's own probabilities of them:
    retrieval and generation compete in one pool. "greedy+sample+retrieval": the greedy answer, then both.

    dtype "bf16" runs the model's matmuls in bfloat16 (autocast; about 2x faster on CPUs with bf16 units,
    and on GPUs); log-probabilities are still computed in fp32.
    """
    if strategy not in STRATEGIES:
        raise GeoTokenError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    with precision(dtype, next(model.parameters()).device):
        memory = model.encode(batch)  # (B, S, d)
        if strategy == "greedy":
            pool = sample(model, memory, 1, temperature=0.0, constraint=constraint, cached=cached)
        elif strategy == "beam":
            pool = beam_search(model, memory, beam_width, constraint=constraint, cached=cached)
        else:  # sample, beam+sample, greedy+sample, sample+retrieval, greedy+sample+retrieval
            pool = sample(
                model,
                memory,
                num_samples,
                temperature,
                sample_top_k,
                top_p,
                constraint=constraint,
                cached=cached,
                seed=seed,
            )
            if strategy == "beam+sample":
                pool = Candidates.concat([beam_search(model, memory, beam_width, constraint, cached), pool])
            if strategy.endswith("+retrieval"):
                pool = Candidates.concat([pool, score_sequences(model, memory, _retrieved(batch, retrieved))])
            if strategy.startswith("greedy+"):  # the greedy answer first
                best = sample(model, memory, 1, temperature=0.0, constraint=constraint, cached=cached)
                pool = Candidates.concat([best, pool])
    return pool, memory


def _retrieved(batch, r: int) -> torch.Tensor:
    """The first r neighbours' token sequences (B, r, T) of a batch."""
    if batch.nbr_tokens is None or r < 1 or batch.nbr_tokens.shape[1] < r:
        have = 0 if batch.nbr_tokens is None else batch.nbr_tokens.shape[1]
        raise GeoTokenError(f"a '+retrieval' strategy pools {r} neighbours (>= 1); the batch has {have}")
    return batch.nbr_tokens[:, :r]


@torch.no_grad()
def score_sequences(model, memory: torch.Tensor, tokens: torch.Tensor, cached: bool = True) -> Candidates:
    """The model's per-level log-probabilities of given sequences, tokens (B, N, T), as a pool.

    One teacher-forced pass, the N sequences of an image sharing its memory (as beams do), e.g. to put
    the retrieved neighbours' cells beside the model's own candidates.
    """
    B, N, T = tokens.shape
    flat = tokens.reshape(B * N, T).to(memory.device)
    step = _stepper(model, memory, N, cached)
    level_logp = []
    for t in range(T):
        logp = torch.log_softmax(step(flat[:, :t]).float(), dim=-1)  # (B*N, V)
        level_logp.append(logp.gather(1, flat[:, t : t + 1]))
    return _pool(model, flat.view(B, N, T), torch.cat(level_logp, dim=1).view(B, N, T))


@torch.no_grad()
def greedy(model, batch, constraint: PrefixConstraint | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Most likely token at each position: (tokens (B, T) int64, summed log-probability (B,)). Tensors stay
    on the model's device (the training loop validates with this). With a `constraint`, the most likely
    allowed token (the `+gallery` decoder of `geotoken evaluate`), scored as beams and samples are."""
    memory = model.encode(batch)  # (B, S, d)
    cache = model.init_cache(memory)
    B, T = memory.shape[0], model.cfg.n_tokens
    tokens = torch.zeros(B, T, dtype=torch.long, device=memory.device)
    logp = torch.zeros(B, device=memory.device)
    codes = torch.zeros(B, dtype=torch.long, device=memory.device)  # prefix codes, for the constraint
    for p in range(T):  # the autoregressive loop: one cached step per position
        logits = model.step(cache, tokens[:, p - 1] if p else None, p)  # (B, V)
        allowed = constraint.allowed(codes, p, logits.shape[-1]) if constraint is not None else None
        lp = _log_probs(
            logits, allowed, constraint is not None and constraint.renormalize
        )  # as beams, samples
        best, tokens[:, p] = lp.max(dim=-1)
        logp += best
        if constraint is not None:
            codes = constraint.extend(codes, p, tokens[:, p])
    return tokens, logp

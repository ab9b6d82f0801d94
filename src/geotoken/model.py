"""The GeoToken model: a retrieval-conditioned encoder-decoder transformer over hierarchical S2 tokens.

Encoder sequence (S positions, d channels), for one image:
    [CLS, query modality 1..M] + for each of k neighbours [its M modality embeddings, its T location tokens]
Each modality has its own MLP (D_m -> d -> d, ReLU) followed by L2 normalisation, as in the paper. A unit
vector in d dimensions has per-channel RMS 1/sqrt(d) (0.04 at d 512) while sinusoidal positions have RMS
0.7, so the normalised vector is multiplied by sqrt(d): content, position and slot-type embeddings then
start at the same scale. Neighbour location tokens are embedded with a separate "retrieval" table.

Decoder: position 0 reads a learned start vector, position i > 0 reads the embedding of token i-1 (one
shared table, each position owning a slice of it, so the position is encoded by the row itself); causal
self-attention, cross-attention to the encoder memory, and one output head per position (vocabulary 6,
then 4^g). Logits come as one padded tensor (B, T, Vmax) with -inf beyond each position's vocabulary.

Layers are written out (`F.scaled_dot_product_attention`) so that training (`decode`, all positions at
once) and generation (`init_cache` + `step`, one position at a time with a key/value cache) run the same
modules on the same weights. Two layer designs (`ModelConfig.arch`, `ARCHS`), same file, same cache:

    ours      pre-LayerNorm, GELU, no attention dropout, final LayerNorms on encoder and decoder, slot-type
              embeddings, modality vectors scaled by sqrt(d), the decoder position encoded by its own slice
              of the token table; nanoGPT initialisation
    authors   the paper's checkpoint: `torch.nn.TransformerEncoder/DecoderLayer` defaults (post-LayerNorm,
              ReLU, dropout inside the feed-forward, attention dropout = dropout), no final LayerNorm (the
              authors' `TransformerEncoder/Decoder` have none), unit modality vectors, no slot embeddings,
              sinusoidal positions added to the encoder inputs and to the decoder inputs (at the absolute
              position, also when decoding one position at a time); PyTorch's default initialisation

Post-LayerNorm needs nothing else in the cache: a layer's keys/values are projections of its (un-normalised)
input at each position, which depends on earlier positions only, so the cached keys/values are exact.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from geotoken import DTYPES
from geotoken.errors import GeoTokenError
from geotoken.io import atomic_path, read_safetensors, write_json

ARCHS = ("ours", "authors")  # layer designs, see the module docstring


@dataclass
class ModelConfig:
    d_model: int = 512
    n_encoder_layers: int = 10
    n_decoder_layers: int = 10
    n_heads: int = 8
    d_ff: int = 1024
    dropout: float = 0.1  # on embeddings, residual branches (attention output, feed-forward)
    # Dropout on attention probabilities. None: the arch's choice, 0 for "ours" (it forces the unfused
    # (B, h, S, S) attention path and its random masks, most of a CPU step), `dropout` for "authors" (as
    # nn.Transformer's layers). Resolved in __post_init__, so config.json holds the number.
    attn_dropout: float | None = None
    level: int = 20  # S2 level of the target cell
    group: int = 2  # child tokens merged into one token (vocabulary 4^group)
    k: int = 15  # neighbours read by the encoder (0 = no retrieval)
    modalities: dict[str, int] = field(default_factory=lambda: {"visual": 768, "gps": 768, "text": 768})
    use_neighbour_embeddings: bool = True
    use_neighbour_tokens: bool = True
    arch: str = "ours"  # layer design (ARCHS); configs written before it existed are "ours"

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise GeoTokenError(f"model arch {self.arch!r}: choose one of {', '.join(ARCHS)}")
        if self.attn_dropout is None:
            self.attn_dropout = self.dropout if self.arch == "authors" else 0.0
        if self.d_model % self.n_heads:
            raise GeoTokenError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if not 1 <= self.level <= 30 or self.group < 1:
            raise GeoTokenError(f"level {self.level} must be in 1..30 and group {self.group} >= 1")
        if not 0 <= self.k <= 30:
            raise GeoTokenError(f"k {self.k} must be in 0..30")
        if not self.modalities:
            raise GeoTokenError("modalities is empty: the encoder needs at least one query embedding")
        if self.k and not (self.use_neighbour_embeddings or self.use_neighbour_tokens):
            raise GeoTokenError(
                f"k {self.k} neighbours, but neither their embeddings nor their tokens are read: use k 0 "
                "(no retrieval) for that ablation, or keep one of them"
            )

    @property
    def n_tokens(self) -> int:
        """T: the face token plus ceil(level / group) grouped child tokens."""
        return 1 + -(-self.level // self.group)

    @property
    def vocab_sizes(self) -> list[int]:
        """[6, 4^g, ..., 4^g, 4^(last group's length)], as `geotoken.s2.vocab_sizes`."""
        return [6] + [4 ** min(self.group, self.level - i) for i in range(0, self.level, self.group)]

    @property
    def n_neighbour_slots(self) -> int:
        """Encoder positions per neighbour: its modality embeddings and/or its T tokens."""
        m = len(self.modalities) if self.use_neighbour_embeddings else 0
        return m + (self.n_tokens if self.use_neighbour_tokens else 0)

    @property
    def seq_len(self) -> int:
        """S: encoder positions."""
        return 1 + len(self.modalities) + self.k * self.n_neighbour_slots

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise GeoTokenError(f"unknown model config field(s) {unknown}")
        return cls(**d)


PRESETS: dict[str, dict] = {
    # the checkpoint behind the paper's results
    "paper": dict(d_model=512, n_encoder_layers=10, n_decoder_layers=10, n_heads=8, d_ff=1024),
    "small": dict(d_model=256, n_encoder_layers=4, n_decoder_layers=4, n_heads=8, d_ff=512),
    # the offline demo and the tests: trains in minutes on two CPU cores
    "tiny": dict(d_model=128, n_encoder_layers=2, n_decoder_layers=2, n_heads=4, d_ff=256),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A named configuration; keyword arguments override its fields (e.g. modalities, k)."""
    if name not in PRESETS:
        raise GeoTokenError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


@dataclass
class Batch:
    """Model inputs. query[m] (B, D_m), nbr[m] (B, k, D_m), nbr_tokens (B, k, T) int64, targets (B, T) int64."""

    query: dict[str, torch.Tensor]
    nbr: dict[str, torch.Tensor] = field(default_factory=dict)
    nbr_tokens: torch.Tensor | None = None
    targets: torch.Tensor | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return Batch(
            {m: move(x) for m, x in self.query.items()},
            {m: move(x) for m, x in self.nbr.items()},
            move(self.nbr_tokens),
            move(self.targets),
        )

    @property
    def size(self) -> int:
        return next(iter(self.query.values())).shape[0]


def precision(dtype: str, device: torch.device | str = "cpu"):
    """The autocast context of a run's dtype: "bf16" runs matmuls in bfloat16 (weights stay fp32)."""
    if dtype not in DTYPES:
        raise GeoTokenError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=dtype == "bf16")


def sinusoid(n: int, d: int) -> torch.Tensor:
    """Fixed sinusoidal positions (n, d) of the original transformer."""
    pos = torch.arange(n, dtype=torch.float32)[:, None]  # (n, 1)
    freq = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * (-math.log(10000.0) / d))  # (d/2,)
    pe = torch.zeros(n, d)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq)
    return pe


class Dropout(nn.Module):
    """`nn.Dropout` with a mask that is cheaper to draw on the CPU (on other devices: `F.dropout`).

    The CPU's `bernoulli_` costs ~6 ns an element (11 ms for one (32, 214, 256) activation, a tenth of a
    `small` training step). Here each 64-bit draw of the default generator gives four 16-bit lanes and a
    lane at or above a threshold keeps its element, so p is rounded to a multiple of 1/65536.
    """

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise GeoTokenError(f"dropout probability {p} must be in 0..1")
        self.p = p
        dropped = round(p * 65536)  # lanes in -32768 .. -32768 + dropped - 1 drop their element
        self.threshold = -32768 + dropped
        self.scale = 65536 / (65536 - dropped) if dropped < 65536 else 0.0

    @property
    def active(self) -> bool:
        return self.training and self.p > 0.0

    def keep(self, x: torch.Tensor) -> torch.Tensor:
        """A fresh bool mask shaped like x (CPU): True keeps the element."""
        n = x.numel()
        lanes = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), None).view(torch.int16)
        return lanes[:n].view(x.shape) >= self.threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        return torch.where(self.keep(x), x, 0.0) * self.scale

    def residual(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x + dropout(y), a residual branch joining the stream. On the CPU one `addcmul` with the bool
        mask: a pass over the activation forward and one backward, against three and two for `where`,
        the scale and the sum (0.5-1.6 ms less per (32, 214, 256) branch, 22 a `small` b32 step: the whole
        step 1.01-1.04x in an in-process A/B, BENCHMARKS.md box E)."""
        if not self.active:
            return x + y
        if y.device.type != "cpu":
            return x + F.dropout(y, self.p, training=True)
        return torch.addcmul(x, y, self.keep(y), value=self.scale)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False, dropout_p: float = 0.0
) -> torch.Tensor:
    """Scaled dot-product attention: q (N, h, L, hd), k and v (N, h, S, hd) -> (N, h, L, hd).

    `F.scaled_dot_product_attention` everywhere but in bf16 on the CPU, where its fused kernel is about
    2x slower (forward + backward at S 214) than two batched bf16 matmuls and a softmax.
    """
    if q.dtype != torch.bfloat16 or q.device.type != "cpu" or dropout_p > 0:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal)
    L, S = q.shape[-2], k.shape[-2]
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (N, h, L, S)
    if causal:  # query i sees keys 0..i, as `is_causal` does
        future = torch.ones(L, S, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return scores.softmax(-1) @ v


def project_heads(linear: nn.Linear, x: torch.Tensor, n: int, h: int) -> list[torch.Tensor]:
    """n stacked projections (queries, keys, values) of x (B, L, d), each as h heads (B, h, L, d / h).

    Without gradients: one matmul, its output viewed per head. With them: one matmul per projection, on
    row blocks of the same weight: each output (B, L, d) reaches attention as a transposed view of a dense
    tensor, so attention's backward returns its gradient in that layout and nothing is copied; the single
    (B, L, n, h, hd) output would need its gradient gathered into place (a copy of the whole activation
    per layer, ~8 % of an attention block's forward + backward at `paper`)."""
    B, L, _ = x.shape
    d = linear.out_features // n
    if not (torch.is_grad_enabled() and (x.requires_grad or linear.weight.requires_grad)):
        return list(linear(x).view(B, L, n, h, d // h).permute(2, 0, 3, 1, 4))
    blocks = zip(linear.weight.chunk(n), linear.bias.chunk(n))
    return [F.linear(x, w, b).view(B, L, h, d // h).transpose(1, 2) for w, b in blocks]


ONE_QUERY_BROADCAST_ROWS = 32  # crossover of `one_query_attention`'s two forms (AMD EPYC, 2 threads, fp32)


def one_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: int) -> torch.Tensor:
    """Attention of one query per row over that row's cached keys: q (N, d), k and v (N, t, d) with the h
    heads side by side in d -> (N, d).

    For many rows in fp32 on the CPU, broadcast products and sums over the dense (N, t, d) cache: the CPU's
    fused kernel handles N*h tiny problems one by one (2x slower at 160 rows, `small` 10 samples); for few
    rows (greedy, where it is faster), in bf16 or on other devices, the kernel on per-head views."""
    N, t, d = k.shape
    hd = d // h
    if N >= ONE_QUERY_BROADCAST_ROWS and q.dtype == torch.float32 and q.device.type == "cpu":
        scores = (k * q[:, None]).view(N, t, h, hd).sum(-1) * hd**-0.5  # (N, t, h)
        return (v.view(N, t, h, hd) * scores.softmax(1)[..., None]).sum(1).view(N, d)
    heads = lambda x: x.view(N, -1, h, hd).transpose(1, 2)  # noqa: E731  (N, h, t, hd) views
    return attention(heads(q), heads(k), heads(v)).reshape(N, d)  # (N, h, 1, hd) -> (N, d)


class SelfAttention(nn.Module):
    """Multi-head self-attention; with a cache it appends this call's keys/values at `pos` first."""

    def __init__(self, cfg: ModelConfig, causal: bool):
        super().__init__()
        self.h, self.causal, self.p = cfg.n_heads, causal, cfg.attn_dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor, cache: dict | None = None, pos: int = 0) -> torch.Tensor:
        if cache is not None:
            return self.cached(x, cache, pos)
        B, L, d = x.shape
        q, k, v = project_heads(self.qkv, x, 3, self.h)  # 3 x (B, h, L, hd)
        y = attention(q, k, v, self.causal, dropout_p=self.p if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, L, d))  # (B, L, d)

    def cached(self, x: torch.Tensor, cache: dict, pos: int) -> torch.Tensor:
        """Generation, one position per call: x (N, 1, d). The keys/values of positions < pos are in the
        cache (N, T, d) each; this call's go to `pos`, and its query (the newest position) sees them all."""
        N, L, d = x.shape
        if L > 1:
            raise ValueError("the cached path decodes one position per call")
        q, k, v = self.qkv(x[:, 0]).chunk(3, dim=-1)  # 3 x (N, d)
        cache["k"][:, pos] = k
        cache["v"][:, pos] = v
        # a cache made inside autocast, read outside (or back): in the query's dtype
        keys, values = (cache[name][:, : pos + 1].to(q.dtype) for name in ("k", "v"))  # (N, pos+1, d)
        return self.proj(one_query_attention(q, keys, values, self.h))[:, None]  # (N, 1, d)


class FoldedMemory(NamedTuple):
    """The encoder memory as `CrossAttention.folded` reads it: the states (B, S, d), one dense tensor shared
    by every layer. The scores read it through a transposed view: a dense transposed copy makes that one
    matmul a little faster alone but doubles what every step reads (7 MB per layer at `small` b16), and in
    the whole greedy decode the smaller working set wins (1.1-1.3x, in-process A/B, BENCHMARKS.md box E)."""

    states: torch.Tensor


class CrossAttention(nn.Module):
    """Queries from the decoder, keys/values from the encoder memory (computed once per image)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.h, self.p = cfg.n_heads, cfg.attn_dropout
        self.q = nn.Linear(cfg.d_model, cfg.d_model)
        self.kv = nn.Linear(cfg.d_model, 2 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def memory_kv(self, memory: torch.Tensor, dense: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, h, S, hd) of the memory (B, S, d): strided views of one projection, or
        `dense` copies (CPU attention kernels read those ~3x faster, worth it when read at every step)."""
        k, v = project_heads(self.kv, memory, 2, self.h)  # 2 x (B, h, S, hd)
        return (k.contiguous(), v.contiguous()) if dense else (k, v)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor] | FoldedMemory) -> torch.Tensor:
        # x (B, L, d). Attention to the memory has no mask, so L may hold several decoding positions or
        # several beams/samples of the same image: they share the image's keys/values without a copy.
        # kv: the memory's keys/values from `memory_kv`, or the memory itself (`folded`).
        if isinstance(kv, FoldedMemory):
            return self.folded(x, kv)
        B, L, d = x.shape
        q = self.q(x).view(B, L, self.h, d // self.h).transpose(1, 2)  # (B, h, L, hd)
        k, v = (t.to(q.dtype) for t in kv)  # no-ops unless the memory was projected in another precision
        y = attention(q, k, v, dropout_p=self.p if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, L, d))

    def folded(self, x: torch.Tensor, memory: FoldedMemory) -> torch.Tensor:
        """The same attention with the keys' and values' projections folded into the queries and outputs:
        q.(W_k m + b_k) = (W_k^T q).m + q.b_k, and the q.b_k term is the same for every memory position,
        so softmax drops it; softmax(s) @ (W_v m + b_v) = W_v (softmax(s) @ m) + b_v. It reads the memory
        instead of keys/values projected from it: no per-image projection, and one small tensor shared by
        every layer instead of two per layer. Per call it costs h*L*S*d multiply-adds per image
        against the projected form's L*S*d, so it wins for few query rows (greedy; see `init_cache`)."""
        B, L, d = x.shape
        h, hd = self.h, d // self.h
        w_k, w_v = self.kv.weight.view(2, h, hd, d)  # rows of `kv`: keys (h, hd), then values (h, hd)
        q = (self.q(x) * hd**-0.5).view(B * L, h, hd).transpose(0, 1)  # (h, BL, hd), scaled before folding
        q_mem = torch.bmm(q, w_k.to(q.dtype))  # (h, BL, d): per head W_k^T q
        q_mem = q_mem.view(h, B, L, d).transpose(0, 1).reshape(B, h * L, d)  # (B, hL, d), image-major
        states = memory.states.to(q_mem.dtype)  # a no-op unless made in another precision
        scores = torch.bmm(q_mem, states.transpose(1, 2))  # (B, hL, S)
        ctx = torch.bmm(scores.softmax(-1), states)  # (B, hL, d)
        ctx = ctx.view(B, h, L, d).transpose(0, 1).reshape(h, B * L, d)  # (h, BL, d)
        y = torch.bmm(ctx, w_v.transpose(1, 2).to(ctx.dtype))  # (h, BL, hd): per head W_v ctx
        y = y.transpose(0, 1).reshape(B, L, d)  # heads back to channels
        return self.proj(y + self.kv.bias[d:].to(y.dtype))


class MLP(nn.Module):
    """Feed-forward: GELU ("ours"), or ReLU with dropout before the second linear ("authors", as
    nn.TransformerEncoderLayer)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff)
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model)
        self.authors = cfg.arch == "authors"
        self.drop = Dropout(cfg.dropout if self.authors else 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.authors:
            return self.proj(self.drop(F.relu(self.fc(x))))
        return self.proj(F.gelu(self.fc(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn, self.mlp = SelfAttention(cfg, causal=False), MLP(cfg)
        self.drop = Dropout(cfg.dropout)
        self.post_ln = cfg.arch == "authors"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.post_ln:  # x = norm(x + sublayer(x)), nn.TransformerEncoderLayer(norm_first=False)
            x = self.ln1(self.drop.residual(x, self.attn(x)))
            return self.ln2(self.drop.residual(x, self.mlp(x)))
        x = self.drop.residual(x, self.attn(self.ln1(x)))
        return self.drop.residual(x, self.mlp(self.ln2(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1, self.ln2, self.ln3 = (nn.LayerNorm(cfg.d_model) for _ in range(3))
        self.attn, self.cross, self.mlp = SelfAttention(cfg, causal=True), CrossAttention(cfg), MLP(cfg)
        self.drop = Dropout(cfg.dropout)
        self.post_ln = cfg.arch == "authors"

    def forward(
        self, x: torch.Tensor, kv: tuple, cache: dict | None = None, pos: int = 0, copies: int = 1
    ) -> torch.Tensor:
        """x (B * copies, L, d); kv holds B images' memory keys/values, shared by each image's copies.

        With a cache, self-attention stores the keys/values of this call's positions: projections of the
        layer input `x` in both designs (post-LN normalises after the residual sum, not before attention).
        """
        N, L, d = x.shape
        if self.post_ln:  # nn.TransformerDecoderLayer(norm_first=False)
            x = self.ln1(self.drop.residual(x, self.attn(x, cache, pos)))
            y = self.cross(x.view(N // copies, copies * L, d), kv)  # copies become query rows
            x = self.ln2(self.drop.residual(x, y.view(N, L, d)))
            return self.ln3(self.drop.residual(x, self.mlp(x)))
        x = self.drop.residual(x, self.attn(self.ln1(x), cache, pos))
        y = self.cross(self.ln2(x).view(N // copies, copies * L, d), kv)  # copies become query rows
        x = self.drop.residual(x, y.view(N, L, d))
        return self.drop.residual(x, self.mlp(self.ln3(x)))


class GeoToken(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d, T, M = cfg.d_model, cfg.n_tokens, len(cfg.modalities)
        vocab = torch.tensor(cfg.vocab_sizes)  # (T,)
        self.register_buffer(
            "offsets", torch.cumsum(vocab, 0) - vocab, persistent=False
        )  # (T,) row of token 0
        vmax = int(vocab.max())
        self.register_buffer(
            "valid", torch.arange(vmax)[None, :] < vocab[:, None], persistent=False
        )  # (T, Vmax)

        # encoder inputs
        self.authors = cfg.arch == "authors"
        self.modality_mlp = nn.ModuleDict(
            {
                m: nn.Sequential(nn.Linear(dim, d), nn.ReLU(), nn.Linear(d, d))
                for m, dim in cfg.modalities.items()
            }
        )
        self.cls = nn.Parameter(torch.randn(d))
        self.retrieval_emb = nn.Embedding(int(vocab.sum()), d)  # neighbours' tokens, per-position slices
        if not self.authors:  # the authors' encoder knows a slot by its sinusoidal position only
            self.slot_emb = nn.Embedding(1 + 2 * M + T, d)  # CLS, query m, neighbour m, neighbour token t
            self.register_buffer("slot_ids", self._slot_ids(), persistent=False)  # (S,)
        self.register_buffer("enc_pos", sinusoid(cfg.seq_len, d), persistent=False)  # (S, d)
        self.enc_drop = Dropout(cfg.dropout)
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_encoder_layers))
        self.enc_ln = nn.Identity() if self.authors else nn.LayerNorm(d)

        # decoder
        self.start = nn.Parameter(torch.randn(d))
        self.token_emb = nn.Embedding(int(vocab.sum()), d)
        if self.authors:  # sinusoidal positions on the decoder inputs, indexed by absolute position
            self.register_buffer("dec_pos", sinusoid(T, d), persistent=False)  # (T, d)
        self.dec_drop = Dropout(cfg.dropout)
        self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_decoder_layers))
        self.dec_ln = nn.Identity() if self.authors else nn.LayerNorm(d)
        self.head_w = nn.Parameter(torch.zeros(T, vmax, d))  # one head per position, padded to Vmax
        self.head_b = nn.Parameter(torch.zeros(T, vmax))
        if self.authors:
            self._init_authors()
        else:
            self._init_weights()

    def _slot_ids(self) -> torch.Tensor:
        cfg, M, T = self.cfg, len(self.cfg.modalities), self.cfg.n_tokens
        block = []
        if cfg.use_neighbour_embeddings:
            block += list(range(1 + M, 1 + 2 * M))
        if cfg.use_neighbour_tokens:
            block += list(range(1 + 2 * M, 1 + 2 * M + T))
        return torch.tensor([0] + list(range(1, 1 + M)) + block * cfg.k, dtype=torch.long)

    def _init_weights(self) -> None:
        # nanoGPT: N(0, 0.02) linears, residual projections scaled down by depth; embeddings at unit scale
        # to match the sqrt(d)-scaled modality vectors.
        n_res = 2 * self.cfg.n_encoder_layers + 3 * self.cfg.n_decoder_layers
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(n_res))
            elif name.endswith(".weight") and p.dim() == 2 and "emb" not in name:
                nn.init.normal_(p, std=0.02)
            elif name.endswith(".bias") and "ln" not in name:
                nn.init.zeros_(p)
        nn.init.normal_(self.head_w, std=0.02)
        self.head_w.data[~self.valid] = 0.0

    @torch.no_grad()
    def _init_authors(self) -> None:
        """PyTorch's defaults, as the authors' modules get them: nn.Linear's own init for the modality MLPs,
        feed-forward and attention output projections; nn.MultiheadAttention's Xavier-uniform over the
        stacked (3d, d) input projection with zero biases (zero output bias too); N(0, 1) embeddings; each
        position's head as an nn.Linear(d, vocabulary)."""
        d = self.cfg.d_model
        bound = math.sqrt(6.0 / (d + 3 * d))  # Xavier-uniform of a (3d, d) matrix
        for layer in [*self.encoder, *self.decoder]:
            projections = [layer.attn.qkv] + (
                [layer.cross.q, layer.cross.kv] if hasattr(layer, "cross") else []
            )
            for lin in projections:
                nn.init.uniform_(lin.weight, -bound, bound)
                nn.init.zeros_(lin.bias)
            for attn in [layer.attn] + ([layer.cross] if hasattr(layer, "cross") else []):
                nn.init.zeros_(attn.proj.bias)
        b = 1.0 / math.sqrt(
            d
        )  # nn.Linear(d, v): kaiming_uniform(a=sqrt(5)) and its bias bound, 1/sqrt(fan_in)
        nn.init.uniform_(self.head_w, -b, b)
        nn.init.uniform_(self.head_b, -b, b)
        self.head_w[~self.valid] = 0.0
        self.head_b[~self.valid] = 0.0

    # ---------------------------------------------------------------- encoder
    def encode(self, batch: Batch) -> torch.Tensor:
        """Encoder memory (B, S, d)."""
        cfg, k = self.cfg, self.cfg.k
        B, d = batch.size, cfg.d_model
        use_nbr_emb = k > 0 and cfg.use_neighbour_embeddings
        if k > 0:
            have = {m: batch.nbr[m].shape[1] for m in cfg.modalities if m in batch.nbr} if use_nbr_emb else {}
            if cfg.use_neighbour_tokens:
                have["nbr_tokens"] = -1 if batch.nbr_tokens is None else batch.nbr_tokens.shape[1]
            if (
                len(have) < use_nbr_emb * len(cfg.modalities) + cfg.use_neighbour_tokens
                or min(have.values()) < k
            ):
                raise GeoTokenError(f"the model reads k={k} neighbours; the batch has {have}")
        mods = []  # per modality: (B, 1 + k', d), query first, then its neighbours
        for m in cfg.modalities:  # a loop over modalities (<= 3), never over neighbours or samples
            x = batch.query[m][:, None]  # (B, 1, D_m)
            if use_nbr_emb:
                x = torch.cat([x, batch.nbr[m][:, :k].to(x.dtype)], dim=1)  # (B, 1 + k, D_m)
            unit = F.normalize(self.modality_mlp[m](x), dim=-1)  # the authors' encoder reads unit vectors
            mods.append(unit if self.authors else unit * math.sqrt(d))
        mods = torch.stack(mods, dim=2)  # (B, 1 + k', M, d)
        parts = [self.cls.expand(B, 1, d), mods[:, 0]]  # (B, 1, d), (B, M, d)
        if k > 0:
            nbr = [mods[:, 1:]] if use_nbr_emb else []  # (B, k, M, d)
            if cfg.use_neighbour_tokens:
                tok = batch.nbr_tokens[:, :k] + self.offsets  # (B, k, T)
                nbr.append(self.retrieval_emb(tok))  # (B, k, T, d)
            parts.append(torch.cat(nbr, dim=2).reshape(B, k * cfg.n_neighbour_slots, d))
        x = torch.cat(parts, dim=1)  # (B, S, d)
        x = x + self.enc_pos if self.authors else x + self.enc_pos + self.slot_emb(self.slot_ids)
        x = self.enc_drop(x)
        for layer in self.encoder:
            x = layer(x)
        return self.enc_ln(x)

    # ---------------------------------------------------------------- decoder, all positions
    def _dec_input(self, tokens_prev: torch.Tensor | None, pos: int, n: int) -> torch.Tensor:
        """Decoder inputs (n, t, d) for positions pos..pos+t-1, given the tokens before each: (n, t) or None."""
        x = self._dec_embed(tokens_prev, pos, n)
        if self.authors:  # the absolute position, also when one position is decoded at a time
            x = x + self.dec_pos[pos : pos + x.shape[1]].to(x.dtype)
        return x

    def _dec_embed(self, tokens_prev: torch.Tensor | None, pos: int, n: int) -> torch.Tensor:
        if pos == 0:
            start = self.start.expand(n, 1, -1)  # (n, 1, d)
            if tokens_prev is None or tokens_prev.shape[1] == 0:
                return start
            t = tokens_prev.shape[1]
            return torch.cat([start, self.token_emb(tokens_prev + self.offsets[:t])], dim=1)
        t = tokens_prev.shape[1]
        return self.token_emb(tokens_prev + self.offsets[pos - 1 : pos - 1 + t])

    def _logits(self, h: torch.Tensor, pos: int) -> torch.Tensor:
        """Heads for positions pos..pos+t-1: h (B, t, d) -> (B, t, Vmax), -inf beyond each vocabulary."""
        t = h.shape[1]
        w, b = self.head_w[pos : pos + t], self.head_b[pos : pos + t]  # (t, Vmax, d), (t, Vmax)
        logits = torch.einsum("btd,tvd->btv", h, w.to(h.dtype)) + b.to(h.dtype)
        return logits.masked_fill(~self.valid[pos : pos + t], float("-inf"))

    def decoder_states(self, memory: torch.Tensor, tokens: torch.Tensor, copies: int = 1) -> torch.Tensor:
        """Final decoder states (B * copies, t + 1, d) over the start vector and `tokens` (B * copies, t),
        t <= T, causal: state i has read tokens[:, :i], so the last one has read the whole sequence (the
        authors' reward scorer classifies it). Rows are image-major: `copies` sequences per image of
        memory (B, S, d) share its keys/values. `decode` puts the heads on these states."""
        kvs = [layer.cross.memory_kv(memory) for layer in self.decoder]
        x = self.dec_drop(self._dec_input(tokens, 0, tokens.shape[0]))  # (B * copies, t + 1, d)
        for layer, kv in zip(self.decoder, kvs):
            x = layer(x, kv, copies=copies)
        return self.dec_ln(x)

    def decode(self, memory: torch.Tensor, tokens_in: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (B, t, Vmax): logits[:, i] is token i's distribution given tokens_in[:, :i].

        tokens_in (B, t) int64 with t <= T (usually the targets; the last column is not read).
        """
        return self._logits(self.decoder_states(memory, tokens_in[:, :-1]), 0)

    def forward(self, batch: Batch, label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits (B, T, Vmax), weighted loss or None without targets)."""
        memory = self.encode(batch)
        if batch.targets is None:
            raise ValueError("forward needs batch.targets (use encode/init_cache/step to generate)")
        logits = self.decode(memory, batch.targets)
        return logits, token_loss(logits, batch.targets, self.valid, label_smoothing)

    # ---------------------------------------------------------------- decoder, one position at a time
    @torch.no_grad()
    def init_cache(self, memory: torch.Tensor, copies: int = 1, fold: bool | None = None) -> dict:
        """Generation state for `copies` sequences per image; rows are image-major (B * copies).

        Cross-attention reads, per image and layer, either keys/values projected once from the memory
        and shared by its copies, or (`fold`) the memory itself (`CrossAttention.folded`). Per image and
        layer, projecting costs S*d*2d multiply-adds once plus T*copies*2*S*d over the T steps; folding
        costs T*copies*h*2*S*d. fold None picks the cheaper, folding when T*copies*(h - 1) < d (greedy on
        the presets; beams and samples project), in full precision only: under autocast the projected
        form keeps the cached search rounding exactly as the uncached one (the same matmuls in bf16).
        Both give the same logits up to float rounding. The self-attention cache holds keys and values
        (B * copies, T, d) per layer, heads side by side (`one_query_attention`).
        """
        B, S, d = memory.shape
        cfg = self.cfg
        dev = memory.device.type  # under autocast the keys/values (and so the cache) are in its dtype
        autocast = torch.is_autocast_enabled(dev)
        if fold is None:
            fold = not autocast and cfg.n_tokens * copies * (cfg.n_heads - 1) < d
        dtype = torch.get_autocast_dtype(dev) if autocast else memory.dtype
        shape = (B * copies, cfg.n_tokens, d)  # self-attention keys/values, heads side by side
        if fold:  # one tensor for all layers
            folded = FoldedMemory(memory.contiguous())
        layers = []
        for layer in self.decoder:
            kv = folded if fold else layer.cross.memory_kv(memory, dense=True)
            layers.append(
                {
                    "kv": kv,
                    "k": memory.new_zeros(shape, dtype=dtype),
                    "v": memory.new_zeros(shape, dtype=dtype),
                }
            )
        return {"layers": layers, "batch": B, "copies": copies}

    @torch.no_grad()
    def step(self, cache: dict, last_token: torch.Tensor | None, position: int) -> torch.Tensor:
        """Logits (B * copies, Vmax) of token `position` given the previous token (B * copies,) (None at 0)."""
        B, n = cache["batch"], cache["copies"]
        if position == 0 and n > 1:  # every copy of an image reads the same start vector: run B rows,
            first = [{**c, "k": c["k"][::n], "v": c["v"][::n]} for c in cache["layers"]]  # (views)
            logits = self.step({"layers": first, "batch": B, "copies": 1}, None, 0)  # (B, Vmax)
            for c in cache["layers"]:  # then give the other copies the first one's keys/values
                for key in ("k", "v"):
                    rows = c[key].view(B, n, *c[key].shape[1:])  # (B, n, T, d)
                    rows[:, 1:, :1] = rows[:, :1, :1]
            return logits.repeat_interleave(n, dim=0)  # (B*n, Vmax)
        prev = None if position == 0 else last_token[:, None]  # (B*n, 1)
        x = self._dec_input(prev, position, B * n)  # (B*n, 1, d)
        for layer, c in zip(self.decoder, cache["layers"]):
            x = layer(x, c["kv"], c, position, copies=n)  # (B*n, 1, d)
        return self._logits(self.dec_ln(x), position)[:, 0]  # (B*n, Vmax)

    @staticmethod
    def reorder_cache(cache: dict, rows: torch.Tensor) -> None:
        """Beam search: row r of the self-attention cache becomes old row rows[r] (within the same image)."""
        for c in cache["layers"]:
            c["k"] = c["k"].index_select(0, rows)
            c["v"] = c["v"].index_select(0, rows)

    # ---------------------------------------------------------------- files
    def save(self, directory: str | Path) -> None:
        """`model.safetensors` + `config.json`, each written atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        with atomic_path(directory / "model.safetensors") as tmp:
            save_file(state, str(tmp))
        write_json(directory / "config.json", self.cfg.to_dict())

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> GeoToken:
        directory = Path(directory)
        for name in ("config.json", "model.safetensors"):
            if not (directory / name).is_file():
                raise GeoTokenError(f"{directory / name} is missing: not a GeoToken model folder")
        try:
            cfg = ModelConfig.from_dict(json.loads((directory / "config.json").read_text()))
        except (json.JSONDecodeError, TypeError) as exc:
            raise GeoTokenError(f"{directory / 'config.json'}: {exc}") from None
        model = cls(cfg)
        try:
            model.load_state_dict(read_safetensors(directory / "model.safetensors"))
        except RuntimeError as exc:
            raise GeoTokenError(
                f"{directory / 'model.safetensors'} does not match config.json: {exc}"
            ) from None
        return model.to(device).eval()

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def loss_weights(n_tokens: int) -> torch.Tensor:
    """Per-position weights, linear from 2.0 (face token) to 1.0 (finest), summing to 1."""
    w = torch.linspace(2.0, 1.0, n_tokens) if n_tokens > 1 else torch.ones(1)
    return w / w.sum()


def token_loss(
    logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Weighted per-position cross-entropy. logits (B, t, Vmax), targets (B, t), valid (T, Vmax) bool.

    Label smoothing spreads its mass over each position's own vocabulary only (the padded -inf
    entries would make the built-in smoothing infinite).
    """
    t = targets.shape[1]
    logp = F.log_softmax(logits.float(), dim=-1)  # (B, t, Vmax)
    nll = -logp.gather(-1, targets[..., None])[..., 0]  # (B, t)
    if label_smoothing > 0:
        valid = valid[:t]
        uniform = -torch.where(valid, logp, 0.0).sum(-1) / valid.sum(-1)  # (B, t)
        nll = (1 - label_smoothing) * nll + label_smoothing * uniform
    w = loss_weights(valid.shape[0])[:t].to(nll.device)
    return (nll.mean(0) * w).sum() / w.sum()

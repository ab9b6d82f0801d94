"""A re-implementation of the structure of the authors' training step, for side-by-side timing only.

Written from the description of the public code (reference-notes.md), not copied: same sizes and the
same loss, and the same costly habits, so `geotoken.bench.train` measures the ratio on one machine in one run:
  - a Python loop over the k neighbours, each gathering its rows from NumPy arrays on the CPU inside
    forward() and running the three modality MLPs on B rows at a time;
  - a Python loop over the T token positions for the neighbour-token, decoder-input and output-head
    embeddings;
  - sequence-first `nn.TransformerEncoder` / `nn.TransformerDecoder` layers (post-norm, ReLU);
  - a per-position loss loop, weights 2.0 -> 1.0 divided by their sum.
Never used for training; the model behind `geotoken train` is `geotoken.model.GeoToken`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from geotoken.bench.common import GALLERY_ROWS, PAPER_INPUTS, random_data, time_steps
from geotoken.model import precision, preset


class ReferenceGeoToken(nn.Module):
    def __init__(
        self, d: int, layers: int, heads: int, ff: int, dropout: float, vocab: list[int], dim: int = 768
    ):
        super().__init__()
        self.d, self.vocab = d, vocab
        self.offsets = [int(sum(vocab[:t])) for t in range(len(vocab))]
        mlp = lambda: nn.Sequential(nn.Linear(dim, d), nn.ReLU(), nn.Linear(d, d))  # noqa: E731
        self.image_proj, self.loc_proj, self.text_proj = mlp(), mlp(), mlp()
        self.embedding = nn.Embedding(sum(vocab), d)
        self.retrieval_embedding = nn.Embedding(sum(vocab), d)
        self.start = nn.Parameter(torch.randn(1, d))
        self.cls = nn.Parameter(torch.randn(1, d))
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(d, heads, ff, dropout), layers, enable_nested_tensor=False
        )
        self.decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(d, heads, ff, dropout), layers)
        self.output_layers = nn.ModuleList(nn.Linear(d, v) for v in vocab)
        pe = torch.zeros(500, d)
        pos = torch.arange(500.0)[:, None]
        div = torch.exp(torch.arange(0, d, 2).float() * (-math.log(10000.0) / d))
        pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * div), torch.cos(pos * div)
        self.register_buffer("pe", pe[:, None])  # (500, 1, d), sequence-first
        self.drop = nn.Dropout(dropout)

    @staticmethod
    def _unit(x: torch.Tensor) -> torch.Tensor:
        return x / x.norm(p=2, dim=-1, keepdim=True)

    def forward(
        self,
        img,
        loc,
        text,
        gal_img: np.ndarray,
        gal_loc: np.ndarray,
        gal_text: np.ndarray,
        nbr_idx,
        token_table,
        targets,
    ):
        B, T = targets.shape
        nbr_idx = nbr_idx[:, 1:16]  # training: hit 0 is the query itself
        neighbours = []
        for j in range(nbr_idx.size(1)):  # per-neighbour loop
            idx = nbr_idx[:, j]
            tokens = token_table[idx]  # (B, T)
            idx_np = idx.cpu().numpy()  # NumPy indexing of CPU arrays inside forward
            e_img = self._unit(self.image_proj(torch.from_numpy(gal_img[idx_np]).float()))
            e_loc = self._unit(self.loc_proj(torch.from_numpy(gal_loc[idx_np]).float()))
            e_txt = self._unit(self.text_proj(torch.from_numpy(gal_text[idx_np]).float()))
            emb = [
                self.retrieval_embedding(tokens[:, p] + self.offsets[p]) for p in range(T)
            ]  # per-position loop
            neighbours.append(
                torch.cat([e_img[:, None], e_loc[:, None], e_txt[:, None], torch.stack(emb, 1)], 1)
            )
        nbr = torch.stack(neighbours, 1).view(B, -1, self.d).transpose(0, 1)  # (k*(3+T), B, d)
        q = [
            self._unit(self.image_proj(img)),
            self._unit(self.loc_proj(loc)),
            self._unit(self.text_proj(text)),
        ]
        src = torch.cat([self.cls.expand(B, -1)[None]] + [x[None] for x in q] + [nbr], 0)  # (S, B, d)
        memory = self.encoder(self.drop(src + self.pe[: src.size(0)]))

        dec = [self.start.expand(B, -1)]
        for t in range(T - 1):
            dec.append(self.embedding(targets[:, t] + self.offsets[t]))
        dec = torch.stack(dec, 0)  # (T, B, d)
        dec = self.drop(dec + self.pe[:T])
        mask = nn.Transformer.generate_square_subsequent_mask(T)
        out = self.decoder(dec, memory, tgt_mask=mask)  # (T, B, d)

        w = torch.linspace(2.0, 1.0, T)
        loss = 0.0
        for t in range(T):  # per-position heads and loss
            loss = loss + w[t] * F.cross_entropy(self.output_layers[t](out[t]), targets[:, t])
        return loss / w.sum()


def bench_reference(
    name: str,
    batch_size: int,
    iters: int = 3,
    warmup: int = 1,
    seed: int = 0,
    rows: int = GALLERY_ROWS,
    dtype: str = "fp32",
) -> dict:
    """{seconds_per_step, train_samples_per_s, dtype} of the reference-style step on the same random inputs
    as `geotoken.bench.train.bench_ours`, under the same precision as ours (`dtype`: fp32, or bf16
    autocast of its forward, as `geotoken.model.precision` does for ours), so a ratio compares like with like."""
    cfg = preset(name, **PAPER_INPUTS)
    torch.manual_seed(seed)
    model = ReferenceGeoToken(
        cfg.d_model, cfg.n_encoder_layers, cfg.n_heads, cfg.d_ff, cfg.dropout, cfg.vocab_sizes
    )
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=1e-6)
    data = random_data(cfg, rows, seed)
    gal = [
        np.asarray(data.gallery.embeddings[m], dtype=np.float32) for m in ("visual", "gps", "text")
    ]  # its own .npy files
    table = torch.from_numpy(data.gallery.tokens)
    rng = np.random.default_rng(seed)

    def step(_: int) -> None:
        rows = rng.integers(0, data.rows, batch_size)
        q = [torch.from_numpy(g[rows]) for g in gal]
        with precision(dtype):
            loss = model(
                *q,
                *gal,
                torch.from_numpy(data.neighbours[rows]),
                table,
                torch.from_numpy(data.query_tokens[rows]),
            )
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    sec = time_steps(step, iters, warmup)
    return {"seconds_per_step": sec, "train_samples_per_s": batch_size / sec, "dtype": dtype}


# ------------------------------------------------------------------ reference-style decoding (uncached)
def reference_encode(
    model: ReferenceGeoToken, query: dict, nbr: dict, nbr_tokens: torch.Tensor
) -> torch.Tensor:
    """Memory (S, B, d) of already-gathered inputs (query {visual, gps, text}: (B, D), nbr: (B, k, D),
    nbr_tokens (B, k, T)) with the reference's structure: per-neighbour and per-position loops."""
    B, k, T = nbr_tokens.shape
    neighbours = []
    for j in range(k):  # per-neighbour loop
        e = [model._unit(proj(nbr[m][:, j])) for proj, m in zip(
            (model.image_proj, model.loc_proj, model.text_proj), ("visual", "gps", "text"))]  # fmt: skip
        emb = [model.retrieval_embedding(nbr_tokens[:, j, p] + model.offsets[p]) for p in range(T)]
        neighbours.append(torch.cat([x[:, None] for x in e] + [torch.stack(emb, 1)], 1))
    nbr_seq = torch.stack(neighbours, 1).view(B, -1, model.d).transpose(0, 1)
    q = [model._unit(model.image_proj(query["visual"])), model._unit(model.loc_proj(query["gps"])),
         model._unit(model.text_proj(query["text"]))]  # fmt: skip
    src = torch.cat([model.cls.expand(B, -1)[None]] + [x[None] for x in q] + [nbr_seq], 0)
    return model.encoder(src + model.pe[: src.size(0)])


def reference_next_logp(model: ReferenceGeoToken, memory: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    """Log-probabilities (N, V_t) of token t = prefix.shape[1]: the whole decoder re-run on the prefix."""
    N, t = prefix.shape
    dec = [model.start.expand(N, -1)] + [model.embedding(prefix[:, i] + model.offsets[i]) for i in range(t)]
    dec = torch.stack(dec, 0) + model.pe[: t + 1]
    out = model.decoder(dec, memory, tgt_mask=nn.Transformer.generate_square_subsequent_mask(t + 1))
    return F.log_softmax(model.output_layers[t](out[-1]).float(), -1)


def reference_decode(
    model: ReferenceGeoToken, memory: torch.Tensor, strategy: str, width: int = 1, generator=None
) -> torch.Tensor:
    """Tokens (B, width, T) by "greedy" (width 1), "beam" (width beams) or "sample" (width samples), each
    step re-running the decoder over every beam's / sample's whole prefix, as the reference code does."""
    B, T = memory.size(1), len(model.vocab)
    n = 1 if strategy == "greedy" else width
    mem = memory.repeat_interleave(n, 1)  # (S, B * n, d)
    tokens = torch.zeros(B * n, 0, dtype=torch.long)
    scores = torch.zeros(B, n)
    scores[:, 1:] = -float("inf")  # beams start as one
    for t in range(T):
        logp = reference_next_logp(model, mem, tokens)  # (B * n, V)
        if strategy == "beam":
            V = logp.size(1)
            total = (scores[..., None] + logp.view(B, n, V)).view(B, -1)
            scores, idx = total.topk(min(n, total.size(1)), 1)
            if scores.size(1) < n:  # fewer candidates than beams at the first step
                pad = n - scores.size(1)
                scores = torch.cat([scores, torch.full((B, pad), -float("inf"))], 1)
                idx = torch.cat([idx, idx[:, :1].expand(-1, pad)], 1)
            beam, tok = idx // V, idx % V
            prev = tokens.view(B, n, t).gather(1, beam[..., None].expand(-1, -1, t))
            tokens = torch.cat([prev, tok[..., None]], 2).view(B * n, t + 1)
        elif strategy == "sample":
            tok = torch.multinomial(logp.exp(), 1, generator=generator)
            tokens = torch.cat([tokens, tok], 1)
        else:
            tokens = torch.cat([tokens, logp.argmax(-1, keepdim=True)], 1)
    return tokens.view(B, n, T)

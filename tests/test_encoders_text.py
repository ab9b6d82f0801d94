"""all-MiniLM-L6-v2 through plain transformers gives sentence-transformers' embeddings."""

import huggingface_hub.constants
import pytest
import torch

from geotoken import assets
from geotoken.encoders import TextEncoder, load_text_encoder
from geotoken.errors import GeoTokenError

SENTENCES = [
    "a photo taken in Paris, Île-de-France, France",
    "a photo taken in Kyoto, Japan",
    "a photo",
    "a photo taken in Hanapēpē, Hawaii, United States " * 40,  # longer than 256 tokens: truncated alike
]


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    torch.set_num_threads(2)
    return load_text_encoder("minilm", batch_size=3)  # batch 3 < 4 sentences: exercises batching


@pytest.mark.slow
def test_matches_sentence_transformers(minilm, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(assets.minilm_dir()), device="cpu")
    want = reference.encode(SENTENCES, convert_to_tensor=True, normalize_embeddings=True)
    got = minilm.encode(SENTENCES)
    assert got.shape == (4, 384) and minilm.dim == 384
    torch.testing.assert_close(got, want.cpu(), rtol=1e-4, atol=1e-5)


def test_places_closer_than_unrelated_text(minilm):
    e = minilm.encode(
        ["a photo taken in Paris, France", "a photo taken in Lyon, France", "a recipe for pancakes"]
    )
    assert e[0] @ e[1] > e[0] @ e[2] + 0.2


def test_bad_input(minilm):
    assert minilm.encode([]).shape == (0, 384)
    with pytest.raises(GeoTokenError, match="list of strings"):
        minilm.encode("a photo taken in Paris")
    with pytest.raises(GeoTokenError, match="unknown text encoder"):
        load_text_encoder("bert")
    assert minilm.config() == {"name": "minilm", "model": str(assets.minilm_dir())}

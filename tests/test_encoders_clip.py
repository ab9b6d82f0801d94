"""CLIP image and text towers through exactly the user's path: a folder saved by `transformers`, loaded by name.

The model is a tiny random CLIP built here; nothing is downloaded.
"""

import copy
import json

import huggingface_hub.constants
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from geotoken import assets
from geotoken.encoders import backbone_source, load_backbone, load_text_encoder
from geotoken.encoders.base import clip_spelled
from geotoken.errors import GeoTokenError

MEAN, STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """Folder with a random 2-layer CLIP (30 px images, 16-d projections), a character tokenizer, a preprocessor."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    folder = tmp_path_factory.mktemp("tiny-clip")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz,.":
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")).save_pretrained(folder)
    tower = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    text = dict(
        tower,
        vocab_size=len(vocab),
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    config = CLIPConfig(
        text_config=text, vision_config=dict(tower, image_size=30, patch_size=6), projection_dim=16
    )
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    model.save_pretrained(folder)
    preprocessor = {
        "size": {"shortest_edge": 34},
        "crop_size": {"height": 30, "width": 30},
        "do_resize": True,
        "do_center_crop": True,
        "resample": 3,
        "image_mean": MEAN,
        "image_std": STD,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return folder, model


def test_image_backbone_matches_transformers(tiny_clip):
    folder, model = tiny_clip
    backbone = load_backbone("clip", clip=str(folder))
    assert (backbone.name, backbone.dim, backbone.image_size) == ("clip", 16, 30)
    x = torch.randn(3, 3, 30, 30)
    with torch.no_grad():
        want = model.get_image_features(pixel_values=x)
        want = want.pooler_output if hasattr(want, "pooler_output") else want
        got = backbone(x)
    assert got.shape == (3, 16)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    again = load_backbone(**backbone.config())
    assert again.config() == {"name": "clip", "clip": str(folder), "dtype": "float32"}
    # a store, heads or bundle saved before the weights were spelled `clip` says "model": still loads
    before = {"name": "clip", "model": str(folder), "dtype": "float32"}
    assert load_backbone(**before).config() == again.config() and clip_spelled(before) == again.config()
    assert backbone_source(before) == {"kind": "folder", "path": str(folder.resolve())}
    with torch.no_grad():
        assert torch.equal(again(x), got)


def test_preprocessing_matches_the_hf_image_processor(tiny_clip):
    from transformers import CLIPImageProcessorPil

    folder, _ = tiny_clip
    backbone = load_backbone("clip", clip=str(folder))
    hf = CLIPImageProcessorPil(
        size={"shortest_edge": 34}, crop_size={"height": 30, "width": 30}, image_mean=MEAN, image_std=STD
    )
    for image in (
        Image.open(assets.sample_image()).convert("RGB"),
        Image.new("RGB", (90, 41), (200, 30, 60)),
    ):
        want = hf(images=image, return_tensors="np")["pixel_values"][0]
        got = backbone.preprocess(image).numpy()
        assert got.shape == want.shape == (3, 30, 30)
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_vision_only_folder(tiny_clip, tmp_path):
    from transformers import CLIPVisionModelWithProjection

    folder, model = tiny_clip
    config = copy.deepcopy(model.config.vision_config)
    config.projection_dim = 16
    vision = CLIPVisionModelWithProjection(config)
    vision.vision_model.load_state_dict(model.vision_model.state_dict())
    vision.visual_projection.load_state_dict(model.visual_projection.state_dict())
    vision.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_bytes((folder / "preprocessor_config.json").read_bytes())
    x = torch.randn(2, 3, 30, 30)
    with torch.no_grad():
        want = load_backbone("clip", clip=str(folder))(x)
        torch.testing.assert_close(load_backbone("clip", clip=str(tmp_path))(x), want)


def test_folder_without_vision_weights_is_an_error(tiny_clip, tmp_path):
    from transformers import CLIPTextModelWithProjection

    folder, model = tiny_clip
    CLIPTextModelWithProjection(model.config.text_config).save_pretrained(tmp_path)
    with pytest.raises(GeoTokenError, match="not a CLIP model with a vision tower"):
        load_backbone("clip", clip=str(tmp_path))
    with pytest.raises(GeoTokenError, match="dtype"):
        load_backbone("clip", clip=str(folder), dtype="int8")
    with pytest.raises(GeoTokenError, match="cannot load"):
        load_backbone("clip", clip=str(tmp_path / "missing"))


def test_clip_text_tower(tiny_clip):
    folder, model = tiny_clip
    encoder = load_text_encoder("clip", clip=str(folder))
    texts = ["a photo taken in paris, france", "a photo taken in kyoto, japan", "a photo"]
    got = encoder.encode(texts)
    assert got.shape == (3, 16) == (len(texts), encoder.dim)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(3))
    tokens = encoder.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        want = model.get_text_features(**tokens)
        want = want.pooler_output if hasattr(want, "pooler_output") else want
    torch.testing.assert_close(got, F.normalize(want, dim=-1), rtol=1e-5, atol=1e-6)


def test_towers_load_from_a_full_checkpoint_without_transformers_load_report(tiny_clip, capfd):
    """Each tower of a full CLIP checkpoint sees the other tower's weights as unexpected: expected, so
    transformers' UNEXPECTED table (hundreds of lines for ViT-L/14) stays out of the logs."""
    from transformers.utils import logging as hf_logging

    folder, _ = tiny_clip
    before = hf_logging.get_verbosity()
    load_text_encoder("clip", clip=str(folder))
    load_backbone("clip", clip=str(folder))
    assert "UNEXPECTED" not in capfd.readouterr().err
    assert hf_logging.get_verbosity() == before  # the user's own setting is put back


def test_a_hub_id_that_cannot_be_fetched_names_the_offline_ways(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # already offline: not in the cache, so fetch it once
    with pytest.raises(
        GeoTokenError, match=r"name a local CLIP folder \(--clip / clip=\) or fetch it once"
    ) as said:
        load_backbone("clip", clip="nobody/no-such-clip")
    assert "set HF_HUB_OFFLINE" not in str(said.value)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(
        GeoTokenError,
        match=r"cannot load 'nobody/no-such-clip'.*name a local CLIP folder.*HF_HUB_OFFLINE=1",
    ):
        load_backbone("clip", model="nobody/no-such-clip")  # one line, the offline ways at its end
    with pytest.raises(GeoTokenError) as folder:  # a folder is not fetched: no network hint
        load_backbone("clip", clip=str(tmp_path))
    assert "HF_HUB_OFFLINE" not in str(folder.value)


def test_a_batch_is_preprocessed_in_threads_exactly_as_one_by_one(tiny_clip):
    backbone = load_backbone("clip", clip=str(tiny_clip[0]))
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(300, 400), (64, 33), (500, 120)]]  # fmt: skip
    images += [images[0].convert("L"), images[1].convert("RGBA")]  # other modes are read as RGB
    want = torch.stack([backbone.preprocess(im.convert("RGB")) for im in images])
    assert torch.equal(backbone.preprocess_batch(images), want)
    assert torch.equal(backbone.preprocess_batch(images[3:4]), want[3:4])


def test_a_forked_child_preprocesses_with_a_pool_of_its_own(tiny_clip):
    import multiprocessing as mp

    backbone = load_backbone("clip", clip=str(tiny_clip[0]))
    images = [Image.new("RGB", (40, 30), (i, 0, 0)) for i in range(3)]
    want = backbone.preprocess_batch(images)  # the parent's pool exists now
    ctx = mp.get_context("fork")  # the child's copy of the parent's pool has no threads
    queue = ctx.Queue()
    child = ctx.Process(target=lambda: queue.put(backbone.preprocess_batch(images).numpy()))
    child.start()
    try:
        got = queue.get(timeout=30)  # without its own pool the child waits forever
    finally:
        child.join(timeout=5)
        child.kill()
    assert np.array_equal(got, want.numpy())


def test_a_clip_folder_without_tokenizer_files_is_no_text_encoder(tmp_path, tiny_clip):
    """transformers builds a CLIP tokenizer of two entries from a folder without its files: every place
    text would be unknown tokens, and the text head would train on one constant."""
    from geotoken import testing

    bare = testing.tiny_clip(tmp_path / "bare")  # weights and image preprocessing only
    with pytest.raises(GeoTokenError, match="has no usable tokenizer .*vocab.json \\+ merges.txt"):
        load_text_encoder("clip", clip=str(bare))
    folder, _ = tiny_clip
    assert load_text_encoder("clip", clip=str(folder)).dim > 0  # with its tokenizer files it loads

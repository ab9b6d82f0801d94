"""EfficientNet-Lite0: the weights load exactly, the input convention is right, and the features mean something."""

import os

import matplotlib
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from geotoken import assets
from geotoken.encoders import ImageBackbone, load_backbone
from geotoken.errors import GeoTokenError

# A few ImageNet-1k class indices (standard synset order).
LANDSCAPE = {970: "alp", 972: "cliff", 976: "promontory", 979: "valley", 980: "volcano"}
PORTRAIT = {400: "academic gown", 457: "bow tie", 652: "military uniform", 667: "mortarboard", 834: "suit", 906: "Windsor tie"}  # fmt: skip


def photos() -> dict[str, Image.Image]:
    hopper = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
    return {"kauai": Image.open(assets.sample_image()), "hopper": Image.open(hopper)}


@pytest.fixture(scope="module")
def net() -> ImageBackbone:
    torch.set_num_threads(2)
    return load_backbone("efficientnet-lite0")


def test_every_weight_is_loaded_exactly(net):
    saved = torch.load(assets.efficientnet_lite0_weights(), map_location="cpu", weights_only=True)
    ours = net.net.state_dict()
    assert set(ours) == set(saved) and len(saved) == 296
    for key, value in saved.items():
        assert torch.equal(ours[key], value), key


@pytest.mark.slow  # two more loads of the weights
def test_interface_and_config_round_trip(net):
    assert (net.name, net.dim, net.image_size) == ("efficientnet-lite0", 1280, 224)
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    small = load_backbone(**{**net.config(), "image_size": 64})
    x = small.preprocess(photos()["kauai"])  # RGBA png -> RGB
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    again = load_backbone(**small.config())
    with torch.no_grad():
        assert small(x[None]).shape == (1, 1280)
        assert torch.equal(small(x[None]), again(x[None]))


def test_input_scaling_matches_the_weights(net):
    """The stem BatchNorm's running variance is what real photos produce only with (x - 127) / 128."""
    x = torch.stack([net.preprocess(im) for im in photos().values()])
    with torch.no_grad():
        var = net.net._conv_stem(x).var(dim=(0, 2, 3))
    ratio = (var / net.net._bn0.running_var).median().item()
    assert 0.6 < ratio < 1.6, ratio  # ImageNet mean/std scaling would give ~5


@pytest.mark.slow
def test_predicts_sane_imagenet_classes(net):
    im = photos()
    x = torch.stack([net.preprocess(im["kauai"]), net.preprocess(im["hopper"])])
    with torch.no_grad():
        top5 = net.logits(x).topk(5).indices.tolist()
    assert top5[0][0] in LANDSCAPE and set(top5[0][:3]) <= set(LANDSCAPE), top5[0]
    assert top5[1][0] in PORTRAIT and 652 in top5[1], top5[1]


@pytest.mark.slow
def test_pretrained_features_separate_images_better_than_random(net):
    kauai, hopper = (im.convert("RGB") for im in photos().values())
    views = [
        kauai,
        ImageOps.mirror(kauai.crop((0, 0, 400, 400))),
        hopper,
        ImageOps.mirror(hopper.crop((50, 60, 512, 600))),
    ]

    def margin(backbone):
        f = F.normalize(backbone.embed(views), dim=-1)
        s = f @ f.T  # same scene: (0, 1), (2, 3); different scenes: the rest
        return ((s[0, 1] + s[2, 3]) / 2 - s[:2, 2:].mean()).item()

    torch.manual_seed(0)
    random = load_backbone("efficientnet-lite0", pretrained=False)
    assert margin(net) > 0.5
    assert margin(net) > 10 * abs(margin(random))


def test_bad_options_are_user_errors():
    with pytest.raises(GeoTokenError, match="unknown image backbone"):
        load_backbone("resnet-50")
    with pytest.raises(GeoTokenError, match="image_size"):
        load_backbone("efficientnet-lite0", image_size=8)
    with pytest.raises(GeoTokenError, match="bad options"):
        load_backbone("efficientnet-lite0", imagesize=64)

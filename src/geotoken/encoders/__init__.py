"""Frozen encoders that turn photos, coordinates and place descriptions into vectors.

- `load_backbone(name, **options) -> ImageBackbone`: "efficientnet-lite0" (offline default) or "clip";
  `backbone_source(config)`: where its weights come from (a pip package, a Hub repo, a local folder).
- `load_gps_encoder() -> GPSEncoder`: GeoCLIP's pretrained location encoder, (B, 2) degrees -> (B, 512).
- `load_text_encoder(name) -> TextEncoder`: "minilm" (offline default) or "clip"; list[str] -> (B, D).
"""

from geotoken.encoders.backbones import BACKBONES, backbone_source, check_backbone_options, load_backbone
from geotoken.encoders.base import ImageBackbone
from geotoken.encoders.gps import GPSEncoder, load_gps_encoder
from geotoken.encoders.text import TextEncoder, load_text_encoder

__all__ = [
    "BACKBONES",
    "GPSEncoder",
    "ImageBackbone",
    "TextEncoder",
    "backbone_source",
    "check_backbone_options",
    "load_backbone",
    "load_gps_encoder",
    "load_text_encoder",
]

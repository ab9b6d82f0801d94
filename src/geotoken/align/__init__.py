"""Geo-alignment: heads on frozen backbone features giving visual, GPS-aligned and text-aligned embeddings."""

from geotoken.align.heads import GPS_HEADS, AlignHeads, HeadsConfig
from geotoken.align.train import AlignConfig, apply_heads, evaluate_heads, info_nce, train_heads

__all__ = [
    "GPS_HEADS",
    "AlignConfig",
    "AlignHeads",
    "HeadsConfig",
    "apply_heads",
    "evaluate_heads",
    "info_nce",
    "train_heads",
]

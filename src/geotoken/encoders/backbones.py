"""The image backbones by name: `BACKBONES` (name -> class) and `load_backbone(name, **options)`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from geotoken.encoders.base import ImageBackbone, clip_spelled
from geotoken.encoders.clip import CLIPBackbone
from geotoken.encoders.efficientnet import EfficientNetLite0
from geotoken.errors import GeoTokenError

# name -> class. Each class imports its heavy package (efficientnet_lite_pytorch, transformers) only when
# built, so `clip` never loads transformers for EfficientNet.
BACKBONES: dict[str, type[ImageBackbone]] = {
    "efficientnet-lite0": EfficientNetLite0,
    "clip": CLIPBackbone,
}


def check_backbone_options(name: str, clip: str | None = None, image_size: int | None = None) -> None:
    """The options that apply to one backbone only, given to another: an error naming both (the features
    stage, `geotoken embed`), before any image is read."""
    if clip is not None and name != "clip":
        raise GeoTokenError(
            f"clip {clip!r} names CLIP weights; the backbone {name} has none (drop one of them)"
        )
    if image_size is not None and name == "clip":
        raise GeoTokenError(
            "image_size is efficientnet-lite0's; a CLIP model's input size is its preprocessor's"
        )


def load_backbone(name: str, **options: Any) -> ImageBackbone:
    """Build a backbone by registry name; `options` are its constructor arguments (see each class)."""
    if name not in BACKBONES:
        raise GeoTokenError(f"unknown image backbone {name!r}; choose one of {sorted(BACKBONES)}")
    backbone_cls = BACKBONES[name]
    options = {k: v for k, v in clip_spelled({"name": name, **options}).items() if k != "name"}
    try:
        backbone = backbone_cls(**options)
    except TypeError as e:  # an unknown option name: a user error, not a bug
        raise GeoTokenError(f"backbone {name!r}: bad options {sorted(options)}: {e}") from None
    return backbone.eval()


def backbone_source(config: dict[str, Any]) -> dict[str, str]:
    """Where a backbone config's weights come from: {"kind": "hub", "repo_id"} or {"kind": "folder",
    "path"} (absolute) for CLIP, {"kind": "package"} for backbones whose weights ship in a pip package."""
    if config.get("name") != "clip":
        return {"kind": "package"}
    clip = str(clip_spelled(config).get("clip", ""))
    if Path(clip).is_dir():
        return {"kind": "folder", "path": str(Path(clip).resolve())}
    return {"kind": "hub", "repo_id": clip}

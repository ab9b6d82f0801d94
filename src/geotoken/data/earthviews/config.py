"""EarthViews configuration: split names, imagery layers, view styles, the config and its named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from geotoken.errors import GeoTokenError

SPLITS = ("gallery", "train", "val", "test", "test_disjoint", "test_shift")
LAYERS = ("bmng", "shadedrelief", "etopo1")


@dataclass(frozen=True)
class ViewStyle:
    """How the views of one split are rendered. Every range is sampled per view from the view's own RNG."""

    rotation_deg: float = 180.0  # rotation uniform in [-r, r] degrees (180 = any orientation)
    scale: tuple[float, float] = (1.0, 1.0)  # view width multiplier, log-uniform in this range
    colour: float = 0.0  # std of the random 3x3 colour-mixing matrix around identity
    brightness: float = 0.0  # std of log brightness and log contrast
    season: float = 0.0  # max strength of a dry-season (greens to browns) or snow (land to white) shift
    haze: float = 0.0  # max blend towards a bright haze colour
    cloud: float = 0.0  # max cloud opacity; cover varies per view
    blur: float = 0.0  # max Gaussian blur sigma in output pixels
    other_layer_p: float = 0.0  # probability that another imagery layer is blended in
    other_layer_weight: tuple[float, float] = (0.3, 0.7)  # its blend weight, uniform
    jpeg_quality: tuple[int, int] = (90, 90)  # JPEG quality, uniform integer in [lo, hi]

    def __post_init__(self) -> None:
        """Each value checked where it is set, naming it: a bad range would fail as numpy's 'high - low < 0'
        after the gallery's shards were rendered, and an impossible one (jpeg 200) would not fail at all."""
        shares = {
            "season": self.season,
            "haze": self.haze,
            "cloud": self.cloud,
            "other_layer_p": self.other_layer_p,
        }
        checks = {
            "rotation_deg": (0 <= self.rotation_deg <= 180, "in [0, 180]"),
            "colour": (self.colour >= 0, ">= 0"),
            "brightness": (self.brightness >= 0, ">= 0"),
            "blur": (self.blur >= 0, ">= 0"),
            **{k: (0 <= v <= 1, "in [0, 1]") for k, v in shares.items()},
            "scale": (
                len(self.scale) == 2 and 0 < self.scale[0] <= self.scale[1],
                "(lo, hi) with 0 < lo <= hi",
            ),
            "other_layer_weight": (
                len(self.other_layer_weight) == 2
                and 0 <= self.other_layer_weight[0] <= self.other_layer_weight[1] <= 1,
                "(lo, hi) with 0 <= lo <= hi <= 1",
            ),
            "jpeg_quality": (
                len(self.jpeg_quality) == 2 and 1 <= self.jpeg_quality[0] <= self.jpeg_quality[1] <= 100,
                "(lo, hi) with 1 <= lo <= hi <= 100",
            ),
        }
        for name, (ok, bounds) in checks.items():
            if not ok:
                raise GeoTokenError(f"view style {name} must be {bounds}, got {getattr(self, name)!r}")

    @classmethod
    def named(cls, name: str) -> ViewStyle:
        """A named test style (`TEST_STYLES`), as `--test-style strong` and a config's `test_style: strong`."""
        if name not in TEST_STYLES:
            raise GeoTokenError(
                f"view style {name!r}: choose from {', '.join(TEST_STYLES)}, or give its fields"
            )
        return TEST_STYLES[name]


# Gallery/train views: the true point at a random offset, any orientation, mild scale and colour change.
GALLERY_STYLE = ViewStyle(rotation_deg=180.0, scale=(0.9, 1.1), colour=0.02, brightness=0.05)

# Named test-time styles, easiest first. "medium" is the default: every kind of change, and 1-NN on the
# spatially disjoint split lands between the prior and the ceiling (docs/earthviews.md, calibration table).
TEST_STYLES: dict[str, ViewStyle] = {
    # the first probe of issue 4: +-10 degrees, light colour jitter
    "light": ViewStyle(
        rotation_deg=10.0, scale=(0.95, 1.05), colour=0.03, brightness=0.05, jpeg_quality=(75, 95)
    ),
    "medium": ViewStyle(
        rotation_deg=180.0,
        scale=(0.8, 1.25),
        colour=0.05,
        brightness=0.12,
        season=0.35,
        haze=0.25,
        cloud=0.4,
        blur=1.0,
        other_layer_p=0.2,
        other_layer_weight=(0.2, 0.4),
        jpeg_quality=(40, 90),
    ),
    "strong": ViewStyle(
        rotation_deg=180.0,
        scale=(0.75, 1.33),
        colour=0.06,
        brightness=0.15,
        season=0.5,
        haze=0.35,
        cloud=0.6,
        blur=1.2,
        other_layer_p=0.3,
        other_layer_weight=(0.2, 0.5),
        jpeg_quality=(30, 90),
    ),
    # the "too hard" end: every test view mostly from another imagery layer
    "cross-layer": ViewStyle(
        rotation_deg=180.0,
        scale=(0.75, 1.33),
        colour=0.06,
        brightness=0.15,
        blur=1.0,
        other_layer_p=1.0,
        other_layer_weight=(0.7, 1.0),
        jpeg_quality=(30, 90),
    ),
}


@dataclass(frozen=True)
class EarthViewsConfig:
    """Everything that decides the dataset's bytes (plus `shard_size`, which only decides file boundaries)."""

    size: int = 20_000  # gallery/train views
    n_val: int = 1000
    n_test: int = 1000  # random test split: coordinates disjoint from the gallery's
    n_test_disjoint: int = 1000  # spatially disjoint test split: from held-out lat/lon bins
    # distribution-shift test split: GeoNames places drawn country-balanced, not MP16's photo coordinates
    n_test_shift: int = 1000
    image_size: int = 64  # pixels per side
    view_km: float = 400.0  # view width before the per-view scale
    max_offset: float = 0.25  # the true point is up to this fraction of the width from the centre, per axis
    layer: str = "bmng"  # base imagery
    other_layers: tuple[str, ...] = ("shadedrelief", "etopo1")  # blended into some test views
    holdout_deg: float = 5.0  # size of the lat/lon bins of the spatially disjoint split
    holdout_fraction: float = 0.2  # share of bins held out of the gallery
    seed: int = 0
    shard_size: int = 1000
    gallery_style: ViewStyle = GALLERY_STYLE
    test_style: ViewStyle = field(default_factory=lambda: TEST_STYLES["medium"])
    # training queries: photo-like views `ID-tJ` of every gallery coordinate (0: no train split)
    train_views: int = 2
    train_style: ViewStyle = field(default_factory=lambda: TEST_STYLES["medium"])

    def __post_init__(self) -> None:
        self.validate()  # where it is set (a config file's dry run, the library), not at build time only

    def style(self, split: str) -> ViewStyle:
        return {"gallery": self.gallery_style, "train": self.train_style}.get(split, self.test_style)

    def sizes(self) -> dict[str, int]:
        return {
            "gallery": self.size,
            "train": self.size * self.train_views,
            "val": self.n_val,
            "test": self.n_test,
            "test_disjoint": self.n_test_disjoint,
            "test_shift": self.n_test_shift,
        }

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        if self.train_views < 0:
            raise GeoTokenError(f"EarthViews config: train_views must be >= 0, got {self.train_views}")
        for name, n in self.sizes().items():
            if n < 0 or (name == "gallery" and n < 1):
                raise GeoTokenError(f"EarthViews config: size of split {name!r} must be positive, got {n}")
        checks = {
            "image_size": 16 <= self.image_size <= 1024,
            "view_km": 1.0 <= self.view_km <= 5000.0,
            "max_offset": 0.0 <= self.max_offset <= 0.5,
            "holdout_deg": 0.5 <= self.holdout_deg <= 90.0,
            "holdout_fraction": 0.0 <= self.holdout_fraction < 1.0,
            "shard_size": self.shard_size >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise GeoTokenError(f"EarthViews config: {name}={getattr(self, name)!r} is out of range")
        for layer in (self.layer, *self.other_layers):
            if layer not in LAYERS:
                raise GeoTokenError(
                    f"EarthViews config: unknown imagery layer {layer!r} (choose from {LAYERS})"
                )


# Named sizes. "demo" fits the 15-minute demo on 2 cores (the demo also embeds and trains on these views).
PRESETS: dict[str, EarthViewsConfig] = {
    "demo": EarthViewsConfig(),
    "full": EarthViewsConfig(
        size=100_000, n_val=2000, n_test=2000, n_test_disjoint=2000, n_test_shift=2000, image_size=96
    ),
    "tiny": EarthViewsConfig(
        size=200, n_val=20, n_test=20, n_test_disjoint=20, n_test_shift=20, image_size=32, shard_size=64
    ),
}

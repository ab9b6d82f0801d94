"""EarthViews: the built-in offline geolocation dataset.

No ground-level geotagged photo collection installs offline, so EarthViews is made from real data that does:
the ~100K real MP16 photo coordinates (with their real bias towards cities, Europe and North America) and
NASA's whole-Earth imagery (Blue Marble; shaded relief and etopo as other layers). Each view is a square
patch of the Earth, a few hundred km wide, around one coordinate, reprojected in a local azimuthal
equidistant projection (so it wraps at the antimeridian and is not stretched near the poles). The true
point sits at a random offset inside the view. Test views get strong changes (full rotation, scale,
season-like colour shifts, haze, clouds, blur, other imagery layers, JPEG quality), and a spatially
disjoint test split holds whole lat/lon bins out of the gallery; a distribution-shift test split
(`test_shift`) takes its places from another source, GeoNames towns drawn country-balanced. The `train`
split renders every gallery place again, `train_views` times, as photo-like query views `ID-tJ` (their own random draws, the test-time
kinds of change): the model learns from queries that look like the photos it will be asked about, while
the gallery holds clean reference views.

It is a proxy task on satellite-scale views: its numbers are not comparable with Im2GPS3k / YFCC4k.

Every view is a function of (seed, view id, split style): the same call writes byte-identical shards and
manifests. Output (one folder): WebDataset tar shards `SPLIT-NNNNN.tar` (`KEY.jpg` + `KEY.json`, as
img2dataset writes them), a manifest `SPLIT.csv` (`id,lat,lon,image`, images `SHARD.tar#KEY.jpg`) per split,
and `dataset.json` (config, sizes, file hashes, content hash, timings).

Modules: `config` (splits, layers, `ViewStyle`, `EarthViewsConfig`, `PRESETS`), `geometry` (coordinates,
splits, the view projection, layer sampling), `render` (layers, per-view draws, pixels, JPEG, `iter_views`),
`build` (shards, manifests, `dataset.json`, the process pool). The names below are the public interface
(`EARTH_RADIUS_KM`, from `geotoken.geo`, is the radius the view projection uses).
"""

from geotoken.data.earthviews.build import FORMAT_VERSION, build_earthviews
from geotoken.data.earthviews.config import (
    GALLERY_STYLE,
    LAYERS,
    PRESETS,
    SPLITS,
    TEST_STYLES,
    EarthViewsConfig,
    ViewStyle,
)
from geotoken.data.earthviews.geometry import (
    Coordinates,
    Split,
    geonames_coordinates,
    holdout_mask,
    load_coordinates,
    make_splits,
    sample_equirect,
    shift_rows,
    view_latlon,
    view_offsets_to_pixel,
)
from geotoken.data.earthviews.render import (
    draw_view_params,
    encode_jpeg,
    iter_views,
    load_layer,
    render_views,
    view_metadata,
    view_seed,
)
from geotoken.geo import EARTH_RADIUS_KM

__all__ = [
    "EARTH_RADIUS_KM",
    "FORMAT_VERSION",
    "GALLERY_STYLE",
    "LAYERS",
    "PRESETS",
    "SPLITS",
    "TEST_STYLES",
    "Coordinates",
    "EarthViewsConfig",
    "Split",
    "ViewStyle",
    "build_earthviews",
    "draw_view_params",
    "encode_jpeg",
    "geonames_coordinates",
    "holdout_mask",
    "iter_views",
    "load_coordinates",
    "load_layer",
    "make_splits",
    "render_views",
    "sample_equirect",
    "shift_rows",
    "view_latlon",
    "view_metadata",
    "view_offsets_to_pixel",
    "view_seed",
]

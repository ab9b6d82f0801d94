"""Datasets: annotation files -> validated manifests, the image sources behind them, and downloads.

`table` holds the `Manifest` type, the table every later stage follows (ids, lat, lon, image references);
`images` opens those references (files, or members of WebDataset tar shards); `manifest` reads annotation
files and shards into a validated `Manifest`; `download` fetches URL lists into such shards.
"""

from geotoken.data.images import iter_images, open_image, read_shard_index
from geotoken.data.manifest import Manifest, manifest_from_shards, read_annotations, read_manifest

__all__ = [
    "Manifest",
    "iter_images",
    "manifest_from_shards",
    "open_image",
    "read_annotations",
    "read_manifest",
    "read_shard_index",
]

"""Datasets: annotation files -> validated manifests, the image sources behind them, and downloads.

`manifest` is the table every later stage follows (ids, lat, lon, image references); `images` opens those
references (files, or members of WebDataset tar shards) and `download` fetches URL lists into such shards.
"""

from geotoken.data.manifest import Manifest, read_manifest

__all__ = ["Manifest", "read_manifest"]

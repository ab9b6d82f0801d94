"""Feature store: float16 memmaps + JSON header, filled by a batched, resumable, multi-process `embed`."""

from geotoken.features.embed import embed
from geotoken.features.store import FeatureStore, MissingArray, RowWriter, load_array, read_rows

__all__ = ["FeatureStore", "MissingArray", "RowWriter", "embed", "load_array", "read_rows"]

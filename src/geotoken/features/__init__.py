"""Feature store: float16 memmaps + JSON header, filled by a batched, resumable, multi-process `embed`."""

from geotoken.features.embed import embed
from geotoken.features.store import FeatureStore, RowWriter, read_rows

__all__ = ["FeatureStore", "RowWriter", "embed", "read_rows"]

"""Retrieval: FAISS indexes over aligned embeddings and neighbour tables (top-k gallery rows per query)."""

from geotoken.retrieval.embeddings import DEFAULT_EMBEDDING, StoreEmbeddings, join_embeddings
from geotoken.retrieval.index import (
    KINDS,
    REFINE,
    IndexConfig,
    NeighbourIndex,
    check_index_target,
    check_recall,
    measure_recall,
    recall_at_k,
)
from geotoken.retrieval.neighbours import (
    NeighbourTable,
    build_store_index,
    check_neighbours,
    neighbour_table,
    search_excluding,
)

__all__ = [
    "DEFAULT_EMBEDDING",
    "KINDS",
    "REFINE",
    "IndexConfig",
    "NeighbourIndex",
    "NeighbourTable",
    "StoreEmbeddings",
    "build_store_index",
    "check_index_target",
    "check_neighbours",
    "join_embeddings",
    "check_recall",
    "measure_recall",
    "neighbour_table",
    "recall_at_k",
    "search_excluding",
]

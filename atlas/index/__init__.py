"""Nearest-neighbour indexes over the reference embedding, and how they are sharded.

* :mod:`atlas.index.faiss_index` — build / search / save / load one cosine-similarity index
  (exact flat, IVF or HNSW; GPU when faiss-gpu or torch CUDA is present).
* :mod:`atlas.index.shards` — a :class:`Shard` (index + labels + modality profiles) on disk, and
  :func:`build_hierarchy`: a coarse shard over all cells plus one fine shard per label group,
  or hash shards for flat mapping, described by a :class:`ShardLayout`.

No Ray and no SOMA here: the build job and the Serve deployments call these functions.
"""

from atlas.index.faiss_index import (
    TorchFlatIndex,
    build_index,
    index_kind,
    load_index,
    merge_topk,
    normalize,
    save_index,
    search,
)
from atlas.index.shards import (
    LayoutNode,
    Shard,
    ShardLayout,
    build_hierarchy,
    load_shard,
    write_shard,
)

__all__ = [
    "LayoutNode",
    "Shard",
    "ShardLayout",
    "TorchFlatIndex",
    "build_hierarchy",
    "build_index",
    "index_kind",
    "load_index",
    "load_shard",
    "merge_topk",
    "normalize",
    "save_index",
    "search",
    "write_shard",
]

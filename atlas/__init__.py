"""Single-cell reference atlases on Ray.

The store (``atlas.store``), streaming (``atlas.data``), models (``atlas.models``), training
(``atlas.train``), index and mapping live in subpackages; this module stays import-light so the
command line starts fast.
"""

import os

__version__ = "0.1.0"

# Ray Data's progress bars (ray.experimental.tqdm_ray) otherwise replace builtins.print with a
# Python function in this process, and numba (pynndescent in the scIB scores and UMAPs) can then
# no longer compile code that calls print. A user's own setting wins.
os.environ.setdefault("RAY_TQDM_PATCH_PRINT", "0")


def __getattr__(name: str):
    """Lazy public API: ``atlas.load_atlas``, ``atlas.map_query`` etc. without importing faiss/torch at ``import atlas``."""
    if name in ("load_atlas", "ArtifactError", "Atlas"):
        from atlas import artifact

        return getattr(artifact, name)
    if name == "map_query":
        from atlas.mapping.query import map_query

        return map_query
    if name == "build_atlas":
        from atlas.build import build_atlas

        return build_atlas
    raise AttributeError(f"module 'atlas' has no attribute {name!r}")
